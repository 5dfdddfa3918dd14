"""Rotary position embedding (rotate-half convention, shared by InternLM2 and Llama).

Dynamic NTK here is the pure per-length form (internlm2.md §4): a token of a sequence whose length L exceeds
max_position_embeddings M is rotated with `base' = base · (factor·L/M − (factor − 1))^(D/(D−2))`, every other
token with the unchanged base. L is the sequence's own length at the step that computes the token (the prompt
length at prefill, position + 1 in decode), so nothing is carried between steps or requests and a request's
tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from text_generation_server.models.config import RopeScaling


class RotaryEmbedding:
    def __init__(
        self, head_dim: int, base: float, max_position_embeddings: int, scaling: RopeScaling | None
    ):
        self.head_dim = head_dim
        self.base = base
        self.max_position_embeddings = max_position_embeddings
        self.scaling = scaling
        # [D/2]: exponents 2i/D of the inverse frequencies
        self._exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self._inv_freq = 1.0 / (base ** self._exponents)
        if scaling is not None and scaling.type == "linear":
            self._inv_freq = self._inv_freq / scaling.factor

    def cos_sin(
        self, positions: torch.Tensor, sequence_lengths: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [T, D/2] in `dtype`, for tokens at `positions` [T] of sequences of `sequence_lengths` [T]."""
        inv_freq = self._inv_freq.to(positions.device)
        if self.scaling is not None and self.scaling.type == "dynamic":
            inv_freq = self._dynamic_inv_freq(sequence_lengths)  # [T, D/2]
        freqs = positions.float()[:, None] * inv_freq  # [T, D/2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def _dynamic_inv_freq(self, sequence_lengths: torch.Tensor) -> torch.Tensor:
        factor, limit, dim = self.scaling.factor, self.max_position_embeddings, self.head_dim
        length = torch.clamp(sequence_lengths, min=limit)  # at or below M the formula gives the base itself
        base = self.base * ((factor * length / limit) - (factor - 1)) ** (dim / (dim - 2))  # [T]
        scaled = 1.0 / (base[:, None] ** self._exponents.to(base.device))
        unscaled = self._inv_freq.to(base.device).expand_as(scaled)
        return torch.where((sequence_lengths > limit)[:, None], scaled, unscaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, D/2]. Returns x rotated, same shape and dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
