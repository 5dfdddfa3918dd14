"""Self-attention over the paged KV cache: projections from the model file, kernels from the device's ops."""

from __future__ import annotations

import torch

from text_generation_server.ops import AttentionMetadata, KVCache, Ops


class PagedSelfAttention(torch.nn.Module):
    """Rotary + paged attention around a fused qkv projection; the model file supplies the projections.

    Subclasses own the checkpoint-named linears and implement `project_qkv` (hidden -> [T, (H + 2·KV)·D] laid
    out as [q | k | v]) and `project_out` ([T, H·D] -> hidden).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_index: int, ops: Ops):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_index = layer_index
        self.scale = head_dim**-0.5
        self.ops = ops

    def project_qkv(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.project_qkv(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q, k = self.ops.rotary(q, k, meta)  # [T, H·D], [T, KV·D]
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        self.ops.write_kv(kv_cache, self.layer_index, k, v, meta)
        attended = self.ops.paged_attention(q, k, v, kv_cache, self.layer_index, meta, self.scale)
        return self.project_out(attended.reshape(tokens, q_size))
