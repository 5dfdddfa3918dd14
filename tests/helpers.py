"""Test helpers: request builders for the engine and an independent InternLM2 -> Llama conversion."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from text_generation_server.models.types import NewRequest, SamplingParameters, StoppingParameters
from text_generation_server.ops import AttentionMetadata


def new_request(
    input_ids,
    max_new_tokens: int = 8,
    ignore_eos: bool = True,
    parameters: SamplingParameters = SamplingParameters(),
    **kwargs,
) -> NewRequest:
    """An engine request for a prompt (greedy, ignoring EOS unless told otherwise)."""
    stopping = StoppingParameters(max_new_tokens=max_new_tokens, ignore_eos_token=ignore_eos, **kwargs.pop("stopping", {}))
    return NewRequest(
        token_ids=tuple(input_ids), prompt_length=len(input_ids), parameters=parameters, stopping=stopping, **kwargs
    )


def greedy_tokens(model, prompts, max_new_tokens: int, chunk_size: int | None = None) -> list[list[int]]:
    """Each prompt's greedy tokens, all prompts run together in `model` (whose KV cache must be allocated)."""
    from text_generation_server.models.local import generate

    results = generate(model, [new_request(p, max_new_tokens) for p in prompts], chunk_size=chunk_size)
    return [r.token_ids for r in results]


