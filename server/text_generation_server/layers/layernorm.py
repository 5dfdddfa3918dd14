from __future__ import annotations

import torch
from torch import nn

from text_generation_server.ops import Ops


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x²) + eps)` through the device's ops (statistics in float32)."""

    def __init__(self, weight: torch.Tensor, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.ops = ops

    @classmethod
    def load(cls, weights, name: str, size: int, eps: float, ops: Ops) -> RMSNorm:
        return cls(weights.get_tensor(f"{name}.weight", (size,)), eps, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream's next value `residual + x` and its normalisation: (normed, residual + x). With no
        residual yet (the first layer's input), x is the stream: (normed x, x)."""
        if residual is None:
            return self(x), x
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
