"""Constrained decoding on the shard: a request's grammar as a mask over its row of logits.

Each constrained request holds a `GrammarConstraint` (an llguidance matcher at the request's position in its
grammar). Before its token is chosen, `allowed_tokens` computes the mask of every constrained row of the step
(tens of microseconds a row, in Rust); the sampler sets every other id's score to -inf, so greedy and sampled
rows alike choose an allowed token, and the reported logprobs are those of the masked distribution. The
matcher then advances on the chosen token.

The masks are computed one row after another on the calling thread. llguidance's parallel executor was
measured too: on a 2-core machine it was slower for 32 rows, and its worker threads kept spinning into the next
forward, which then ran up to 15% slower.

Once the grammar is complete the mask allows only the model's EOS ids. A matcher can still fail (llguidance
refuses a token, or a grammar exhausts its resource limits): the failure is logged and from then on only the
EOS ids are allowed, so the request ends at once and no other row of the step is affected.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import numpy as np
import torch
from loguru import logger


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
    """allowed [b, vocab_size] bool (CPU): row i holds the ids constraints[i] allows next."""
    words = (vocab_size + 31) // 32
    bitmask = np.zeros((len(constraints), words), dtype=np.int32)  # id j is bit j % 8 of byte j // 8
    for i, constraint in enumerate(constraints):
        if not constraint.failed:
            constraint.matcher.unsafe_compute_mask_ptr(bitmask[i].ctypes.data, words * 4)
    # one byte per id; numpy unpacks bits ~20x faster than shifting and masking tensors
    unpacked = np.unpackbits(bitmask.view(np.uint8), axis=1, count=vocab_size, bitorder="little")
    allowed = torch.from_numpy(unpacked).view(torch.bool)
    for i, constraint in enumerate(constraints):
        if constraint.failed:
            constraint.note_failure()
            allowed[i, list(constraint.end_ids)] = True
    return allowed