class LogitsRecorder:
    """Keeps the logits of every forward of `model` (a wrapper around its compute_logits; tests only)."""

    def __init__(self, model):
        self.module = model.model
        self.steps: list[torch.Tensor] = []
        self._compute = self.module.compute_logits
        self.module.compute_logits = self._record

    def _record(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._compute(hidden)
        self.steps.append(logits.clone())
        return logits

    def close(self) -> None:
        # back to the class's method: an instance attribute holding the bound method would be a reference cycle
        # (the model would then be freed only by the garbage collector, at interpreter exit, which gloo can abort)
        del self.module.compute_logits


def prompt_logits(model, prompt, chunk_size: int | None = None) -> torch.Tensor:
    """[len(prompt), V]: the logits at every prompt position (computed when prompt logprobs are asked)."""
    from text_generation_server.models.local import generate

    recorder = LogitsRecorder(model)
    try:
        generate(model, [new_request(prompt, 1, prefill_logprobs=True)], chunk_size=chunk_size)
    finally:
        recorder.close()
    return torch.cat(recorder.steps)


def step_metadata(
    tables: list[list[int]], block_size: int, spans: list[tuple[int, int]], head_dim: int
) -> AttentionMetadata:
    """The metadata of a step computing positions [start, stop) of each request (identity rotary tables)."""
    positions = [p for start, stop in spans for p in range(start, stop)]
    slots = [t[p // block_size] * block_size + p % block_size for t, (s, e) in zip(tables, spans) for p in range(s, e)]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        query_lens=[stop - start for start, stop in spans],
        context_lens=[stop for _, stop in spans],
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        positions=torch.tensor(positions),
        slots=torch.tensor(slots),
        cos=torch.ones(len(positions), head_dim // 2),
        sin=torch.zeros(len(positions), head_dim // 2),
    )


def attention_step(ops, dtype, heads, kv_heads, head_dim, block_size, requests, seed=0) -> torch.Tensor:
    """Write each request's cached prefix (an earlier step), then run one step over its new tokens through
    `ops`; the attention output [T, H, D]. requests: (cached prefix, new tokens); blocks in shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(p + n) // block_size) for p, n in requests) + 4
    cache = ops.allocate_kv_cache(1, num_blocks, block_size, kv_heads, head_dim, dtype, torch.device("cpu"))
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-(p + n) // block_size))] for p, n in requests]
    keys = [torch.randn(p + n, kv_heads, head_dim, generator=generator).to(dtype) for p, n in requests]
    values = [torch.randn(p + n, kv_heads, head_dim, generator=generator).to(dtype) for p, n in requests]
    cached = [(i, p) for i, (p, _) in enumerate(requests) if p]
    if cached:
        earlier = step_metadata([tables[i] for i, _ in cached], block_size, [(0, p) for _, p in cached], head_dim)
        k = torch.cat([keys[i][:p] for i, p in cached])
        v = torch.cat([values[i][:p] for i, p in cached])
        ops.write_kv(cache, 0, k, v, earlier)
    meta = step_metadata(tables, block_size, [(p, p + n) for p, n in requests], head_dim)
    k = torch.cat([keys[i][p:] for i, (p, _) in enumerate(requests)])
    v = torch.cat([values[i][p:] for i, (p, _) in enumerate(requests)])
    query = torch.randn(meta.num_tokens, heads, head_dim, generator=generator).to(dtype)
    ops.write_kv(cache, 0, k, v, meta)
    return ops.paged_attention(query, k, v, cache, 0, meta, head_dim**-0.5)


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    if not tensors:
        for path in sorted(model_dir.glob("pytorch_model*.bin")):
            tensors.update(torch.load(path, weights_only=True))
    return tensors


def split_wqkv_by_rows(wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """Row selection straight from the layout formula: row (g·(G+2)+s)·D + d.

    Deliberately written with index lists, unlike the engine's reshape, so that the two cannot share a bug.
    """
    group = heads // kv_heads

    def rows(group_and_slot):
        return [(g * (group + 2) + s) * head_dim + d for g, s in group_and_slot for d in range(head_dim)]

    q_rows = rows([(h // group, h % group) for h in range(heads)])
    k_rows = rows([(g, group) for g in range(kv_heads)])
    v_rows = rows([(g, group + 1) for g in range(kv_heads)])
    return wqkv[q_rows], wqkv[k_rows], wqkv[v_rows]


def internlm2_to_llama(src: Path, dst: Path) -> Path:
    """Write `src` (an InternLM2 checkpoint) as a Hugging Face Llama checkpoint in `dst`."""
    config = json.loads((src / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    renames = {
        "model.tok_embeddings.weight": "model.embed_tokens.weight",
        "output.weight": "lm_head.weight",
        "model.norm.weight": "model.norm.weight",
    }
    layer_renames = {
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "attention.wo.bias": "self_attn.o_proj.bias",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
    }
    out = {}
    for name, tensor in read_checkpoint(src).items():
        if name in renames:
            out[renames[name]] = tensor
            continue
        prefix, _, rest = name.partition(".layers.")
        index, _, leaf = rest.partition(".")
        base = f"model.layers.{index}."
        if leaf.startswith("attention.wqkv."):
            kind = leaf.rsplit(".", 1)[-1]
            q, k, v = split_wqkv_by_rows(tensor, heads, kv_heads, head_dim)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{base}self_attn.{proj}.{kind}"] = part.contiguous()
        else:
            out[base + layer_renames[leaf]] = tensor
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    llama_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": config["vocab_size"],
        "max_position_embeddings": config["max_position_embeddings"],
        "rms_norm_eps": config["rms_norm_eps"],
        "rope_theta": config["rope_theta"],
        "rope_scaling": config.get("rope_scaling"),
        "attention_bias": config.get("bias", False),
        "mlp_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": config.get("torch_dtype", "float32"),
    }
    (dst / "config.json").write_text(json.dumps(llama_config, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def metric(text: str, name: str) -> float:
    """The value of sample `name` (with its labels, e.g. 'tgi_request_failure{err="dropped"}') in Prometheus
    text; NaN when absent."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def run_ranks(model_dir: Path, world_size: int, out_file: Path, kernels: str = "auto", env: dict | None = None) -> dict:
    """Run tests/tp_worker.py as `world_size` ranks (gloo, one process each) with the ops backend `kernels`; what
    rank 0 saved: the prompts' logits, greedy tokens and the KV heads of a rank."""
    from router_stack import free_port

    port = str(free_port())
    tests_dir = Path(__file__).parent
    processes = []
    for rank in range(world_size):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, str(tests_dir / "tp_worker.py"), str(model_dir), str(out_file), kernels],
            env=rank_env, cwd=tests_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ))
    outputs = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=180)
        finally:
            process.kill()
        outputs.append(output.decode())
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"
    return torch.load(out_file, weights_only=True)
