"""Convert whole Hugging Face checkpoint directories between the InternLM2 and the Llama layout.

InternLM2 and Llama compute the same function (same RMSNorm, rotate-half RoPE, SwiGLU MLP); only the names
differ and InternLM2 fuses q/k/v into one `wqkv` whose rows are grouped per KV head (see `split_wqkv`), so a
conversion is a rename plus a split (or fuse) of `wqkv`, and no RoPE permutation.

What is written to DST:

* weights as `.safetensors`, shard by shard (input `.safetensors` or `.bin`), with the index rewritten; at
  most one input shard's worth of output tensors is held in memory at a time (inputs are memory-mapped);
* config.json for the target architecture (head counts, `bias` <-> `attention_bias`, rope_theta/rope_scaling);
* generation_config.json, with `<|im_end|>` added to the EOS ids when the tokenizer defines it;
* the tokenizer. InternLM2 -> Llama renames InternLM2's six special pieces inside tokenizer.model from
  `[UNUSED_TOKEN_141..146]` to their `<|...|>` names (as USER_DEFINED pieces, which sentencepiece never
  splits) and writes a tokenizer_config.json for transformers' `LlamaTokenizer`, so a Llama stack encodes and
  decodes `<|im_start|>`/`<|im_end|>` as single tokens under their real names. Llama -> InternLM2 carries the
  tokenizer as it is (our native tokenizer reads either spelling).

Everything is written into a temporary directory beside DST and renamed to DST only once complete (and, with
`verify`, once the logits of both sides agree), so a failed run never leaves a DST that looks finished.

User mistakes raise `ConversionError` with a one-line message; `main` prints it and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from text_generation_server.device import DTYPES
from text_generation_server.models.config import ModelConfig, read_json
from text_generation_server.models.custom_modeling.flash_internlm2_modeling_ascend import (
    fuse_wqkv,
    split_wqkv,
)
from text_generation_server.models.flash_internlm2 import CHAT_TURN_END
from text_generation_server.utils.weights import BIN_INDEX, IGNORED_TENSORS, SAFETENSORS_INDEX

INTERNLM2 = "InternLM2ForCausalLM"
LLAMA = "LlamaForCausalLM"


# (InternLM2 name, Llama name) outside the layers.
GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    ("model.tok_embeddings.weight", "model.embed_tokens.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
# (InternLM2 leaf, Llama leaf) under `model.layers.N.`; wqkv <-> q/k/v_proj is handled separately.
LAYER_LEAVES: tuple[tuple[str, str], ...] = (
    ("attention_norm.weight", "input_layernorm.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("attention.wo.bias", "self_attn.o_proj.bias"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
)
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")

# Raw sentencepiece names of InternLM2's special pieces and the names tokenizer_config.json gives them;
# used when a source has no added_tokens_decoder to take the names from.
INTERNLM2_SPECIAL_PIECES: dict[str, str] = {
    "[UNUSED_TOKEN_141]": "<|plugin|>",
    "[UNUSED_TOKEN_142]": "<|interpreter|>",
    "[UNUSED_TOKEN_143]": "<|action_end|>",
    "[UNUSED_TOKEN_144]": "<|action_start|>",
    "[UNUSED_TOKEN_145]": "<|im_end|>",
    "[UNUSED_TOKEN_146]": "<|im_start|>",
}

# Files handled explicitly (or deliberately not carried): never copied verbatim.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
HANDLED_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    SAFETENSORS_INDEX,
    BIN_INDEX,
}

# --verify: max |logit difference| allowed, by the least precise weight dtype of the two sides. Both sides are
# evaluated in float32, so identical weights agree to float32 rounding; a `--dtype` downcast adds the rounding
# of the weights themselves, which scales with the logits (the bound is multiplied by max(1, max |logit|)).
VERIFY_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


class ConversionError(Exception):
    """A checkpoint or an argument that cannot be converted; the message is shown to the user as is."""


# ------------------------------------------------------------------------------------------ reading input


@dataclass(frozen=True)
class InputShard:
    path: Path
    tensor_names: tuple[str, ...]

    @property
    def output_name(self) -> str:
        """`pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`; others unchanged."""
        name = self.path.name
        if name.endswith(".bin"):
            name = name.removesuffix(".bin").removeprefix("pytorch_") + ".safetensors"
        return name


def _is_memory_mappable(path: Path) -> bool:
    # torch.save's zip format (the default since torch 1.6) can be memory-mapped; the legacy format cannot.
    return zipfile.is_zipfile(path)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, memory-mapped when possible so that reading one tensor does not load the file."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_memory_mappable(path))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return state


class CheckpointReader:
    """Tensors by name across the input shards; files are opened lazily and read one tensor at a time.

    Safetensors handles and memory-mapped `.bin` dicts cost no resident memory, so they are kept open. A
    legacy (non-zip) `.bin` is fully loaded, so at most one such file is kept at a time.
    """

    def __init__(self, shards: Sequence[InputShard]):
        self.shard_of: dict[str, InputShard] = {}
        for shard in shards:
            for name in shard.tensor_names:
                if name in self.shard_of:
                    raise ConversionError(
                        f"tensor {name} is in both {self.shard_of[name].path.name} and {shard.path.name}"
                    )
                self.shard_of[name] = shard
        self._open: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        path = self.shard_of[name].path
        if path.suffix == ".safetensors":
            if path not in self._open:
                self._open[path] = safe_open(path, framework="pt")
            return self._open[path].get_tensor(name)
        if path not in self._open:
            if not _is_memory_mappable(path):
                self._forget_loaded_bins()
            self._open[path] = _load_bin(path)
        return self._open[path][name]

    def _forget_loaded_bins(self) -> None:
        for path in [p for p in self._open if p.suffix == ".bin" and not _is_memory_mappable(p)]:
            del self._open[path]


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; invalid JSON is refused naming the file."""
    try:
        payload = read_json(path)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    if not isinstance(payload, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return payload


def _read_weight_map(index: Path) -> dict[str, str]:
    weight_map = read_json_file(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no weight_map")
    return weight_map


def _tensor_names_in_file(path: Path) -> tuple[str, ...]:
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            return tuple(handle.keys())
    return tuple(_load_bin(path).keys())


def find_input_shards(src: Path) -> list[InputShard]:
    """The weight files of `src` in order: from its index if it has one, else every weight file.

    safetensors are preferred over `.bin` when a directory holds both (they are the same weights).
    """
    for index_name, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        index = src / index_name
        if index.exists():
            weight_map = _read_weight_map(index)
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (src / name).is_file()]
            if missing:
                raise ConversionError(f"{index} lists weight files missing from {src}: {', '.join(missing)}")
            names_by_file: dict[str, list[str]] = {name: [] for name in files}
            for tensor_name, file_name in weight_map.items():
                names_by_file[file_name].append(tensor_name)
            return [InputShard(src / name, tuple(names_by_file[name])) for name in files]
        paths = sorted(src.glob(pattern))
        if paths:
            return [InputShard(path, _tensor_names_in_file(path)) for path in paths]
    raise ConversionError(f"{src} has no weights: no *.safetensors and no pytorch_model*.bin")


# ------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Step:
    """Produce some output tensors from some input tensors (read together, e.g. q/k/v for one wqkv)."""

    inputs: tuple[str, ...]
    produce: Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]


