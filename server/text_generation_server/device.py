"""The one place that knows which accelerator runs the model.

CPU is the default and the reference. CUDA and Ascend NPU (`torch_npu`) are chosen here and nowhere else:
the rest of the server asks this module for the device, for synchronisation and for free memory, and
never calls `torch.cuda` or `torch_npu` itself (the NPU kernels are ops/npu.py's).

On an NPU, as Ascend deployments expect: the cards a process sees are those of ASCEND_RT_VISIBLE_DEVICES (numbered
0 … n−1 by the runtime), rank r of a tensor-parallel world takes card r (one rank per NPU; a world larger than the
visible cards is refused), kernels are the prebuilt binaries (`set_compile_mode(jit_compile=False)`: the op
constraints ops/npu.py checks are the ones documented for that mode), and NPU_MEMORY_FRACTION (default 1) caps the
share of the card this process may take (`set_per_process_memory_fraction`); the KV cache is sized from the free
memory `mem_get_info` reports, less what that cap keeps out of reach.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

DEVICE_KINDS = ("auto", "cpu", "cuda", "npu")
NPU_MEMORY_FRACTION_ENV = "NPU_MEMORY_FRACTION"


def _npu_available() -> bool:
    if "torch_npu" not in sys.modules and importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return torch.npu.is_available() and torch.npu.device_count() > 0


def npu_memory_fraction() -> float:
    raw = os.environ.get(NPU_MEMORY_FRACTION_ENV, "1")
    try:
        fraction = float(raw)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{NPU_MEMORY_FRACTION_ENV} must be a number in (0, 1], got {raw!r}")
    return fraction


def select_device(kind: str = "auto", rank: int = 0, world_size: int = 1) -> torch.device:
    """`auto`: an NPU if torch_npu is importable and sees devices, else CUDA, else CPU."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device {kind!r}; choose one of {', '.join(DEVICE_KINDS)}")
    if kind == "auto":
        kind = "npu" if _npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        index = rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if not _npu_available():
        raise ValueError("--device npu was asked for but torch_npu is not installed or sees no NPU")
    return _select_npu(rank, world_size)


def _select_npu(rank: int, world_size: int) -> torch.device:
    count = torch.npu.device_count()
    if world_size > count:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        shown = f" (ASCEND_RT_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(f"{world_size} ranks need one NPU each, but {count} are visible{shown}")
    fraction = npu_memory_fraction()
    index = rank % count
    torch.npu.set_device(index)
    torch.npu.set_compile_mode(jit_compile=False)
    if fraction < 1.0:
        torch.npu.set_per_process_memory_fraction(fraction, index)
    return torch.device("npu", index)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "npu":
        torch.npu.empty_cache()


def available_memory_bytes(device: torch.device) -> int:
    """Memory that a KV cache could still take on this device (for CPU: MemAvailable of the host)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        free, total = torch.npu.mem_get_info(device)
        return max(0, int(free - (1.0 - npu_memory_fraction()) * total))
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def distributed_backend(device: torch.device) -> str:
    """torch.distributed backend for tensor parallelism on this kind of device."""
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device.type]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """None picks the device's natural dtype: float32 on CPU (the exactness reference), bfloat16 elsewhere."""
    if name is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
