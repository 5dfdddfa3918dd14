"""CPU stand-ins for the torch_npu ops the NPU backend calls (tests only), and a record of every call.

Each stand-in has the signature torch-npu 2.13.0 documents for its op (parameter names, order, defaults, keyword-only
parameters after the bare `*`; test_npu_backend.py checks this against the wheel's documentation), checks the
argument rules that documentation states for the case our backend uses, and computes the documented result in
float32. A rule the backend breaks raises `NpuContractError`, so a wrong layout fails the conformance tests
instead of giving plausible numbers. Features of an op that our backend does not use (quantisation, NZ formats,
left padding, shared prefixes, ...) are refused: a stand-in implements the documented case, not the whole op.

The rules quoted below (in our words) come from the op docs of the torch-npu wheel (`torch_npu/_op_plugin_docs.py`)
and, for output shapes, from its meta registrations (`op_plugin/meta/_meta_registrations.py`).

The NPU backend loads this module through NPU_OPS_MODULE=npu_stand_ins (with tests/ on the path): `RUNS_ON_CPU` lets
it run on a CPU device, `ACCEPTS_FLOAT32` lets float32 through for the exact comparison (the real attention op
takes float16 and bfloat16 only).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RUNS_ON_CPU = True
ACCEPTS_FLOAT32 = True
INT32_MAX = 2147483647
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MASK_SIZE = 2048


class NpuContractError(ValueError):
    """A call that breaks a rule of the op's documentation."""


@dataclass
class Call:
    op: str
    args: tuple
    kwargs: dict
    outputs: object


CALLS: list[Call] | None = None  # while `recording()` is active


@contextlib.contextmanager
def recording():
    """Collect the calls made inside the block: op name, arguments as passed, outputs."""
    global CALLS
    CALLS = []
    try:
        yield CALLS
    finally:
        CALLS = None


def _op(function):
    """Record each call of the stand-in `function` (arguments exactly as passed) while `recording()` is active."""

    @functools.wraps(function)  # inspect.signature sees the stand-in's own signature
    def call(*args, **kwargs):
        outputs = function(*args, **kwargs)
        if CALLS is not None:
            CALLS.append(Call(function.__name__, args, kwargs, outputs))
        return outputs

    return call


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise NpuContractError(message)


def _require_unused(op: str, **features) -> None:
    for name, value in features.items():
        _require(value is None, f"{op}: {name} is not used by this backend and not implemented by the stand-in")


# ----- normalisation and activation ---------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in x's dtype, rstd float32 with x's leading dims and 1 for each of gamma's dims)."""
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(x.dtype), rstd


def _check_norm_inputs(op: str, x: torch.Tensor, gamma: torch.Tensor) -> None:
    """float16, bfloat16 or float32; gamma of x's dtype, shaped as x's last dims; 2 to 8 dims."""
    _require(x.dtype in FLOATS, f"{op}: dtype {x.dtype} is not float16, bfloat16 or float32")
    _require(gamma.dtype == x.dtype, f"{op}: gamma is {gamma.dtype}, the input {x.dtype}; they must match")
    _require(2 <= x.dim() <= 8, f"{op}: the input has {x.dim()} dims; 2 to 8 are supported")
    _require(
        tuple(x.shape[x.dim() - gamma.dim():]) == tuple(gamma.shape),
        f"{op}: gamma {tuple(gamma.shape)} is not the input's last dims {tuple(x.shape)}",
    )


@_op
def npu_rms_norm(self, gamma, epsilon=1e-06):
    """-> (y, rstd): y = self / sqrt(mean(self²) + epsilon) · gamma over gamma's dims."""
    _check_norm_inputs("npu_rms_norm", self, gamma)
    return _rms_norm(self, gamma, epsilon)


