"""Paged KV cache and attention over it (pure PyTorch: the CPU reference, also correct on CUDA).

The cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim]. A *slot* is a
flat row of the [num_blocks * block_size, num_kv_heads, head_dim] view: slot = block_id * block_size + offset.
The caller (the router) owns the blocks; every token arrives with the slot its key and value go to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from text_generation_server.layers.rotary import apply_rotary


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of one token, got {num_blocks}×{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Key + value of one token in every layer: sized by the KV heads, not the attention heads."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class AttentionMetadata:
    """What every attention layer needs for one forward; built once per step by the engine.

    The forward runs T tokens: for a prefill, the prompts of the batch packed back to back; for a decode,
    one token per request (T = B).
    """

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slots: torch.Tensor  # [T] int64, cache row where each token's key/value is written
    cos: torch.Tensor  # [T, D/2] rotary tables in the model dtype
    sin: torch.Tensor  # [T, D/2]
    prefill_lengths: list[int] | None  # prefill only: tokens of each sequence, in packing order
    block_tables: torch.Tensor | None  # decode only: [B, max_blocks] int64 block ids, padded with 0
    context_lengths: torch.Tensor | None  # decode only: [B] tokens in the cache, the new one included

    @property
    def is_prefill(self) -> bool:
        return self.prefill_lengths is not None


def store_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key, value, slots: torch.Tensor) -> None:
    """key, value: [T, KV, D] written to rows `slots` [T] of the flattened caches."""
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slots, key)
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slots, value)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """query [T, H, D], key/value [T, KV, D] (already rotated) -> [T, H, D]; stores key/value first."""
    store_kv(key_cache, value_cache, key, value, meta.slots)
    if meta.is_prefill:
        return _prefill_attention(query, key, value, meta.prefill_lengths, scale)
    return _decode_attention(query, key_cache, value_cache, meta.block_tables, meta.context_lengths, scale)


def _prefill_attention(query, key, value, lengths: list[int], scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence; prompts start empty (no cached prefix)."""
    out = torch.empty_like(query)
    start = 0
    for length in lengths:
        stop = start + length
        # (1, heads, L, D) views for SDPA; GQA by broadcasting each KV head to its group of query heads
        q = query[start:stop].transpose(0, 1).unsqueeze(0)
        k = key[start:stop].transpose(0, 1).unsqueeze(0)
        v = value[start:stop].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        out[start:stop] = o.squeeze(0).transpose(0, 1)
        start = stop
    return out


def _decode_attention(query, key_cache, value_cache, block_tables, context_lengths, scale: float):
    """One new token per sequence attends to its whole cached context, read through its block table."""
    batch, max_blocks = block_tables.shape
    block_size, kv_heads, head_dim = key_cache.shape[1:]
    span = max_blocks * block_size
    # (B, KV, span, D): each sequence's blocks gathered in order, padding masked below
    keys = key_cache[block_tables].view(batch, span, kv_heads, head_dim).transpose(1, 2)
    values = value_cache[block_tables].view(batch, span, kv_heads, head_dim).transpose(1, 2)
    hidden = torch.arange(span, device=query.device)[None, :] >= context_lengths[:, None]  # (B, span)
    if query.dtype == torch.float32:
        out = F.scaled_dot_product_attention(
            query.unsqueeze(2), keys, values, attn_mask=~hidden[:, None, None, :], scale=scale, enable_gqa=True
        )
        return out.squeeze(2)
    # Half precision: plain batched matmuls with a float32 softmax. For one query token they run ~2.5× faster
    # than the CPU flash-attention kernel, which is slow in bfloat16 (in float32 that kernel is the faster one).
    group = query.shape[1] // kv_heads
    q = query.view(batch, kv_heads, group, head_dim)  # the query heads of one KV head are consecutive
    scores = torch.matmul(q, keys.transpose(2, 3)).float() * scale  # (B, KV, G, span)
    scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # (B, KV, G, D)
    return out.view(batch, kv_heads * group, head_dim)


class PagedSelfAttention(torch.nn.Module):
    """Rotary + paged attention around a fused qkv projection; the model file supplies the projections.

    Subclasses own the checkpoint-named linears and implement `project_qkv` (hidden -> [T, (H + 2·KV)·D] laid
    out as [q | k | v]) and `project_out` ([T, H·D] -> hidden).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_index: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_index = layer_index
        self.scale = head_dim**-0.5

    def project_qkv(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.project_qkv(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(tokens, self.num_heads, self.head_dim), meta.cos, meta.sin)
        k = apply_rotary(k.view(tokens, self.num_kv_heads, self.head_dim), meta.cos, meta.sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        attended = attention(
            q, k, v, kv_cache.keys[self.layer_index], kv_cache.values[self.layer_index], meta, self.scale
        )
        return self.project_out(attended.reshape(tokens, q_size))
