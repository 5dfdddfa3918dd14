"""Linear layers, whole or split over the tensor-parallel ranks.

Checkpoints store W as [out, in]. A column-parallel linear keeps a block of output rows per rank (no
communication: each rank computes its part of the output); a row-parallel linear keeps a block of input
columns and sums the partial outputs over the ranks. World size 1 reads whole tensors and never communicates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from text_generation_server.ops import Ops
from text_generation_server.utils.dist import SINGLE_RANK, TensorParallelGroup


class Linear(nn.Module):
    """`y = x Wᵀ + b`, replicated on every rank; x is [T, in]. The product is the ops backend's (`Ops.linear`),
    which may keep the weight only in its own packed form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ops: Ops):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.product = ops.linear(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


def column_shard(weights, name: str, in_features: int, out_features: int, bias: bool = False):
    """This rank's block of output rows of `name`: (weight [rows, in], bias [rows] or None)."""
    start, stop = weights.tp.shard_range(out_features)
    weight = weights.get_rows(f"{name}.weight", start, stop, (out_features, in_features))
    bias_tensor = weights.get_rows(f"{name}.bias", start, stop, (out_features,)) if bias else None
    return weight, bias_tensor


def load_merged_column_shards(weights, names: list[str], in_features: int, out_features: int) -> Linear:
    """One column-parallel linear for several same-shape ones (SwiGLU's gate and up): this rank's output rows
    of each, stacked in the order of `names`, so one matrix product computes all of them."""
    stacked = torch.cat([column_shard(weights, name, in_features, out_features)[0] for name in names])
    return Linear(stacked, None, weights.ops)


class RowParallelLinear(nn.Module):
    """This rank's block of input columns; the output is summed over the ranks, then the bias added once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallelGroup, ops: Ops):
        super().__init__()
        self.linear = Linear(weight, None, ops)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.tp = tp

    @classmethod
    def load(cls, weights, name: str, in_features: int, out_features: int, bias: bool = False) -> RowParallelLinear:
        start, stop = weights.tp.shard_range(in_features)
        weight = weights.get_columns(f"{name}.weight", start, stop, (out_features, in_features))
        bias_tensor = weights.get_tensor(f"{name}.bias", (out_features,)) if bias else None
        return cls(weight, bias_tensor, weights.tp, weights.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.linear(x))
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of ceil(V / world) vocabulary rows; lookups are summed over ranks."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, tp: TensorParallelGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [rows of this rank, hidden]
        self.vocab_start = vocab_start
        self.tp = tp

    @classmethod
    def load(cls, weights, name: str, vocab_size: int, hidden: int) -> VocabParallelEmbedding:
        start, stop = vocab_block(vocab_size, weights.tp)
        weight = weights.get_rows(f"{name}.weight", start, stop, (vocab_size, hidden))
        return cls(weight, start, weights.tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[:, None]
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Module):
    """Logits for a vocabulary block per rank, gathered into [N, V] on every rank (all ranks see all logits)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TensorParallelGroup, ops: Ops):
        super().__init__()
        block = math.ceil(vocab_size / tp.world_size)
        if weight.shape[0] < block:  # the last rank's block is short when V % world != 0: pad with zero rows
            weight = torch.cat([weight, weight.new_zeros(block - weight.shape[0], weight.shape[1])])
        self.product = ops.logits_linear(weight)
        self.dtype = weight.dtype
        self.vocab_size = vocab_size
        self.tp = tp

    @classmethod
    def load(cls, weights, name: str, vocab_size: int, hidden: int) -> ParallelLMHead:
        start, stop = vocab_block(vocab_size, weights.tp)
        weight = weights.get_rows(f"{name}.weight", start, stop, (vocab_size, hidden))
        return cls(weight, vocab_size, weights.tp, weights.ops)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, V]."""
        logits = self.product(hidden).float()
        return self.tp.all_gather_last_dim(logits)[:, : self.vocab_size]


def vocab_block(vocab_size: int, tp: TensorParallelGroup = SINGLE_RANK) -> tuple[int, int]:
    block = math.ceil(vocab_size / tp.world_size)
    start = min(tp.rank * block, vocab_size)
    return start, min(start + block, vocab_size)
