"""The pure-PyTorch ops backend: paged attention over a ragged batch, against attention written out in full."""

from __future__ import annotations

import math
import random

import pytest
import torch

from text_generation_server.ops import AttentionMetadata, reference
from text_generation_server.ops.reference import ReferenceOps

BLOCK_SIZE = 4
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16


def attention_in_full(query, keys, values, first_position: int, scale: float) -> torch.Tensor:
    """query [n, H, D] at positions first_position…, keys/values [L, KV, D] of the whole context (float64)."""
    group = HEADS // KV_HEADS
    k, v = keys.repeat_interleave(group, 1).double(), values.repeat_interleave(group, 1).double()
    scores = torch.einsum("nhd,lhd->hnl", query.double(), k) * scale
    positions = first_position + torch.arange(query.shape[0])
    scores.masked_fill_(torch.arange(keys.shape[0])[None, :] > positions[:, None], -math.inf)
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def ragged_step(dtype, requests: list[tuple[int, int]], seed: int = 0):
    """A KV cache holding each request's cached prefix, and one step computing each one's new tokens.

    requests: (cached prefix length, new tokens). Returns the ops, the cache, query/key/value of the new tokens,
    the metadata and every request's whole keys/values."""
    ops = ReferenceOps()
    cache = ops.allocate_kv_cache(1, 1024, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    free = list(range(1024))
    random.Random(seed).shuffle(free)  # block tables in no particular order
    tables, contexts, parts, positions, slots = [], [], [], [], []
    for prefix, n in requests:
        length = prefix + n
        table = [free.pop() for _ in range(-(-length // BLOCK_SIZE))]
        keys = torch.randn(length, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
        values = torch.randn(length, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
        for p in range(prefix):  # the cached prefix, written by earlier steps
            cache.keys[0][table[p // BLOCK_SIZE], p % BLOCK_SIZE] = keys[p]
            cache.values[0][table[p // BLOCK_SIZE], p % BLOCK_SIZE] = values[p]
        query = torch.randn(n, HEADS, HEAD_DIM, generator=generator).to(dtype)
        tables.append(table)
        contexts.append((keys, values))
        parts.append((query, keys[prefix:], values[prefix:]))
        positions += range(prefix, length)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(prefix, length)]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        query_lens=[n for _, n in requests],
        context_lens=[p + n for p, n in requests],
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        positions=torch.tensor(positions),
        slots=torch.tensor(slots),
        cos=torch.ones(len(positions), HEAD_DIM // 2),
        sin=torch.zeros(len(positions), HEAD_DIM // 2),
    )
    query, key, value = (torch.cat([part[i] for part in parts]) for i in range(3))
    return ops, cache, query, key, value, meta, contexts


# decode tokens, prompts from an empty cache, and chunks after a cached prefix, in one ragged step
MIXED = [(0, 1), (10, 1), (0, 7), (13, 9), (37, 1), (50, 30), (3, 1), (0, 2)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel-merge", "online-softmax"])
@pytest.mark.parametrize("tile_bytes", [64 << 20, 3000])  # one tile; many tiles merged
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_ragged_step_equals_attention_in_full(monkeypatch, fused, tile_bytes, dtype, tolerance):
    monkeypatch.setattr(reference, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(reference, "MIN_TILE_TOKENS", BLOCK_SIZE)
    monkeypatch.setattr(reference, "_fused_with_lse_available", lambda query: fused)
    ops, cache, query, key, value, meta, contexts = ragged_step(dtype, MIXED)
    ops.write_kv(cache, 0, key, value, meta)
    out = ops.paged_attention(query, key, value, cache, 0, meta, scale=0.25)
    assert out.shape == query.shape and out.dtype == dtype
    for i, ((prefix, n), (keys, values)) in enumerate(zip(MIXED, contexts)):
        start, stop = meta.query_starts[i], meta.query_starts[i + 1]
        expected = attention_in_full(query[start:stop].float(), keys.float(), values.float(), prefix, 0.25)
        torch.testing.assert_close(out[start:stop].double(), expected, atol=tolerance, rtol=tolerance)


def test_a_pure_decode_step_equals_attention_in_full(monkeypatch):
    monkeypatch.setattr(reference, "TILE_BYTES", 3000)
    monkeypatch.setattr(reference, "MIN_TILE_TOKENS", BLOCK_SIZE)
    requests = [(5, 1), (60, 1), (1, 1), (33, 1)]
    ops, cache, query, key, value, meta, contexts = ragged_step(torch.float32, requests)
    ops.write_kv(cache, 0, key, value, meta)
    out = ops.paged_attention(query, key, value, cache, 0, meta, scale=0.25)
    for i, ((prefix, _), (keys, values)) in enumerate(zip(requests, contexts)):
        expected = attention_in_full(query[i : i + 1], keys, values, prefix, 0.25)
        torch.testing.assert_close(out[i : i + 1].double(), expected, atol=1e-5, rtol=1e-5)


def test_tiles_bound_the_scores_of_a_long_context(monkeypatch):
    """A 64-token chunk after a 2,000-token prefix, with tiles of 64 keys: no tensor the size of the score matrix
    ([heads, 64, 2064] float32) is made, and the result is that of attention in full."""
    monkeypatch.setattr(reference, "TILE_BYTES", HEADS * 64 * 4 * 64)  # 64 keys per tile for 64 queries
    monkeypatch.setattr(reference, "MIN_TILE_TOKENS", BLOCK_SIZE)
    monkeypatch.setattr(reference, "_fused_with_lse_available", lambda query: False)
    requests = [(2000, 64)]
    ops, cache, query, key, value, meta, contexts = ragged_step(torch.float32, requests)
    largest = []
    original = reference._OnlineSoftmax.add

    def spy(self, scores, values, rows=None):
        largest.append(scores.numel())
        return original(self, scores, values, rows)

    monkeypatch.setattr(reference._OnlineSoftmax, "add", spy)
    ops.write_kv(cache, 0, key, value, meta)
    out = ops.paged_attention(query, key, value, cache, 0, meta, scale=0.25)
    assert len(largest) > 30 and max(largest) <= HEADS * 64 * 64
    expected = attention_in_full(query, *contexts[0], 2000, 0.25)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
