"""The model's shape, read from a Hugging Face `config.json` without running any code from the model repo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROPE_SCALING_TYPES = ("linear", "dynamic")

# What InternLM2Config and LlamaConfig assume when a key is absent (InternLM2's own configuration class; transformers' LlamaConfig).
_DEFAULTS = {
    "InternLM2ForCausalLM": dict(
        vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        bias=True, tie_word_embeddings=False,
    ),
    "LlamaForCausalLM": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        bias=False, tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True)
class RopeScaling:
    type: str  # "linear" or "dynamic"
    factor: float


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    attention_bias: bool  # InternLM2 `bias` (wqkv and wo biases); Llama `attention_bias` (q/k/v/o biases)
    tie_word_embeddings: bool

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def check_world_size(self, world_size: int) -> None:
        """Tensor parallelism splits heads, KV heads and the MLP evenly: refuse a world size that cannot."""
        sizes = (self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)
        if all(size % world_size == 0 for size in sizes):
            return
        valid = [n for n in range(1, self.num_key_value_heads + 1) if all(size % n == 0 for size in sizes)]
        raise ValueError(
            f"world size {world_size} does not divide the model's {self.num_key_value_heads} KV heads and "
            f"{self.num_attention_heads} attention heads (intermediate size {self.intermediate_size}); "
            f"valid world sizes: {', '.join(map(str, valid))}"
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], architecture: str) -> ModelConfig:
        defaults = _DEFAULTS[architecture]

        def get(key: str, fallback_key: str | None = None) -> Any:
            if key in raw and raw[key] is not None:
                return raw[key]
            if fallback_key is not None and raw.get(fallback_key) is not None:
                return raw[fallback_key]
            return defaults[key]

        activation = raw.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"hidden_act {activation!r} is not supported; only 'silu' is")
        heads = int(get("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        hidden = int(get("hidden_size"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads != 0:
            raise ValueError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        if raw.get("head_dim") is None and hidden % heads != 0:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        rope_theta, rope_scaling = _parse_rope(raw, float(defaults["rope_theta"]))
        return cls(
            architecture=architecture,
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(get("max_position_embeddings")),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=bool(get("bias", "attention_bias")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
        )


def _parse_rope(raw: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """rope_theta and rope_scaling in each spelling seen in the wild.

    `rope_scaling` may say `type` or (re-saved by newer transformers) `rope_type`; transformers 5 writes
    `rope_parameters` holding both the theta and the scaling; the first internlm2-7b config used
    `"rotary": {"base": ..., "type": "dynamic"}` with no factor.
    """
    theta = raw.get("rope_theta")
    scaling = raw.get("rope_scaling")
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, dict):
        theta = parameters.get("rope_theta", theta)
        scaling = scaling or parameters
    rotary = raw.get("rotary")
    if isinstance(rotary, dict):
        theta = rotary.get("base", theta)
        scaling = scaling or {"type": rotary.get("type"), "factor": rotary.get("factor", 1.0)}
    theta = float(theta) if theta is not None else default_theta
    if not scaling:
        return theta, None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind in (None, "default"):
        return theta, None
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_SCALING_TYPES)}"
        )
    factor = float(scaling.get("factor", 1.0))
    if factor < 1.0:
        raise ValueError(f"rope_scaling factor must be >= 1.0, got {factor}")
    return theta, RopeScaling(kind, factor)


def rope_override(kind: str | None, factor: float | None) -> RopeScaling | None:
    """The rope scaling `--rope-scaling` / `--rope-factor` ask for instead of the config's (None: keep the
    config's). As in TGI, a factor alone means linear; a type alone has factor 1.0, which under dynamic NTK still
    stretches the base for sequences longer than max_position_embeddings."""
    if kind is None and factor is None:
        return None
    kind = kind or "linear"
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"--rope-scaling must be one of {', '.join(ROPE_SCALING_TYPES)}, got {kind!r}")
    factor = 1.0 if factor is None else float(factor)
    if not factor >= 1.0:
        raise ValueError(f"--rope-factor must be >= 1.0, got {factor}")
    return RopeScaling(kind, factor)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def read_eos_token_ids(model_dir: Path, config: dict[str, Any]) -> tuple[int, ...]:
    """Every EOS id the model may end with: generation_config.json's list (or int), else config.json's."""
    generation_config = model_dir / "generation_config.json"
    eos = read_json(generation_config).get("eos_token_id") if generation_config.exists() else None
    if eos is None:
        eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