@_op
def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """-> (y, rstd, x): x = x1 + x2 (the new residual, in x1's dtype), y = RMSNorm(x) · gamma. The op has no doc
    block in the wheel; its signature and outputs are those of its meta registration."""
    _check_norm_inputs("npu_add_rms_norm", x1, gamma)
    _require(x2.shape == x1.shape and x2.dtype == x1.dtype, "npu_add_rms_norm: x1 and x2 differ in shape or dtype")
    total = x1 + x2
    y, rstd = _rms_norm(total, gamma, epsilon)
    return y, rstd, total


@_op
def npu_swiglu(self, dim=-1):
    """swish(A) · B, A and B the two halves of self along dim; 1 to 8 dims; float32, float16, bfloat16."""
    _require(self.dtype in FLOATS, f"npu_swiglu: dtype {self.dtype} is not supported")
    _require(1 <= self.dim() <= 8 and self.shape[dim] % 2 == 0, f"npu_swiglu: cannot halve {tuple(self.shape)} on {dim}")
    a, b = self.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(self.dtype)


# ----- rotary ----------------------------------------------------------------------------------------------------


@_op
def npu_apply_rotary_pos_emb(query, key, cos, sin, *, layout="BSND", rotary_mode="half"):
    """Rotary of query and key, in place; -> (query, key), the updated inputs. With x1, x2 the halves of the last
    dim ("half" mode): x · cos + cat(-x2, x1) · sin.

    The rules for Atlas A2/A3 and inference parts: layout BSND (4-D) or TND (3-D); D 128 or 64 for all four; "half"
    mode only; one dtype; TND: query (T, N, D), key (T, K_N, D), cos and sin (T, 1, D), T the same for all;
    BSND: (B, S, N, D), key (B, S, K_N, D), cos and sin (B, S, 1, D)."""
    op = "npu_apply_rotary_pos_emb"
    _require(layout in ("BSND", "TND"), f"{op}: layout {layout!r}; these parts take BSND or TND")
    _require(rotary_mode == "half", f"{op}: rotary_mode {rotary_mode!r}; these parts take 'half' only")
    rank = 3 if layout == "TND" else 4
    tensors = dict(query=query, key=key, cos=cos, sin=sin)
    for name, tensor in tensors.items():
        _require(tensor.dim() == rank, f"{op}: {layout} takes {rank}-D tensors, {name} is {tuple(tensor.shape)}")
        _require(tensor.shape[-1] in (64, 128), f"{op}: D must be 64 or 128, {name} has {tensor.shape[-1]}")
        _require(tensor.numel() > 0, f"{op}: {name} is empty")
    _require(len({t.dtype for t in tensors.values()}) == 1, f"{op}: query, key, cos and sin differ in dtype")
    _require(query.dtype in FLOATS, f"{op}: dtype {query.dtype}")
    leading = rank - 2  # T, or B and S
    _require(
        all(tuple(t.shape[:leading]) == tuple(query.shape[:leading]) for t in tensors.values()),
        f"{op}: the {'T' if rank == 3 else 'B, S'} dims of query, key, cos and sin differ",
    )
    _require(query.shape[-1] == key.shape[-1] and cos.shape == sin.shape, f"{op}: the D dims differ")
    _require(cos.shape[-2] == 1, f"{op}: cos and sin take N = 1, got {tuple(cos.shape)}")
    for x in (query, key):
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        x.copy_(x32 * cos.float() + torch.cat((-x2, x1), dim=-1) * sin.float())
    return query, key


# ----- the paged KV cache -----------------------------------------------------------------------------------------


