"""Reading checkpoint tensors: `.safetensors` memory-mapped, `.bin` converted once beside them.

Every tensor of the checkpoint must be consumed by the model: `Weights` records what was read, and
`check_all_used` fails on anything left over, so a checkpoint that does not fit the config is refused
instead of silently half-loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file

from text_generation_server.ops import Ops
from text_generation_server.utils.dist import SINGLE_RANK, TensorParallelGroup

# Buffers some exporters save that are not weights: recomputed by the model, never loaded.
IGNORED_TENSORS = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$")

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's `.safetensors` files, converting `pytorch_model*.bin` first if that is all there is."""
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        names = sorted(set(_read_index(index).values()))
        missing = [name for name in names if not (model_dir / name).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists files that are not in {model_dir}: {', '.join(missing)}")
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if (model_dir / BIN_INDEX).exists() or list(model_dir.glob("pytorch_model*.bin")):
        return convert_bin_checkpoint(model_dir)
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {model_dir}")


def _read_index(index: Path) -> dict[str, str]:
    with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map")
    return weight_map


def convert_bin_checkpoint(model_dir: Path) -> list[Path]:
    """Write `*.safetensors` beside each `pytorch_model*.bin` and the matching index; return the new files.

    `torch.load(weights_only=True)` never runs pickled code. Tensors that share storage are cloned (safetensors
    refuses shared storage), and each written file is read back and compared before the index is written, so
    an interrupted conversion leaves no index that points at a broken file.
    """
    bin_index = model_dir / BIN_INDEX
    if bin_index.exists():
        bin_files = sorted(set(_read_index(bin_index).values()))
    else:
        bin_files = sorted(path.name for path in model_dir.glob("pytorch_model*.bin"))
    weight_map: dict[str, str] = {}
    total_size = 0
    converted = []
    for bin_name in bin_files:
        target = model_dir / _safetensors_name(bin_name)
        logger.info(f"converting {model_dir / bin_name} to {target.name}")
        state = torch.load(model_dir / bin_name, map_location="cpu", weights_only=True)
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        tensors = {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}
        save_file(tensors, target, metadata={"format": "pt"})
        with safe_open(target, framework="pt") as reread:
            for name, tensor in tensors.items():
                if not torch.equal(reread.get_tensor(name), tensor):
                    raise RuntimeError(f"conversion of {bin_name} to {target.name} changed tensor {name}")
        weight_map.update({name: target.name for name in tensors})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        converted.append(target)
    if len(converted) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        with open(model_dir / SAFETENSORS_INDEX, "w") as f:
            json.dump(index, f, indent=2)
    return converted


def _safetensors_name(bin_name: str) -> str:
    """`pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`, as Hugging Face names them."""
    stem = bin_name.removesuffix(".bin")
    stem = stem.removeprefix("pytorch_")
    return f"{stem}.safetensors"


class Weights:
    """Tensors by name across all files, cast to the model dtype and copied onto the device when read.

    Reads copy into ordinary memory: a memory-mapped weight that sits idle may be paged out by the host and
    must then come back from disk in the middle of a request.
    """

    def __init__(
        self,
        files: Sequence[Path],
        dtype: torch.dtype,
        device: torch.device,
        tp: TensorParallelGroup = SINGLE_RANK,
        *,
        ops: Ops,
    ):
        self.dtype = dtype
        self.device = device
        self.tp = tp  # which slices the layers read: see layers/linear.py
        self.ops = ops  # the kernels the layers will compute with (each prepares its weights with them)
        self._routing: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._used: set[str] = set()
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in self._routing:
                        raise ValueError(f"tensor {name} appears in both {self._routing[name]} and {path}")
                    self._routing[name] = path
                    self._shapes[name] = tuple(f.get_slice(name).get_shape())
        self._handles: dict[Path, object] = {}

    def names(self) -> Iterable[str]:
        return self._routing.keys()

    def has(self, name: str) -> bool:
        return name in self._routing

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name, None)
        return self._shapes[name]

    def get_tensor(self, name: str, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The whole tensor; `shape` is what the model expects (checked, naming both shapes on mismatch)."""
        self._require(name, shape)
        tensor = self._file(name).get_tensor(name)
        return self._finish(name, tensor)

    def get_rows(self, name: str, start: int, stop: int, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Rows [start, stop) of dim 0, reading only those bytes. `shape` is the expected full shape."""
        self._require(name, shape)
        tensor = self._file(name).get_slice(name)[start:stop]
        return self._finish(name, tensor)

    def get_columns(self, name: str, start: int, stop: int, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Columns [start, stop) of dim 1. `shape` is the expected full shape."""
        self._require(name, shape)
        tensor = self._file(name).get_slice(name)[:, start:stop]
        return self._finish(name, tensor)

    def check_all_used(self) -> None:
        """Raise if the checkpoint holds tensors that no module of the model took."""
        unused = [
            name for name in self._routing if name not in self._used and not IGNORED_TENSORS.search(name)
        ]
        if unused:
            listed = ", ".join(f"{name} {list(self._shapes[name])}" for name in sorted(unused)[:10])
            more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
            raise ValueError(f"the checkpoint has tensors this model does not use: {listed}{more}")

    def close(self) -> None:
        self._handles.clear()

    def _require(self, name: str, shape: Sequence[int] | None) -> None:
        if name not in self._routing:
            expected = f" (expected shape {list(shape)})" if shape is not None else ""
            raise ValueError(f"the checkpoint is missing tensor {name}{expected}")
        if shape is not None and tuple(shape) != self._shapes[name]:
            raise ValueError(
                f"tensor {name} has shape {list(self._shapes[name])} in the checkpoint "
                f"but the config implies {list(shape)}"
            )
        self._used.add(name)

    def _file(self, name: str):
        path = self._routing[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def _finish(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        # copy=True: own, anonymous memory instead of a view of the memory map
        return tensor.to(device=self.device, dtype=dtype, copy=True)
