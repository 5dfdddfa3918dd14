"""Llama (Hugging Face `LlamaForCausalLM` checkpoints) on a paged KV cache.

Module names follow the checkpoint, except that q/k/v are stacked into one `qkv_proj` at load time so the
forward does one projection.
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
    column_shard,
    load_merged_column_shards,
)
from text_generation_server.models.config import ModelConfig
from text_generation_server.ops import AttentionMetadata, KVCache, Ops


class LlamaAttention(PagedSelfAttention):
    def __init__(self, prefix: str, config: ModelConfig, weights, layer_index: int, ops: Ops):
        world = weights.tp.world_size
        super().__init__(
            config.num_attention_heads // world, config.num_key_value_heads // world, config.head_dim, layer_index,
            ops,
        )
        hidden, bias = config.hidden_size, config.attention_bias
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_key_value_heads * config.head_dim
        # each rank takes its block of heads from q, k and v: whole heads since world divides both counts
        parts = [
            column_shard(weights, f"{prefix}.{name}", hidden, rows, bias=bias)
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows))
        ]
        self.qkv_proj = Linear(
            torch.cat([weight for weight, _ in parts]),
            torch.cat([bias_part for _, bias_part in parts]) if bias else None,
            weights.ops,
        )
        self.o_proj = RowParallelLinear.load(weights, f"{prefix}.o_proj", q_rows, hidden, bias=bias)

    def project_qkv(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.qkv_proj(hidden)

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attended)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate x) · up x), with gate and up as one product [gate; up] x; split by output rows
    over the ranks, down by input columns."""

    def __init__(self, prefix: str, config: ModelConfig, weights, ops: Ops):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.ops = ops
        self.gate_up_proj = load_merged_column_shards(
            weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], hidden, inner
        )
        self.down_proj = RowParallelLinear.load(weights, f"{prefix}.down_proj", inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, prefix: str, config: ModelConfig, weights, layer_index: int, ops: Ops):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm.load(weights, f"{prefix}.input_layernorm", hidden, eps, ops)
        self.self_attn = LlamaAttention(f"{prefix}.self_attn", config, weights, layer_index, ops)
        self.post_attention_layernorm = RMSNorm.load(weights, f"{prefix}.post_attention_layernorm", hidden, eps, ops)
        self.mlp = LlamaMLP(f"{prefix}.mlp", config, weights, ops)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (the MLP's output, the residual stream before it is added), as InternLM2's
        layer: each residual add happens inside the next norm."""
        normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        attended = self.self_attn(normed, kv_cache, meta)
        normed, residual = self.post_attention_layernorm.add_and_norm(attended, residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, prefix: str, config: ModelConfig, weights, ops: Ops):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding.load(
            weights, f"{prefix}.embed_tokens", config.vocab_size, config.hidden_size
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(f"{prefix}.layers.{i}", config, weights, i, ops) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm.load(weights, f"{prefix}.norm", config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, kv_cache, meta)
        return self.norm.add_and_norm(hidden, residual)[0]


class FlashLlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, weights, ops: Ops):
        super().__init__()
        self.model = LlamaModel("model", config, weights, ops)
        # A tied head reuses the embedding; some tied checkpoints still carry a copy of it as lm_head.weight.
        if config.tie_word_embeddings and not weights.has("lm_head.weight"):
            self.lm_head = ParallelLMHead(self.model.embed_tokens.weight, config.vocab_size, weights.tp, ops)
        else:
            self.lm_head = ParallelLMHead.load(weights, "lm_head", config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        return self.lm_head(hidden)