def _rename(new_name: str) -> Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda tensors: {new_name: tensors[0]}


def _check_rows(name: str, tensor: torch.Tensor, rows: int, hidden: int | None) -> None:
    expected = (rows,) if hidden is None else (rows, hidden)
    if tuple(tensor.shape) != expected:
        raise ConversionError(
            f"tensor {name} has shape {list(tensor.shape)}, but config.json implies {list(expected)}"
        )


def _split_step(config: ModelConfig, layer: int, kind: str) -> Step:
    """wqkv.{weight|bias} of one layer -> q/k/v_proj.{weight|bias} (per-KV-group layout, §3.2)."""
    source = f"model.layers.{layer}.attention.wqkv.{kind}"
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    hidden = config.hidden_size if kind == "weight" else None

    def produce(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        (wqkv,) = tensors
        _check_rows(source, wqkv, rows, hidden)
        parts = split_wqkv(wqkv, config.num_key_value_heads, config.num_queries_per_kv, config.head_dim)
        return {
            f"model.layers.{layer}.self_attn.{projection}.{kind}": part
            for projection, part in zip(QKV_PROJECTIONS, parts, strict=True)
        }

    return Step((source,), produce)


def _fuse_step(config: ModelConfig, layer: int, kind: str) -> Step:
    """q/k/v_proj.{weight|bias} of one layer -> wqkv.{weight|bias} (the inverse of `_split_step`)."""
    sources = tuple(f"model.layers.{layer}.self_attn.{projection}.{kind}" for projection in QKV_PROJECTIONS)
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    hidden = config.hidden_size if kind == "weight" else None

    def produce(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, tensor, rows in zip(sources, tensors, (q_rows, kv_rows, kv_rows), strict=True):
            _check_rows(name, tensor, rows, hidden)
        q, k, v = tensors
        wqkv = fuse_wqkv(q, k, v, config.num_key_value_heads, config.head_dim)
        return {f"model.layers.{layer}.attention.wqkv.{kind}": wqkv}

    return Step(sources, produce)


def _expected_layer_leaves(architecture: str, config: ModelConfig) -> set[str]:
    if architecture == INTERNLM2:
        leaves = {internlm2 for internlm2, _ in LAYER_LEAVES} | {
            "attention.wqkv.weight",
            "attention.wqkv.bias",
        }
    else:
        leaves = {llama for _, llama in LAYER_LEAVES}
        leaves |= {f"self_attn.{p}.{kind}" for p in QKV_PROJECTIONS for kind in ("weight", "bias")}
    if not config.attention_bias:
        leaves = {leaf for leaf in leaves if not leaf.endswith(".bias")}
    return leaves


def check_tensor_names(names: Sequence[str], architecture: str, config: ModelConfig) -> None:
    """Refuse a checkpoint whose tensors do not match its config: unknown, missing or extra-layer names."""
    globals_ = {pair[0 if architecture == INTERNLM2 else 1] for pair in GLOBAL_NAMES}
    head = "output.weight" if architecture == INTERNLM2 else "lm_head.weight"
    leaves = _expected_layer_leaves(architecture, config)
    present = set(names)
    for name in names:
        match = LAYER_NAME.match(name)
        if match is None:
            if name not in globals_:
                raise ConversionError(f"unexpected tensor {name} in a {architecture} checkpoint")
            continue
        layer, leaf = int(match.group(1)), match.group(2)
        if leaf not in leaves:
            raise ConversionError(f"unexpected tensor {name} in a {architecture} checkpoint")
        if layer >= config.num_hidden_layers:
            raise ConversionError(
                f"tensor {name} is beyond num_hidden_layers={config.num_hidden_layers} of config.json"
            )
    required = {name for name in globals_ if name != head or not config.tie_word_embeddings}
    required |= {f"model.layers.{i}.{leaf}" for i in range(config.num_hidden_layers) for leaf in leaves}
    missing = sorted(required - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"the checkpoint lacks tensor {missing[0]}{more}")


def internlm2_to_llama_steps(names: Sequence[str], config: ModelConfig) -> list[Step]:
    renames = dict(GLOBAL_NAMES)
    layer_renames = dict(LAYER_LEAVES)
    steps = []
    for name in names:
        match = LAYER_NAME.match(name)
        if match is None:
            steps.append(Step((name,), _rename(renames[name])))
            continue
        layer, leaf = int(match.group(1)), match.group(2)
        if leaf.startswith("attention.wqkv."):
            steps.append(_split_step(config, layer, leaf.rsplit(".", 1)[1]))
        else:
            steps.append(Step((name,), _rename(f"model.layers.{layer}.{layer_renames[leaf]}")))
    return steps


def llama_to_internlm2_steps(names: Sequence[str], config: ModelConfig) -> list[Step]:
    """One step per tensor, except q/k/v: one fuse step per layer and kind, anchored at its q_proj."""
    renames = {llama: internlm2 for internlm2, llama in GLOBAL_NAMES}
    layer_renames = {llama: internlm2 for internlm2, llama in LAYER_LEAVES}
    steps = []
    for name in names:
        match = LAYER_NAME.match(name)
        if match is None:
            if name == "model.embed_tokens.weight" and "lm_head.weight" not in names:
                # A tied Llama has no lm_head tensor; InternLM2 loaders expect `output.weight`.
                steps.append(
                    Step((name,), lambda t: {"model.tok_embeddings.weight": t[0], "output.weight": t[0]})
                )
            else:
                steps.append(Step((name,), _rename(renames[name])))
            continue
        layer, leaf = int(match.group(1)), match.group(2)
        projection, _, kind = leaf.removeprefix("self_attn.").partition(".")
        if leaf.startswith("self_attn.") and projection in QKV_PROJECTIONS:
            if projection == "q_proj":  # k_proj/v_proj are read by this step, wherever they are stored
                steps.append(_fuse_step(config, layer, kind))
        else:
            steps.append(Step((name,), _rename(f"model.layers.{layer}.{layer_renames[leaf]}")))
    return steps


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """A one-line progress bar on stderr: redrawn in place on a terminal, one line per shard otherwise."""

    WIDTH = 24

    def __init__(self, label: str, total: int, *, enabled: bool = True):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()

    def advance(self) -> None:
        self.done += 1
        if self.interactive:
            self._draw(end="")

    def close(self) -> None:
        if self.enabled:
            self._draw(end="\n")

    def _draw(self, end: str) -> None:
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        prefix = "\r" if self.interactive else ""
        print(
            f"{prefix}{self.label} [{bar}] {self.done}/{self.total} tensors",
            end=end,
            file=sys.stderr,
            flush=True,
        )


# ------------------------------------------------------------------------------------------ writing weights


def _prepare_output(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    # A fresh contiguous copy: split parts are views sharing one storage, which safetensors refuses, and
    # memory-mapped inputs must not be referenced once their file handle is gone.
    return tensor.clone(memory_format=torch.contiguous_format)


def convert_weights(
    shards: Sequence[InputShard],
    reader: CheckpointReader,
    steps: Sequence[Step],
    out_dir: Path,
    *,
    dtype: torch.dtype | None,
    show_progress: bool,
) -> None:
    """Run the steps shard by shard: a step's outputs go to the output shard of its first input.

    Peak memory is one output shard plus the inputs of one step (e.g. q/k/v of a layer stored elsewhere).
    """
    steps_by_shard: dict[Path, list[Step]] = {shard.path: [] for shard in shards}
    for step in steps:
        steps_by_shard[reader.shard_of[step.inputs[0]].path].append(step)
    weight_map: dict[str, str] = {}
    total_size = 0
    written: list[str] = []
    for number, shard in enumerate(shards, start=1):
        shard_steps = steps_by_shard[shard.path]
        progress = Progress(
            f"[{number}/{len(shards)}] {shard.output_name}", len(shard_steps), enabled=show_progress
        )
        outputs: dict[str, torch.Tensor] = {}
        for step in shard_steps:
            produced = step.produce([reader.get(name) for name in step.inputs])
            for name, tensor in produced.items():
                outputs[name] = _prepare_output(tensor, dtype)
            progress.advance()
        progress.close()
        if not outputs:  # e.g. a shard holding only k/v projections fused into another shard's wqkv
            continue
        save_file(outputs, str(out_dir / shard.output_name), metadata={"format": "pt"})
        weight_map.update({name: shard.output_name for name in outputs})
        total_size += sum(t.numel() * t.element_size() for t in outputs.values())
        written.append(shard.output_name)
        del outputs
    if len(written) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(out_dir / SAFETENSORS_INDEX, index)
    elif written and written[0] != "model.safetensors":
        (out_dir / written[0]).rename(out_dir / "model.safetensors")


# ------------------------------------------------------------------------------------------ configs


# Keys carried unchanged between the two configs when present.
CARRIED_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache")


def _rope_fields(config: ModelConfig) -> dict[str, Any]:
    # {"type", "factor"} exactly: InternLM2Config's validation rejects any other key; transformers' Llama
    # reads this spelling too.
    scaling = None
    if config.rope_scaling is not None:
        scaling = {"type": config.rope_scaling.type, "factor": config.rope_scaling.factor}
    return {"rope_theta": config.rope_theta, "rope_scaling": scaling}


def _dtype_name(raw: dict[str, Any], dtype: torch.dtype | None) -> str | None:
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    return raw.get("torch_dtype") or raw.get("dtype")


def _shared_fields(raw: dict[str, Any], config: ModelConfig, dtype: torch.dtype | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        **_rope_fields(config),
    }
    fields.update({key: raw[key] for key in CARRIED_CONFIG_KEYS if key in raw})
    dtype_name = _dtype_name(raw, dtype)
    if dtype_name is not None:
        fields["torch_dtype"] = dtype_name
    return fields


def internlm2_config_to_llama(
    raw: dict[str, Any], config: ModelConfig, dtype: torch.dtype | None
) -> dict[str, Any]:
    return {
        "architectures": [LLAMA],
        "model_type": "llama",
        **_shared_fields(raw, config, dtype),
        "head_dim": config.head_dim,
        "attention_bias": config.attention_bias,  # InternLM2 `bias` covers wqkv and wo, Llama's q/k/v/o
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def llama_config_to_internlm2(
    raw: dict[str, Any], config: ModelConfig, dtype: torch.dtype | None
) -> dict[str, Any]:
    if raw.get("mlp_bias"):
        raise ConversionError("config.json has mlp_bias=true; InternLM2 has no MLP biases")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ConversionError(
            f"config.json has head_dim={config.head_dim} with {config.num_attention_heads} heads and "
            f"hidden_size={config.hidden_size}; InternLM2 needs head_dim = hidden_size / num_attention_heads"
        )
    return {
        "architectures": [INTERNLM2],
        "model_type": "internlm2",
        **_shared_fields(raw, config, dtype),
        "bias": config.attention_bias,
        "attn_implementation": "eager",
        # output.weight is always written (copied from the embeddings for a tied Llama).
        "tie_word_embeddings": False,
    }


# ------------------------------------------------------------------------------------------ tokenizer


def _load_sentencepiece_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf's DecodeError; re-raised as a message naming the file
        raise ConversionError(f"{path} is not a sentencepiece model: {error}") from error
    return proto


def _added_token_names(tokenizer_config: dict[str, Any]) -> dict[int, str]:
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    names = {}
    for token_id, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            names[int(token_id)] = content
    return names


def special_piece_renames(proto: Any, tokenizer_config: dict[str, Any]) -> dict[int, str]:
    """id -> new piece name for pieces whose name in tokenizer.model differs from the configured name."""
    configured = _added_token_names(tokenizer_config)
    renames = {}
    for token_id, piece in enumerate(proto.pieces):
        name = configured.get(token_id, INTERNLM2_SPECIAL_PIECES.get(piece.piece))
        if name is not None and name != piece.piece:
            renames[token_id] = name
    existing = {piece.piece: token_id for token_id, piece in enumerate(proto.pieces)}
    for token_id, name in renames.items():
        clash = existing.get(name)
        if clash is not None and clash not in renames:
            raise ConversionError(
                f"cannot name token {token_id} {name!r}: tokenizer.model already has that piece at id {clash}"
            )
    return renames


def rename_special_pieces(proto: Any, renames: dict[int, str]) -> None:
    """Give the pieces their configured names, as USER_DEFINED pieces: sentencepiece (and every converter
    built on it) matches such a piece in text as one token and decodes it back to its name."""
    user_defined = type(proto.pieces[0]).USER_DEFINED
    for token_id, name in renames.items():
        proto.pieces[token_id].piece = name
        proto.pieces[token_id].type = user_defined


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def llama_tokenizer_config(
    src_config: dict[str, Any], renames: dict[int, str], add_dummy_prefix: bool
) -> dict[str, Any]:
    """tokenizer_config.json for transformers' LlamaTokenizer: no remote code, same ids, same template."""
    config = {
        key: value for key, value in src_config.items() if key not in ("auto_map", "decode_with_prefix_space")
    }
    if config.get("sp_model_kwargs") is None:
        config.pop("sp_model_kwargs", None)  # null is not a valid value for sentencepiece-backed tokenizers
    config["tokenizer_class"] = "LlamaTokenizer"
    # LlamaTokenizer prepends "▁" unless told not to; follow what the sentencepiece model itself does.
    config["add_prefix_space"] = add_dummy_prefix
    decoder = dict(config.get("added_tokens_decoder") or {})
    for token_id, name in renames.items():
        entry = dict(decoder.get(str(token_id)) or _added_token_entry(name))
        entry["content"] = name
        decoder[str(token_id)] = entry
    config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda item: int(item[0])))
    return config


def write_llama_tokenizer(src: Path, out_dir: Path) -> dict[str, Any]:
    """Write tokenizer.model (special pieces renamed) and tokenizer_config.json; return the config written."""
    config_path = src / "tokenizer_config.json"
    src_config = read_json_file(config_path) if config_path.exists() else {}
    if not (src / "tokenizer.model").exists():
        # A tokenizer.json already names its added tokens; carry it and the config without the remote code.
        shutil.copy2(src / "tokenizer.json", out_dir / "tokenizer.json")
        config = {k: v for k, v in src_config.items() if k != "auto_map"}
        config["tokenizer_class"] = "LlamaTokenizer"
        write_json(out_dir / "tokenizer_config.json", config)
        return config
    proto = _load_sentencepiece_proto(src / "tokenizer.model")
    renames = special_piece_renames(proto, src_config)
    rename_special_pieces(proto, renames)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    # tokenizer.json is not carried: InternLM2's was built by its own remote converter; transformers rebuilds
    # an equivalent one from the fixed tokenizer.model.
    config = llama_tokenizer_config(src_config, renames, bool(proto.normalizer_spec.add_dummy_prefix))
    write_json(out_dir / "tokenizer_config.json", config)
    return config


def copy_tokenizer(src: Path, out_dir: Path) -> dict[str, Any]:
    """Llama -> InternLM2: the tokenizer files as they are (the native tokenizer reads `<|...|>` pieces)."""
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy2(src / name, out_dir / name)
    return read_json_file(src / "tokenizer_config.json") if (src / "tokenizer_config.json").exists() else {}


def _token_id(name: str, tokenizer_config: dict[str, Any], out_dir: Path) -> int | None:
    for token_id, content in _added_token_names(tokenizer_config).items():
        if content == name:
            return token_id
    if (out_dir / "tokenizer.model").exists():
        for token_id, piece in enumerate(_load_sentencepiece_proto(out_dir / "tokenizer.model").pieces):
            if piece.piece == name:
                return token_id
    return None


def generation_config(src: Path, raw_config: dict[str, Any], turn_end_id: int | None) -> dict[str, Any]:
    """SRC's generation_config.json (or the config's ids), with every EOS id kept and `<|im_end|>` added."""
    path = src / "generation_config.json"
    config = read_json_file(path) if path.exists() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is None and raw_config.get(key) is not None:
            config[key] = raw_config[key]
    eos = config.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    if turn_end_id is not None and turn_end_id not in eos_ids:
        eos_ids.append(turn_end_id)
    if eos_ids:
        config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    return config


def copy_other_files(src: Path, out_dir: Path) -> None:
    """README, LICENSE, special_tokens_map.json, chat templates...: every top-level file not handled above,
    except weights and Python files (remote code for the other architecture must not come along)."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in HANDLED_FILES:
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.suffix == ".py" or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, out_dir / path.name)


# ------------------------------------------------------------------------------------------ verification


def _native_view(model_dir: Path, scratch: Path) -> Path:
    """A directory the native engine can load without writing into `model_dir`.

    `get_model` converts a `.bin`-only checkpoint to safetensors inside the directory it is given; SRC must
    stay untouched, so such a directory is presented through symlinks in `scratch`.
    """
    if any(model_dir.glob("*.safetensors")):
        return model_dir
    for path in model_dir.iterdir():
        if path.is_file():
            (scratch / path.name).symlink_to(path.resolve())
    return scratch


def verify_logits(
    internlm2_dir: Path, llama_dir: Path, *, tolerance: float, prompts: int = 3, seed: int = 0
) -> float:
    """Max |logit difference| between our native InternLM2 and transformers' LlamaForCausalLM, float32 on CPU.

    Raises ConversionError above `tolerance` (scaled by max(1, max |logit|)).
    """
    try:
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    except ImportError as error:
        raise ConversionError(f"--verify needs transformers installed ({error})") from error
    from text_generation_server.models import get_model

    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        native = get_model(_native_view(internlm2_dir, Path(scratch)), dtype="float32", device="cpu")
        reference = LlamaForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
        vocab = native.config.vocab_size
        lengths = [min(n, native.config.max_position_embeddings) for n in (1, 9, 40)][:prompts]
        native.allocate_kv_cache(num_blocks=max(lengths) // native.block_size + 2)
        generator = torch.Generator().manual_seed(seed)
        worst, scale = 0.0, 1.0
        for length in lengths:
            prompt = torch.randint(0, vocab, (length,), generator=generator).tolist()
            # transformers keeps an enlarged dynamic-NTK base between calls; each prompt starts afresh.
            reference.model.rotary_emb = LlamaRotaryEmbedding(reference.config)
            with torch.no_grad():
                expected = reference(torch.tensor([prompt])).logits[0].float()
                got = native.prompt_logits(prompt)
            worst = max(worst, (got - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    bound = tolerance * scale
    print(
        f"verify: max |logit difference| {worst:.3e} over {len(lengths)} prompts (tolerance {bound:.1e})",
        file=sys.stderr,
    )
    if not worst <= bound:  # also fails on NaN
        raise ConversionError(f"verification failed: max |logit difference| {worst:.3e} exceeds {bound:.1e}")
    return worst


def _weight_dtype(model_dir: Path) -> torch.dtype:
    shards = find_input_shards(model_dir)
    reader = CheckpointReader(shards[:1])
    first = next(iter(reader.shard_of))
    return reader.get(first).dtype


def verify_tolerance(src: Path, out_dir: Path) -> float:
    least_precise = max(
        (_weight_dtype(src), _weight_dtype(out_dir)), key=lambda d: VERIFY_TOLERANCE.get(d, 5e-2)
    )
    return VERIFY_TOLERANCE.get(least_precise, 5e-2)


# ------------------------------------------------------------------------------------------ the conversion


def write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_source_config(src: Path, expected: str) -> tuple[dict[str, Any], ModelConfig]:
    from text_generation_server.models import resolve_architecture

    if not src.is_dir():
        raise ConversionError(f"SRC {src} is not a directory")
    if not (src / "config.json").is_file():
        raise ConversionError(f"SRC {src} has no config.json")
    try:
        raw = read_json(src / "config.json")
        architecture = resolve_architecture(raw)
        if architecture != expected:
            other = (
                "convert_llama_to_internlm2.py" if architecture == LLAMA else "convert_internlm2_to_llama.py"
            )
            raise ConversionError(f"SRC {src} holds {architecture}, not {expected} (use {other})")
        return raw, ModelConfig.from_dict(raw, architecture)
    except ValueError as error:  # unsupported architecture, rope type, activation, head counts...
        raise ConversionError(f"SRC {src}: {error}") from error


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if (
        src_resolved == dst_resolved
        or src_resolved in dst_resolved.parents
        or dst_resolved in src_resolved.parents
    ):
        raise ConversionError(f"DST {dst} must not be SRC {src}, inside it, or contain it")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise ConversionError(f"DST {dst} already exists (pass --force to replace it)")
        if not dst.is_dir():
            raise ConversionError(f"DST {dst} exists and is not a directory")
    if not dst.parent.is_dir():
        raise ConversionError(f"the parent directory of DST {dst} does not exist")
    if not os.access(dst.parent, os.W_OK):
        raise ConversionError(f"the parent directory of DST {dst} is not writable")


def _check_tokenizer_present(src: Path) -> None:
    if not (src / "tokenizer.model").exists() and not (src / "tokenizer.json").exists():
        raise ConversionError(f"SRC {src} has no tokenizer (neither tokenizer.model nor tokenizer.json)")


@dataclass(frozen=True)
class Direction:
    source: str
    target: str
    plan: Callable[[Sequence[str], ModelConfig], list[Step]]
    map_config: Callable[[dict[str, Any], ModelConfig, torch.dtype | None], dict[str, Any]]
    write_tokenizer: Callable[[Path, Path], dict[str, Any]]


TO_LLAMA = Direction(
    INTERNLM2, LLAMA, internlm2_to_llama_steps, internlm2_config_to_llama, write_llama_tokenizer
)
TO_INTERNLM2 = Direction(
    LLAMA, INTERNLM2, llama_to_internlm2_steps, llama_config_to_internlm2, copy_tokenizer
)


def convert_checkpoint(
    direction: Direction,
    src: Path,
    dst: Path,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    verify: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert `src` into `dst`; see the module docstring. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    raw, config = _read_source_config(src, direction.source)
    _check_destination(src, dst, force)
    _check_tokenizer_present(src)
    shards = find_input_shards(src)
    reader = CheckpointReader(shards)
    names = [name for name in reader.shard_of if not IGNORED_TENSORS.search(name)]
    check_tensor_names(names, direction.source, config)
    target_config = direction.map_config(raw, config, dtype)

    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        write_json(work / "config.json", target_config)
        copy_other_files(src, work)
        tokenizer_config = direction.write_tokenizer(src, work)
        write_json(
            work / "generation_config.json",
            generation_config(src, raw, _token_id(CHAT_TURN_END, tokenizer_config, work)),
        )
        convert_weights(
            shards, reader, direction.plan(names, config), work, dtype=dtype, show_progress=show_progress
        )
        if verify:
            internlm2_dir, llama_dir = (src, work) if direction is TO_LLAMA else (work, src)
            verify_logits(internlm2_dir, llama_dir, tolerance=verify_tolerance(src, work))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


# ------------------------------------------------------------------------------------------ command line


def build_arg_parser(direction: Direction) -> argparse.ArgumentParser:
    source, target = ("InternLM2", "Llama") if direction is TO_LLAMA else ("Llama", "InternLM2")
    parser = argparse.ArgumentParser(
        description=f"Convert a Hugging Face {source} checkpoint directory into a {target} one.",
    )
    parser.add_argument("src", type=Path, help=f"the {source} checkpoint directory (read only)")
    parser.add_argument("dst", type=Path, help=f"the {target} checkpoint directory to create")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep their dtype)"
    )
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare logits of both sides on random prompts (needs transformers) before DST is created",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(direction: Direction, argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser(direction).parse_args(argv)
    try:
        dst = convert_checkpoint(
            direction,
            args.src,
            args.dst,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            force=args.force,
            verify=args.verify,
            show_progress=not args.quiet,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(dst)
    return 0
