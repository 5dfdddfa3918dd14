"""When one request stops generating, with TGI's rules and order.

Called once per generated token:
  1. the token is counted; once max_new_tokens have been generated -> LENGTH (checked before EOS, so an EOS
     that is the last allowed token reports LENGTH, as in TGI);
  2. an EOS id, unless ignore_eos_token -> EOS_TOKEN;
  3. a stop sequence completed by this token's text -> STOP_SEQUENCE (the stop text stays in the output).
     Unlike TGI, which only matches at the very end of the text, a stop sequence that ends inside the token's
     text counts too: a token "Hello" stops the request at stop sequence "Hell".
"""

from __future__ import annotations

from text_generation_server.models.types import FinishReason, StoppingParameters


class StoppingCriteria:
    def __init__(self, eos_token_ids: frozenset[int], params: StoppingParameters) -> None:
        if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {params.max_new_tokens!r}")
        for stop in params.stop_sequences:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop sequences must be non-empty strings, got {stop!r}")
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_new_tokens = params.max_new_tokens
        self.stop_sequences = tuple(params.stop_sequences)
        self.ignore_eos_token = params.ignore_eos_token
        self.generated_tokens = 0
        # Text older than the longest stop sequence can no longer start a match, so a tail that long is kept.
        self._tail_length = max((len(stop) for stop in self.stop_sequences), default=0)
        self._text_tail = ""

    def __call__(self, token_id: int, token_text: str) -> FinishReason | None:
        """Records one generated token; the reason to stop after it, or None to go on."""
        self.generated_tokens += 1
        if self.generated_tokens >= self.max_new_tokens:
            return FinishReason.LENGTH
        if not self.ignore_eos_token and token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if self.stop_sequences and self._completes_stop_sequence(token_text):
            return FinishReason.STOP_SEQUENCE
        return None

    def _completes_stop_sequence(self, token_text: str) -> bool:
        # Invariant: _text_tail holds the last <= _tail_length - 1 characters before this token, so every match
        # found in `window` ends inside the new text and none was already reported by an earlier token.
        window = self._text_tail + token_text
        self._text_tail = window[len(window) - self._tail_length + 1 :] if self._tail_length > 1 else ""
        return any(stop in window for stop in self.stop_sequences)
