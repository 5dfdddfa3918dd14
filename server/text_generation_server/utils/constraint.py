"""Constrained decoding on the shard: a request's grammar as a mask over its row of logits.

Each constrained request holds a `GrammarConstraint` (an llguidance matcher at the request's position in its
grammar). Before its token is chosen, `allowed_tokens` computes the mask of every constrained row of the step
at once, in llguidance's own thread pool (Rust, outside the GIL); the sampler sets every other id's score to
-inf, so greedy and sampled rows alike choose an allowed token, and the reported logprobs are those of the
masked distribution. The matcher then advances on the chosen token.

Once the grammar is complete the mask allows only the model's EOS ids. A matcher can still fail (llguidance
refuses a token, or a grammar exhausts its resource limits): the failure is logged and from then on only the
EOS ids are allowed, so the request ends at once and no other row of the step is affected.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import torch
from loguru import logger

# bit i of a mask word is id 32·w + i; int32 holds bit 31 as the sign bit
_BIT_VALUES = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32)
_executor: llguidance.LLExecutor | None = None


def _shared_executor() -> llguidance.LLExecutor:
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    return _executor


class GrammarConstraint:
    """One request's grammar: `matcher` starts at the grammar's beginning and has consumed `generated`."""

    def __init__(self, matcher: llguidance.LLMatcher, end_ids: Sequence[int], generated: Sequence[int] = ()):
        """end_ids: what the request may still choose once the matcher has failed (the model's EOS ids)."""
        if not end_ids:
            raise ValueError("a grammar constraint needs the ids that end its request")
        self.matcher = matcher
        self.end_ids = tuple(end_ids)
        self._reported = False
        if generated and not matcher.consume_tokens(list(generated)):
            self.note_failure()

    @property
    def failed(self) -> bool:
        return self.matcher.is_error()

    def advance(self, token_id: int) -> None:
        """The request chose `token_id`."""
        if not self.failed and not self.matcher.consume_token(token_id):
            self.note_failure()

    def note_failure(self) -> None:
        """Log the matcher's error, once."""
        if not self._reported:
            self._reported = True
            logger.warning(f"grammar matcher failed, the request ends: {self.matcher.get_error()}")


def allowed_tokens(constraints: Sequence[GrammarConstraint], vocab_size: int) -> torch.Tensor:
    """allowed [b, vocab_size] bool: row i holds the ids constraints[i] allows next."""
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros((len(constraints), words), dtype=torch.int32)
    live = [(c.matcher, i) for i, c in enumerate(constraints) if not c.failed]
    if live:
        _shared_executor().unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words * 4, len(constraints))
    allowed = (bitmask.unsqueeze(-1) & _BIT_VALUES) != 0  # [b, words, 32]
    allowed = allowed.flatten(1)[:, :vocab_size]
    for i, constraint in enumerate(constraints):
        if constraint.failed:
            constraint.note_failure()
            allowed[i, list(constraint.end_ids)] = True
    return allowed
