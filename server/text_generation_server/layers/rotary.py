"""Rotary position tables (rotate-half convention, shared by InternLM2 and Llama); the rotation itself is an op.

Dynamic NTK is the pure per-length form: a token of a sequence whose length L exceeds max_position_embeddings
M is rotated with `base' = base · (factor·L/M − (factor − 1))^(D/(D−2))`, every other token with the unchanged
base. L is given per token by the engine: for a prompt token the whole prompt's length (however the prompt is
chunked), for a generated token at position p its own length p + 1. So nothing is carried between steps or
requests, a request's tokens do not depend on what else is in the batch, and keys already in the cache keep
the base they were rotated with. `linear` divides the positions by the factor.
"""

from __future__ import annotations

import torch

class RotaryEmbedding:
    def __init__(
        self, head_dim: int, base: float, max_position_embeddings: int, scaling_type: str | None = None,
        scaling_factor: float = 1.0,
    ):
        assert scaling_type in (None, "linear", "dynamic"), "the model config validates rope_scaling"
        self.head_dim = head_dim
        self.base = base
        self.max_position_embeddings = max_position_embeddings
        self.scaling_type = scaling_type
        self.scaling_factor = scaling_factor
        # [D/2]: exponents 2i/D of the inverse frequencies
        self._exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self._inv_freq = 1.0 / (base**self._exponents)
        if scaling_type == "linear":
            self._inv_freq = self._inv_freq / scaling_factor

    @property
    def is_dynamic(self) -> bool:
        return self.scaling_type == "dynamic"

    def cos_sin(
        self, positions: torch.Tensor, sequence_lengths: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [T, D/2] in `dtype`, for tokens at `positions` [T] of sequences of `sequence_lengths` [T]."""
        inv_freq = self._inv_freq.to(positions.device)
        if self.is_dynamic:
            inv_freq = self._dynamic_inv_freq(sequence_lengths)  # [T, D/2]
        freqs = positions.float()[:, None] * inv_freq  # [T, D/2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def _dynamic_inv_freq(self, sequence_lengths: torch.Tensor) -> torch.Tensor:
        factor, limit, dim = self.scaling_factor, self.max_position_embeddings, self.head_dim
        length = torch.clamp(sequence_lengths, min=limit)  # at or below M the formula gives the base itself
        base = self.base * ((factor * length / limit) - (factor - 1)) ** (dim / (dim - 2))  # [T]
        scaled = 1.0 / (base[:, None] ** self._exponents.to(base.device))
        unscaled = self._inv_freq.to(base.device).expand_as(scaled)
        return torch.where((sequence_lengths > limit)[:, None], scaled, unscaled)