@_op
def npu_scatter_pa_kv_cache(
    key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None, compress_seq_offsets=None, seq_lens=None,
    cache_mode="PA_NZ",
):
    """Writes key/value into the caches at slot_mapping, in place, returns nothing.

    The ND case ("scenario two"): key/value [T, N, D], caches [num_blocks, block_size, N, D], slot_mapping [T],
    with cache_mode "Norm" (or None): with the default "PA_NZ" the caches must be in the fractal NZ format, which
    only the device has (`npu_format_cast`), so the stand-in refuses it. No input may be non-contiguous; key,
    value and the caches share one dtype; slots are int32 or int64, in [0, num_blocks · block_size) and distinct.
    """
    op = "npu_scatter_pa_kv_cache"
    _require_unused(op, compress_lens=compress_lens, compress_seq_offsets=compress_seq_offsets, seq_lens=seq_lens)
    _require(
        cache_mode in (None, "Norm"),
        f"{op}: cache_mode {cache_mode!r} takes fractal-NZ caches; ND caches [blocks, block_size, N, D] need 'Norm'",
    )
    tensors = dict(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    for name, tensor in tensors.items():
        _require(tensor.is_contiguous(), f"{op}: {name} is not contiguous")
    _require(key.dim() == 3 and value.dim() == 3, f"{op}: the ND case takes 3-D key/value, got {key.dim()}-D")
    _require(key_cache.dim() == 4 and value_cache.dim() == 4, f"{op}: the caches must be 4-D")
    _require(key.shape[:2] == value.shape[:2], f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    _require(
        len({key.dtype, value.dtype, key_cache.dtype, value_cache.dtype}) == 1, f"{op}: key, value and caches differ in dtype"
    )
    for new, cache, name in ((key, key_cache, "key"), (value, value_cache, "value")):
        _require(
            tuple(cache.shape[2:]) == tuple(new.shape[1:]),
            f"{op}: {name}_cache {tuple(cache.shape)} is not [blocks, block_size, {new.shape[1]}, {new.shape[2]}]",
        )
    _require(slot_mapping.dtype in (torch.int32, torch.int64), f"{op}: slot_mapping is {slot_mapping.dtype}")
    _require(tuple(slot_mapping.shape) == (key.shape[0],), f"{op}: slot_mapping {tuple(slot_mapping.shape)} is not [T]")
    slots = slot_mapping.long()
    capacity = key_cache.shape[0] * key_cache.shape[1]
    _require(bool(((slots >= 0) & (slots < capacity)).all()), f"{op}: a slot is outside [0, {capacity})")
    _require(slots.unique().numel() == slots.numel(), f"{op}: slot_mapping repeats a slot")
    key_cache.view(capacity, *key_cache.shape[2:])[slots] = key
    value_cache.view(capacity, *value_cache.shape[2:])[slots] = value


# ----- attention ---------------------------------------------------------------------------------------------------


def _lengths(op: str, name: str, lengths, batch: int, limit: int) -> list[int]:
    """A SymInt[] of per-batch lengths: one value for every batch, or at least `batch` values (the first are used);
    each in [0, limit]."""
    _require(isinstance(lengths, (list, tuple)), f"{op}: {name} must be a list of ints, got {type(lengths).__name__}")
    _require(all(isinstance(n, int) for n in lengths), f"{op}: {name} must hold ints")
    _require(len(lengths) == 1 or len(lengths) >= batch, f"{op}: {name} has {len(lengths)} values for {batch} batches")
    values = list(lengths) * batch if len(lengths) == 1 else list(lengths[:batch])
    _require(all(0 <= n <= limit for n in values), f"{op}: {name} {values} must lie in [0, {limit}]")
    return values


def _check_causal_mask(op: str, atten_mask) -> None:
    """sparse_mode 2, 3 or 4 takes the optimised mask: (2048, 2048), (1, 2048, 2048) or (1, 1, 2048, 2048), bool,
    int8 or uint8, 1 = not computed, here the causal one (1 above the diagonal)."""
    _require(atten_mask is not None, f"{op}: sparse_mode 3 needs the 2048 × 2048 mask")
    _require(atten_mask.dtype in (torch.bool, torch.int8, torch.uint8), f"{op}: atten_mask is {atten_mask.dtype}")
    _require(
        tuple(atten_mask.shape[-2:]) == (MASK_SIZE, MASK_SIZE) and atten_mask.dim() in (2, 3, 4)
        and all(n == 1 for n in atten_mask.shape[:-2]),
        f"{op}: sparse_mode 3 takes a (2048, 2048) mask, got {tuple(atten_mask.shape)}",
    )
    expected = torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool), diagonal=1)
    _require(
        torch.equal(atten_mask.reshape(MASK_SIZE, MASK_SIZE).bool().cpu(), expected),
        f"{op}: the sparse_mode 3 mask must be 1 (masked) above the diagonal and 0 on and below it",
    )


