"""The Ascend NPU backend: torch_npu's fused inference kernels, as torch-npu 2.13.0 documents them.

Ops used (and nothing else of torch_npu; the linear layers are torch's matmul, which CANN runs):
  * `npu_rms_norm(x, gamma, epsilon=)` -> (y, rstd), and `npu_add_rms_norm(x1, x2, gamma, epsilon=)` -> (y, rstd,
    x1 + x2): RMSNorm and RMSNorm fused with the residual add;
  * `npu_apply_rotary_pos_emb(query, key, cos, sin, layout="TND", rotary_mode="half")`: rotate-half rotary of
    query [T, H, D] and key [T, KV, D] in place, one call for both, with per-token tables [T, 1, D] (each token its
    own row, which carries dynamic NTK's per-length base);
  * `npu_swiglu(x, dim=-1)`: silu(first half) * second half, over the merged [w1 | w3] product;
  * `npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, cache_mode="Norm")`: the new tokens'
    keys/values [T, KV, D] into the caches [num_blocks, block_size, KV, D] at their slots (the op's ND case;
    its default cache_mode "PA_NZ" is the fractal layout, not this one);
  * `npu_fused_infer_attention_score`, with the block table (page attention), input layout "BSH":
      - decoding requests (S = 1), all in one call: query [b, 1, H·D], actual_seq_lengths_kv their context lengths;
      - prompt chunks (S > 1, a prompt from an empty cache or a chunk after a cached prefix), in one call padded to
        the longest chunk: query [p, S, H·D], actual_seq_lengths each chunk's own length and actual_seq_lengths_kv
        its context length (per sequence in BSH: TND would take cumulative query lengths), sparse_mode 3
        ("rightDownCausal": the chunk's last row sees the whole context, its first row the prefix and itself)
        with the op's compressed 2048 × 2048 mask, True above the diagonal (True = masked).
    The caches are read in place through the block table as [num_blocks, block_size, KV·D], the only cache
    layout the op takes with a BSH query; nothing is gathered or padded in the context.

The documented limits this backend checks before anything runs (`check_kv_layout`, `check_attention_shape`):
page attention with S > 1 takes block sizes that are multiples of 128 up to 512 (S = 1 would take multiples of 16);
head_dim 64 or 128 (the rotary op's rule on Atlas A2/A3 and inference parts; InternLM2's is 128); at most 256
query heads, a whole number of them per KV head and at most 64; KV·D below 65,536 for the [blocks, block_size, H]
cache; float16 or bfloat16 (the attention op takes no float32).

`ops` is the module that provides the ops: torch_npu itself on an NPU. Tests give a module of CPU stand-ins that
implement the same documented signatures and semantics (`NPU_OPS_MODULE`), which is also the only way this backend
runs on a device other than an NPU.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
import torch.nn.functional as F

from text_generation_server.ops import AttentionMetadata, BackendUnavailable, KVCache, LinearKernel
from text_generation_server.ops.reference import ReferenceOps

OPS_MODULE_ENV = "NPU_OPS_MODULE"  # the module providing the torch_npu ops; default torch_npu
BLOCK_SIZE_UNIT = 128  # page attention with S > 1: block_size a multiple of 128 ...
MAX_BLOCK_SIZE = 512  # ... and at most 512
HEAD_DIMS = (64, 128)  # the rotary op on Atlas A2/A3 and inference parts (attention would take more)
MAX_HEADS = 256
MAX_GROUP = 64  # query heads per KV head
MAX_KV_HIDDEN = 65535  # KV·D of a [num_blocks, block_size, KV·D] cache
DTYPES = (torch.float16, torch.bfloat16)
CAUSAL_MASK_SIZE = 2048  # the compressed mask sparse_mode 3 takes
RIGHT_DOWN_CAUSAL = 3
ROTARY_MODE = "half"  # rotate-half: InternLM2's and Llama's convention, and the only one A2/A3 parts take


class NpuUnavailable(BackendUnavailable):
    """torch_npu (or the module named by NPU_OPS_MODULE) cannot be imported or cannot run on this device."""


def load_ops_module() -> ModuleType:
    name = os.environ.get(OPS_MODULE_ENV, "torch_npu")
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise NpuUnavailable(f"{name} cannot be imported: {error}") from error


class NpuOps(ReferenceOps):
    name = "npu"
    default_block_size = BLOCK_SIZE_UNIT

    def __init__(self, ops: ModuleType, device: torch.device):
        """ops: torch_npu, or a module of stand-ins that declares `RUNS_ON_CPU = True` (and, if it computes float32,
        `ACCEPTS_FLOAT32 = True`, which the real kernels do not)."""
        runs_here = device.type == "npu" or (device.type == "cpu" and getattr(ops, "RUNS_ON_CPU", False))
        if not runs_here:
            raise NpuUnavailable(f"the {ops.__name__} kernels run on an NPU, not on {device.type}")
        self.ops = ops
        self.dtypes = (*DTYPES, torch.float32) if getattr(ops, "ACCEPTS_FLOAT32", False) else DTYPES
        self._causal_mask: torch.Tensor | None = None

    # ----- start-up checks ------------------------------------------------------------------------------

    def check_kv_layout(self, block_size: int, head_dim: int, dtype: torch.dtype) -> None:
        if not (BLOCK_SIZE_UNIT <= block_size <= MAX_BLOCK_SIZE and block_size % BLOCK_SIZE_UNIT == 0):
            raise ValueError(
                f"the npu attention kernel needs a KV block size that is a multiple of {BLOCK_SIZE_UNIT} up to "
                f"{MAX_BLOCK_SIZE} (page attention over prompt chunks), got {block_size}"
            )
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"the npu rotary kernel needs head_dim 64 or 128, got {head_dim}")
        if dtype not in self.dtypes:
            names = " or ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            raise ValueError(f"the npu attention kernel takes {names}, not {str(dtype).removeprefix('torch.')}")

    def check_attention_shape(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        if num_heads > MAX_HEADS:
            raise ValueError(f"the npu attention kernel takes at most {MAX_HEADS} query heads per rank, got {num_heads}")
        if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
            raise ValueError(
                f"the npu attention kernel needs at most {MAX_GROUP} query heads per KV head, a whole number of "
                f"them: {num_heads} query heads over {num_kv_heads} KV heads"
            )
        if num_kv_heads * head_dim > MAX_KV_HIDDEN:
            raise ValueError(
                f"the npu attention kernel reads a [blocks, block_size, KV·D] cache with KV·D up to {MAX_KV_HIDDEN}, "
                f"got {num_kv_heads} × {head_dim}"
            )

    # ----- pointwise and linear -------------------------------------------------------------------------

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        return lambda x: F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.ops.npu_rms_norm(x, weight, epsilon=eps)[0]

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, _, total = self.ops.npu_add_rms_norm(x, residual, weight, epsilon=eps)
        return normed, total

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.ops.npu_swiglu(gate_up, dim=-1)

    def rotary(
        self, query: torch.Tensor, key: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tables = meta.backend_data.get("npu-rotary")
        if tables is None:  # the first layer of the step: TND tables [T, 1, D], cos and sin repeated per half
            tables = meta.backend_data["npu-rotary"] = tuple(
                rotary_table(t)[:, None, :].contiguous() for t in (meta.cos, meta.sin)
            )
        cos, sin = tables
        tokens, head_dim = query.shape[0], cos.shape[-1]
        # query and key are column blocks of the qkv projection: contiguous copies, rotated in place as TND
        query = query.contiguous().view(tokens, -1, head_dim)
        key = key.contiguous().view(tokens, -1, head_dim)
        query, key = self.ops.npu_apply_rotary_pos_emb(query, key, cos, sin, layout="TND", rotary_mode=ROTARY_MODE)
        return query.view(tokens, -1), key.view(tokens, -1)

    # ----- attention ------------------------------------------------------------------------------------

    def write_kv(
        self, kv_cache: KVCache, layer: int, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        slots = _step_data(meta).slots
        self.ops.npu_scatter_pa_kv_cache(
            key.contiguous(), value.contiguous(), kv_cache.keys[layer], kv_cache.values[layer], slots,
            cache_mode="Norm",
        )

    def paged_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, layer: int,
        meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        step = _step_data(meta)
        tokens, heads, head_dim = query.shape
        num_blocks, block_size, kv_heads, _ = kv_cache.keys[layer].shape
        # the page attention view of the caches: [num_blocks, block_size, KV·D], the same memory
        key_cache = kv_cache.keys[layer].view(num_blocks, block_size, kv_heads * head_dim)
        value_cache = kv_cache.values[layer].view(num_blocks, block_size, kv_heads * head_dim)
        common = dict(
            num_heads=heads, num_key_value_heads=kv_heads, scale=scale, input_layout="BSH", block_size=block_size
        )
        rows = query.reshape(tokens, heads * head_dim)
        if step.decode.rows.numel() == tokens:  # a pure decode step: the rows are the batch, in order
            return self._attend(rows[:, None], key_cache, value_cache, step.decode, common).view_as(query)
        out = torch.empty_like(rows)
        if step.decode.rows.numel():
            out[step.decode.rows] = self._attend(
                rows[step.decode.rows][:, None], key_cache, value_cache, step.decode, common
            )[:, 0]
        if step.chunks.rows.numel():
            padded = rows.new_zeros(step.chunks.padded_shape + (heads * head_dim,))  # [p, S, H·D]
            padded.view(-1, heads * head_dim)[step.chunks.padded_index] = rows[step.chunks.rows]
            attended = self._attend(
                padded, key_cache, value_cache, step.chunks, common, causal_mask=self.causal_mask(query.device)
            )
            out[step.chunks.rows] = attended.view(-1, heads * head_dim)[step.chunks.padded_index]
        return out.view_as(query)

    def _attend(self, query, key_cache, value_cache, group: _Group, common: dict, causal_mask=None) -> torch.Tensor:
        """query [b, S, H·D] of one group of requests -> [b, S, H·D]."""
        extra = {} if causal_mask is None else dict(
            actual_seq_lengths=group.query_lens, atten_mask=causal_mask, sparse_mode=RIGHT_DOWN_CAUSAL
        )
        out, _ = self.ops.npu_fused_infer_attention_score(
            query, key_cache, value_cache, block_table=group.block_table, actual_seq_lengths_kv=group.context_lens,
            **common, **extra,
        )
        return out

    def causal_mask(self, device: torch.device) -> torch.Tensor:
        """The compressed mask of sparse_mode 3: [2048, 2048] bool, True (masked) above the diagonal."""
        if self._causal_mask is None:
            ones = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
            self._causal_mask = torch.triu(ones, diagonal=1)
        return self._causal_mask


def rotary_table(half: torch.Tensor) -> torch.Tensor:
    """[T, D/2] -> [T, D]: rotate-half pairs element i with i + D/2, so both halves take the same angle."""
    return torch.cat((half, half), dim=-1)


class _Group:
    """The requests of a step that go through one attention call: decoding ones (S = 1) or prompt chunks."""

    def __init__(self, meta: AttentionMetadata, requests: list[int], device: torch.device):
        starts = meta.query_starts
        self.query_lens = [meta.query_lens[i] for i in requests]  # per sequence, as BSH takes them
        self.context_lens = [meta.context_lens[i] for i in requests]
        self.block_table = meta.block_tables[requests].to(device=device, dtype=torch.int32)  # [b, W]
        rows = [starts[i] + j for i in requests for j in range(meta.query_lens[i])]
        self.rows = torch.tensor(rows, dtype=torch.int64, device=device)  # packed rows of these requests
        longest = max(self.query_lens, default=0)
        self.padded_shape = (len(requests), longest)
        # row j of the group's k-th request sits at k·S + j of the flattened padded query
        padded = [k * longest + j for k, n in enumerate(self.query_lens) for j in range(n)]
        self.padded_index = torch.tensor(padded, dtype=torch.int64, device=device)


class _StepData:
    """What every layer of a step shares: the slots as int32 and the two groups of requests."""

    def __init__(self, meta: AttentionMetadata):
        device = meta.slots.device
        self.slots = meta.slots.to(torch.int32)
        batch = range(len(meta.query_lens))
        self.decode = _Group(meta, [i for i in batch if meta.query_lens[i] == 1], device)
        self.chunks = _Group(meta, [i for i in batch if meta.query_lens[i] > 1], device)


def _step_data(meta: AttentionMetadata) -> _StepData:
    data = meta.backend_data.get(NpuOps.name)
    if data is None:
        data = meta.backend_data[NpuOps.name] = _StepData(meta)
    return data
