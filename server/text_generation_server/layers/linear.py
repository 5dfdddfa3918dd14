from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """`y = x Wᵀ + b` with W [out, in] as checkpoints store it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def load(cls, weights, name: str, in_features: int, out_features: int, bias: bool = False) -> Linear:
        weight = weights.get_tensor(f"{name}.weight", (out_features, in_features))
        bias_tensor = weights.get_tensor(f"{name}.bias", (out_features,)) if bias else None
        return cls(weight, bias_tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