@_op
def npu_fused_infer_attention_score(
    query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
    dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None, quant_offset2=None,
    antiquant_scale=None, antiquant_offset=None, block_table=None, query_padding_size=None, kv_padding_size=None,
    key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None, value_antiquant_offset=None,
    key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None, key_rope=None,
    key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=INT32_MAX, next_tokens=INT32_MAX,
    input_layout="BSH", num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0, antiquant_mode=0,
    softmax_lse_flag=False, key_antiquant_mode=0, value_antiquant_mode=0,
):
    """softmax(scale · query keyᵀ + mask) value, page attention with a BSH query; -> (attention_out, softmax_lse).

    The case implemented, with its documented rules:
      * query [B, S, H] (H = num_heads · D), contiguous; S = 1 is the incremental branch, S > 1 the prompt branch;
      * page attention (block_table given): key/value are the caches [num_blocks, block_size, KV·D] (the only cache
        layout a BSH query takes), KV = num_key_value_heads (0 means num_heads), num_heads a multiple of KV and at
        most 64 times it; block_table int32 [B, >= the blocks of the longest context]; actual_seq_lengths_kv required,
        each batch's context length; block_size the caches' second dim: a multiple of 16 up to 512 when S = 1, a
        multiple of 128 from 128 to 512 when S > 1;
      * S > 1: actual_seq_lengths per batch (each at most S; rows past it are padding: zeros here) and either no mask
        (sparse_mode 0: every row sees the whole context) or sparse_mode 3, "rightDownCausal", with the optimised
        2048 × 2048 mask: row i of a batch with q query and k context tokens sees context positions 0 … k − q + i;
      * S = 1: actual_seq_lengths, sparse_mode and the mask are ignored, as documented.
    softmax_lse_flag False: the second output is empty, shape [0] as the meta registration gives it (the op docs say
    a one-element zero tensor).
    """
    op = "npu_fused_infer_attention_score"
    _require_unused(
        op, pse_shift=pse_shift, dequant_scale1=dequant_scale1, quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
        quant_scale2=quant_scale2, quant_offset2=quant_offset2, antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset, query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
        key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
        value_antiquant_scale=value_antiquant_scale, value_antiquant_offset=value_antiquant_offset,
        key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
        actual_shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope, key_rope=key_rope,
        key_rope_antiquant_scale=key_rope_antiquant_scale,
    )
    _require(not softmax_lse_flag, f"{op}: softmax_lse_flag is not used by this backend")
    _require(input_layout == "BSH", f"{op}: the stand-in implements input_layout BSH, got {input_layout!r}")
    _require(block_table is not None, f"{op}: the stand-in implements page attention (block_table) only")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        _require(tensor.is_contiguous(), f"{op}: {name} is not contiguous")
    _require(query.dim() == 3, f"{op}: a BSH query is 3-D, got {tuple(query.shape)}")
    _require(query.dtype in FLOATS and key.dtype == value.dtype == query.dtype, f"{op}: query, key and value dtypes differ")
    batch, seq, hidden = query.shape
    _require(num_heads > 0 and hidden % num_heads == 0, f"{op}: num_heads {num_heads} does not divide H = {hidden}")
    head_dim = hidden // num_heads
    kv_heads = num_key_value_heads or num_heads
    _require(num_heads % kv_heads == 0 and num_heads // kv_heads <= 64, f"{op}: {num_heads} heads over {kv_heads} KV heads")
    _require(head_dim <= 512 and (seq == 1 or head_dim % 16 == 0), f"{op}: D = {head_dim} breaks the D rules")
    _require(
        key.dim() == 3 and key.shape == value.shape and key.shape[2] == kv_heads * head_dim,
        f"{op}: a BSH query takes caches [num_blocks, block_size, KV·D = {kv_heads * head_dim}], got {tuple(key.shape)}",
    )
    num_blocks, cache_block = key.shape[0], key.shape[1]
    _require(block_size == cache_block, f"{op}: block_size {block_size} is not the caches' {cache_block}")
    if seq == 1:
        _require(0 < block_size <= 512 and block_size % 16 == 0, f"{op}: S = 1 takes block_size a multiple of 16 up to 512")
    else:
        _require(128 <= block_size <= 512 and block_size % 128 == 0, f"{op}: S > 1 takes block_size 128, 256, 384 or 512")
    _require(block_table.dtype == torch.int32 and block_table.dim() == 2, f"{op}: block_table must be 2-D int32")
    _require(block_table.shape[0] == batch, f"{op}: block_table has {block_table.shape[0]} rows for {batch} batches")
    _require(actual_seq_lengths_kv is not None, f"{op}: page attention needs actual_seq_lengths_kv")
    context = _lengths(op, "actual_seq_lengths_kv", actual_seq_lengths_kv, batch, block_table.shape[1] * block_size)
    blocks_needed = [math.ceil(n / block_size) for n in context]
    _require(sum(blocks_needed) <= num_blocks, f"{op}: the contexts need more blocks than the caches have")
    if seq == 1:
        query_lens, causal = [1] * batch, False
    else:
        query_lens = _lengths(op, "actual_seq_lengths", actual_seq_lengths or [seq], batch, seq)
        _require(sparse_mode in (0, 3), f"{op}: the stand-in implements sparse_mode 0 and 3, got {sparse_mode}")
        _require(sparse_mode == 3 or atten_mask is None, f"{op}: sparse_mode 0 with a full mask is not implemented")
        if sparse_mode == 3:
            _check_causal_mask(op, atten_mask)
        causal = sparse_mode == 3

    out = torch.zeros(batch, seq, num_heads, head_dim)
    flat_keys = key.view(num_blocks * block_size, kv_heads, head_dim)
    flat_values = value.view(num_blocks * block_size, kv_heads, head_dim)
    q_all = query.float().view(batch, seq, num_heads, head_dim)
    for b in range(batch):
        kv_len, q_len = context[b], query_lens[b]
        if q_len == 0 or kv_len == 0:
            continue
        blocks = block_table[b, : blocks_needed[b]].long()
        _require(bool(((blocks >= 0) & (blocks < num_blocks)).all()), f"{op}: block_table row {b} names a missing block")
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:kv_len]
        k = flat_keys[slots].float().repeat_interleave(num_heads // kv_heads, dim=1)  # [kv, N, D]
        v = flat_values[slots].float().repeat_interleave(num_heads // kv_heads, dim=1)
        q = q_all[b, :q_len]  # [q, N, D]
        scores = torch.einsum("qnd,knd->nqk", q, k) * scale
        if causal:
            visible = torch.arange(kv_len)[None, :] <= (kv_len - q_len + torch.arange(q_len))[:, None]
            scores = scores.masked_fill(~visible, -math.inf)
        out[b, :q_len] = torch.einsum("nqk,knd->qnd", torch.softmax(scores, dim=-1), v)
    return out.view(batch, seq, hidden).to(query.dtype), torch.empty(0, dtype=torch.float32)


OPS = ("npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_apply_rotary_pos_emb", "npu_scatter_pa_kv_cache",
       "npu_fused_infer_attention_score")
