"""The pure-PyTorch backend: the exactness anchor, and what a device runs until it has a faster one.

KV layout: per layer one key and one value tensor of shape [num_blocks, block_size, KV, D]; its flat view
[num_blocks * block_size, KV, D] is indexed by slot. Any block size of at least one token works.

Attention reads the context through the block table a tile of blocks at a time and merges the tiles, so its
memory is bounded by `TILE_BYTES` whatever the context length: a 4,096-token chunk against a 200k-token context
never holds its score matrix. Two ways to merge, with the same result:
  * an online softmax (running maximum, running sum and running output, in float32) over matmul tiles: plain
    tensor code that runs on every device;
  * on CPU, PyTorch's fused attention kernel, which also returns each query row's log-sum-exp: each tile is one
    fused call and the tiles are merged by their log-sum-exps (5–6× faster on long contexts).
Two cases need no merging: a chunk with no cached prefix (causal attention over its own keys, a plain prefill)
and decoding whose contexts all fit one tile.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from text_generation_server.ops import AttentionMetadata, KVCache, LinearKernel, Ops

# bfloat16 products where oneDNN refuses bfloat16 (see `_widened_bfloat16_linear`): from this many rows on
# the weight is widened to float32 a block of rows at a time, its rows split evenly into blocks of about
# this many bytes (at most one row more)
WIDEN_MIN_ROWS = 4
WIDEN_BLOCK_BYTES = 4 << 20
TILE_BYTES = 64 << 20  # bound on the float32 scores of one tile (the gathered keys/values come on top)
MIN_TILE_TOKENS = 64


class _OnlineSoftmax:
    """softmax(scores) @ values accumulated over key tiles, in float32.

    Invariant: every query row sees at least one key in the first tile it is given, so the running maximum is
    finite from then on and fully masked rows of later tiles contribute exp(-inf) = 0, never NaN.
    """

    def __init__(self, rows: tuple[int, ...], head_dim: int, device: torch.device):
        self.maximum = torch.full((*rows, 1), -math.inf, device=device)
        self.total = torch.zeros((*rows, 1), device=device)
        self.output = torch.zeros((*rows, head_dim), device=device)

    def add(self, scores: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """scores [..., span] float32 (masked keys at -inf), values [..., span, D]; `rows` indexes the first dim."""
        maximum = self.maximum if rows is None else self.maximum[rows]
        total = self.total if rows is None else self.total[rows]
        output = self.output if rows is None else self.output[rows]
        new_maximum = torch.maximum(maximum, scores.amax(dim=-1, keepdim=True))
        probs = scores.sub_(new_maximum).exp_()
        correction = torch.exp(maximum - new_maximum)
        total = total * correction + probs.sum(dim=-1, keepdim=True)
        output = output * correction + torch.matmul(probs.to(values.dtype), values).float()
        if rows is None:
            self.maximum, self.total, self.output = new_maximum, total, output
        else:
            self.maximum[rows], self.total[rows], self.output[rows] = new_maximum, total, output

    def result(self) -> torch.Tensor:
        return self.output / self.total


class ReferenceOps(Ops):
    name = "reference"

    # ----- KV cache -------------------------------------------------------------------------------------

    def check_kv_layout(self, block_size: int, head_dim: int, dtype: torch.dtype) -> None:
        if block_size < 1:
            raise ValueError(f"the KV block size must be at least one token, got {block_size}")
        if not dtype.is_floating_point:
            raise ValueError(f"the KV cache needs a floating-point dtype, got {dtype}")

    def check_attention_shape(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        assert num_heads % num_kv_heads == 0, "the model config checks that KV heads divide the heads"

    def kv_bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Key + value of one token in every layer: sized by the KV heads, not the attention heads."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def block_shape(self, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
        """One block of one layer's keys (or values): token-major, [block_size, KV, D]."""
        return (block_size, num_kv_heads, head_dim)

    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> KVCache:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.check_kv_layout(block_size, head_dim, dtype)
        shape = (num_blocks, *self.block_shape(block_size, num_kv_heads, head_dim))
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return KVCache(keys, values, num_blocks, block_size)

    # ----- linear layers --------------------------------------------------------------------------------

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        """On CPU the weight is kept only pre-packed for oneDNN: with the [out, in] layout MKL runs the skinny
        products of decoding (T from 1 to a few dozen) on one thread, up to 2× slower than oneDNN on the packed
        weight (the float32 lm_head of a 92544-token vocabulary: 22 ms against 12 ms at T = 1). bfloat16 on a CPU
        whose oneDNN refuses it: `_widened_bfloat16_linear`. Elsewhere, and for other dtypes, `F.linear`."""
        if _onednn_packable(weight):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:  # oneDNN refuses it (AVX2 only)
            return _widened_bfloat16_linear(weight, bias)
        return lambda x: F.linear(x, weight, bias)

    # ----- pointwise ------------------------------------------------------------------------------------

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # the statistics in float32 whatever the model dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = residual + x
        return self.rms_norm(total, weight, eps), total

    def rotary(
        self, query: torch.Tensor, key: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = meta.cos[:, None, :], meta.sin[:, None, :]
        half = cos.shape[-1]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x = x.view(x.shape[0], -1, 2 * half)  # (T, heads, D)
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(1)

        return rotate(query), rotate(key)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)  # in place: one [T, inner] result, not two

    # ----- attention ------------------------------------------------------------------------------------

    def write_kv(
        self, kv_cache: KVCache, layer: int, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        key_cache, value_cache = kv_cache.keys[layer], kv_cache.values[layer]
        key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, meta.slots, key)
        value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, meta.slots, value)

    def paged_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, layer: int,
        meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        key_cache, value_cache = kv_cache.keys[layer], kv_cache.values[layer]
        starts = meta.query_starts
        single = [i for i, n in enumerate(meta.query_lens) if n == 1]
        if len(single) == len(meta.query_lens):  # a pure decode step: one query row per request
            lengths = meta.context_lens
            return _single_token_attention(query, key_cache, value_cache, meta.block_tables, lengths, scale)
        out = torch.empty_like(query)
        if single:
            rows = torch.tensor([starts[i] for i in single], device=query.device)
            tables = meta.block_tables[torch.tensor(single, device=query.device)]
            lengths = [meta.context_lens[i] for i in single]
            out[rows] = _single_token_attention(query[rows], key_cache, value_cache, tables, lengths, scale)
        for i, n in enumerate(meta.query_lens):
            if n == 1:
                continue
            start, stop = starts[i], starts[i + 1]
            if meta.context_lens[i] == n:  # no cached prefix: causal attention within the chunk itself
                out[start:stop] = _causal_attention(query[start:stop], key[start:stop], value[start:stop], scale)
            elif _fused_with_lse_available(query):
                out[start:stop] = _fused_chunk_attention(
                    query[start:stop], key[start:stop], value[start:stop], key_cache, value_cache,
                    meta.block_tables[i], meta.context_lens[i], scale,
                )
            else:
                out[start:stop] = _chunk_attention(
                    query[start:stop], key_cache, value_cache, meta.block_tables[i], meta.context_lens[i], scale
                )
        return out


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN's products take `dtype` on this CPU: float32 always, bfloat16 only with AVX-512 (BW, VL,
    DQ) or AVX-NE-CONVERT; on an AVX2-only CPU (AMD Zen 3, say) oneDNN refuses bfloat16 weights."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _widened_bfloat16_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
    """A bfloat16 product on a CPU whose oneDNN refuses bfloat16 (AVX2 only, see `onednn_supports`).

    Up to `WIDEN_MIN_ROWS - 1` rows (decoding one or a few sequences) `F.linear`: torch's own bfloat16 product
    streams the weight at ~17 GB/s there, a token faster than oneDNN's float32 one on twice the bytes. From
    `WIDEN_MIN_ROWS` rows on it falls 3-9x behind float32 (measured on a 2-core AMD Zen 3, the small preset's
    shapes: 3.6 against 0.50 ms for a 1280 x 768 weight at 32 rows, 56 against 7.4 at 512), so there each block
    of the weight's rows is widened to float32 in a scratch buffer of about `WIDEN_BLOCK_BYTES`, which stays
    in cache, and multiplied in float32 (torch.mm); the output is rounded to bfloat16 once, as a bfloat16
    product accumulating in float32 would. On that machine 1.5-1.9x the float32 product's time at 32 rows
    (0.75 ms for the 1280 x 768 weight; the 92544 x 768 lm_head 52-59 against 40 ms) and level with it at 512
    (blocks of 1 MB were slower, of 16 or 64 MB no faster, served slower: see the README's AVX2 figures)
    """
    out_features, in_features = weight.shape
    blocks = -(-out_features * in_features * 4 // WIDEN_BLOCK_BYTES)  # rows split evenly: no sliver of a block
    block_rows = -(-out_features // blocks)
    bias32 = None if bias is None else bias.float()

    def product(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows < WIDEN_MIN_ROWS:
            return F.linear(x, weight, bias)
        x32_t = x.float().t()  # [in, T]
        out_t = torch.empty(out_features, rows)  # [out, T]: a block of the weight's rows fills whole rows here
        scratch = _widening_scratch(block_rows * in_features).view(block_rows, in_features)
        for start in range(0, out_features, block_rows):
            stop = min(start + block_rows, out_features)
            block = scratch[: stop - start]
            block.copy_(weight[start:stop])
            torch.mm(block, x32_t, out=out_t[start:stop])
        if bias32 is not None:
            out_t += bias32[:, None]
        return x.new_empty((rows, out_features)).copy_(out_t.t())

    return product


_widening = threading.local()  # each thread's float32 scratch for `_widened_bfloat16_linear`


def _widening_scratch(numel: int) -> torch.Tensor:
    """This thread's flat float32 scratch of at least `numel` elements, one for every layer (its size: the
    largest block, `WIDEN_BLOCK_BYTES` and at most one row more)."""
    scratch = getattr(_widening, "scratch", None)
    if scratch is None or scratch.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: written in place in and out of inference mode
            scratch = _widening.scratch = torch.empty(numel)
    return scratch[:numel]


def _onednn_packable(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and onednn_supports(weight.dtype)
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """query [n, H, D], key/value [n, KV, D] of one sequence starting at position 0 -> [n, H, D]."""
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # (1, heads, n, D)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def _tile_tokens(bytes_per_token: int, block_size: int) -> int:
    """Keys per tile, a whole number of blocks, so that one tile takes about TILE_BYTES."""
    tokens = max(TILE_BYTES // max(bytes_per_token, 1), MIN_TILE_TOKENS)
    return max(tokens // block_size, 1) * block_size


def _gather_tile(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache [N, BS, KV, D], blocks [..., t] -> [..., KV, t·BS, D]: a tile's keys (or values) in position order."""
    tile = cache[blocks]  # (..., t, BS, KV, D)
    return tile.flatten(-4, -3).transpose(-3, -2)


def _single_token_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: list[int], scale: float,
) -> torch.Tensor:
    """One new token per request, query [b, H, D], attends to its context_lens[r] cached tokens -> [b, H, D]."""
    batch, heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = heads // kv_heads
    device = query.device
    q = query.view(batch, kv_heads, group, head_dim)  # the query heads of one KV head are consecutive
    lengths = torch.tensor(context_lens, device=device)
    # per key token: the float32 scores of every row, and the gathered keys and values
    tile_blocks = _tile_tokens(
        batch * (heads * 4 + 2 * kv_heads * head_dim * key_cache.element_size()), block_size
    ) // block_size
    num_blocks = math.ceil(max(context_lens) / block_size)

    if num_blocks <= tile_blocks:  # every context fits one tile: a plain softmax
        keys = _gather_tile(key_cache, block_tables[:, :num_blocks])  # (b, KV, span, D)
        values = _gather_tile(value_cache, block_tables[:, :num_blocks])
        hidden = torch.arange(keys.shape[2], device=device)[None, :] >= lengths[:, None]  # (b, span)
        if query.dtype == torch.float32:
            out = F.scaled_dot_product_attention(
                query.unsqueeze(2), keys, values, attn_mask=~hidden[:, None, None, :], scale=scale, enable_gqa=True
            )
            return out.squeeze(2)
        # Half precision: batched matmuls with a float32 softmax. For one query token they run ~2.5× faster
        # than the CPU flash-attention kernel, which is slow in bfloat16.
        scores = torch.matmul(q, keys.transpose(2, 3)).float() * scale  # (b, KV, G, span)
        scores.masked_fill_(hidden[:, None, None, :], -math.inf)
        out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # (b, KV, G, D)
        return out.view(batch, heads, head_dim)

    state = _OnlineSoftmax((batch, kv_heads, group), head_dim, device)
    for first in range(0, num_blocks, tile_blocks):
        start = first * block_size
        reaching = [r for r, length in enumerate(context_lens) if length > start]  # rows with keys in this tile
        rows = None if len(reaching) == batch else torch.tensor(reaching, device=device)
        tables = block_tables if rows is None else block_tables[rows]
        keys = _gather_tile(key_cache, tables[:, first : first + tile_blocks])  # (r, KV, span, D)
        values = _gather_tile(value_cache, tables[:, first : first + tile_blocks])
        scores = torch.matmul(q if rows is None else q[rows], keys.transpose(2, 3)).float() * scale  # (r, KV, G, span)
        positions = start + torch.arange(keys.shape[2], device=device)
        row_lengths = lengths if rows is None else lengths[rows]
        scores.masked_fill_((positions[None, :] >= row_lengths[:, None])[:, None, None, :], -math.inf)
        state.add(scores, values, rows)
    return state.result().to(query.dtype).view(batch, heads, head_dim)


def _chunk_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
    context_len: int, scale: float,
) -> torch.Tensor:
    """The last n tokens of one request's context, query [n, H, D], attend causally to everything before them
    and to each other: query row i (position p0 + i, p0 = context_len - n) sees keys 0 … p0 + i. -> [n, H, D]

    In float32, over tiles of queries × tiles of keys; a query tile's G query heads of one KV head are stacked
    into its rows so that each tile is one batched matmul per KV head.
    """
    n, heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = heads // kv_heads
    device = query.device
    first_position = context_len - n
    q = (query.float() * scale).view(n, kv_heads, group, head_dim).permute(1, 2, 0, 3)  # (KV, G, n, D)
    query_tile = min(n, 1024)
    key_tile = _tile_tokens(heads * query_tile * 4, block_size)
    out = torch.empty((kv_heads, group, n, head_dim), device=device)
    for q_start in range(0, n, query_tile):
        q_stop = min(n, q_start + query_tile)
        rows = q_stop - q_start
        q_tile = q[:, :, q_start:q_stop].reshape(kv_heads, group * rows, head_dim)
        q_positions = first_position + torch.arange(q_start, q_stop, device=device)  # (qt,)
        visible = first_position + q_stop  # keys [0, visible) matter to this query tile
        state = _OnlineSoftmax((kv_heads, group * rows), head_dim, device)
        for k_start in range(0, visible, key_tile):
            k_stop = min(visible, k_start + key_tile)
            blocks = block_table[k_start // block_size : math.ceil(k_stop / block_size)]
            keys = _gather_tile(key_cache, blocks)[:, : k_stop - k_start].float()  # (KV, span, D)
            values = _gather_tile(value_cache, blocks)[:, : k_stop - k_start].float()
            scores = torch.matmul(q_tile, keys.transpose(1, 2))  # (KV, G·qt, span)
            if k_stop - 1 > first_position + q_start:  # the tile reaches past the first query: causal mask
                k_positions = k_start + torch.arange(k_stop - k_start, device=device)
                future = k_positions[None, :] > q_positions[:, None]  # (qt, span)
                scores.view(kv_heads, group, rows, -1).masked_fill_(future, -math.inf)
            state.add(scores, values)
        out[:, :, q_start:q_stop] = state.result().view(kv_heads, group, rows, head_dim)
    return out.permute(2, 0, 1, 3).reshape(n, heads, head_dim).to(query.dtype)


def _fused_with_lse_available(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _fused_chunk_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    block_table: torch.Tensor, context_len: int, scale: float,
) -> torch.Tensor:
    """`_chunk_attention` with CPU's fused kernel: the chunk's own keys (key/value [n, KV, D]) attended causally,
    then the cached prefix a tile at a time, each part giving its output and log-sum-exp, merged exactly."""
    n, heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = heads // kv_heads
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    # The chunk's own keys, causally: queries and keys both start at its first position (top-left aligned). The
    # chunk is at most one step's tokens, so its keys are simply repeated for each query head.
    q = query.transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
    k, v = (t.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0) for t in (key, value))  # (1, H, n, D)
    out, lse = fused(q, k, v, 0.0, True, attn_mask=None, scale=scale)
    out, lse = out[0].float(), lse[0]  # (H, n, D), (H, n)

    # The cached prefix, which every query sees whole: the G query heads of a KV head become G·n rows against
    # that head's keys, so a (long) prefix tile is read as it is, never repeated per query head.
    rows = query.view(n, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * n, head_dim)
    prefix = context_len - n
    tile = _tile_tokens(2 * kv_heads * head_dim * key_cache.element_size(), block_size)
    for start in range(0, prefix, tile):
        stop = min(prefix, start + tile)
        blocks = block_table[start // block_size : math.ceil(stop / block_size)]
        keys = key_cache[blocks].flatten(0, 1)[: stop - start].transpose(0, 1).unsqueeze(0)  # (1, KV, t, D)
        values = value_cache[blocks].flatten(0, 1)[: stop - start].transpose(0, 1).unsqueeze(0)
        tile_out, tile_lse = fused(rows, keys, values, 0.0, False, attn_mask=None, scale=scale)
        tile_out = tile_out.reshape(heads, n, head_dim).float()  # rows (kv, g, i): head kv·G + g, query i
        tile_lse = tile_lse.reshape(heads, n)
        merged = torch.logaddexp(lse, tile_lse)
        out = out * torch.exp(lse - merged)[..., None] + tile_out * torch.exp(tile_lse - merged)[..., None]
        lse = merged
    return out.transpose(0, 1).to(query.dtype)
