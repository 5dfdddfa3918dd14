"""The text of a generation: detokenized once, by the router, for every API; stop sequences matched on it.

One `TextStream` per request turns its generated token ids into text as they arrive. Each token's piece is what
it adds to the text: decoded in the context of the tokens before it (sentencepiece derives a word's leading
space from context), and held back while it ends in an incomplete UTF-8 character. The final text is the pieces
joined, so what a stream sent and the final `generated_text` agree by construction, on every API.

Special tokens (<s>, </s>, <|im_end|>, ...) carry no text: their piece is "" and the final text skips them,
except those the request shows (`shown_special_ids`: every special token for a client that turns
`skip_special_tokens` off, InternLM2's tool markers for a chat with tools), whose piece is their content. The
token that ends a request by EOS is never shown: it is not part of what was generated.

A stop sequence ends the request once the text contains it (the stop text stays in the output). Matching is
incremental: text older than the longest stop sequence cannot start a match, so only a tail that long is kept.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

PROMPT_CONTEXT = 5  # prompt tokens decoded before the first generated one, for its leading space


class TextStream:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stop_sequences: Sequence[str] = (),
        shown_special_ids: Collection[int] = frozenset(),
    ):
        for stop in stop_sequences:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop sequences must be non-empty strings, got {stop!r}")
        self._tokenizer = tokenizer
        self._special = tokenizer.special_token_ids
        self._shown = frozenset(shown_special_ids)
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])  # context, then the generated ordinary tokens
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop_sequences = tuple(stop_sequences)
        self._tail_length = max((len(stop) for stop in self._stop_sequences), default=0)
        self._tail = ""
        self.text = ""  # everything streamed so far
        self.stopped = False  # a stop sequence has appeared in the text

    def push(self, token_id: int, ends_by_eos: bool = False) -> str:
        """The text `token_id` adds (possibly "" for now); sets `stopped` when it completes a stop sequence.
        ends_by_eos: the token is the EOS id that ends the request."""
        if token_id in self._special:
            if ends_by_eos or token_id not in self._shown:
                return ""
            held = self.flush()  # text held back (an incomplete character) goes first
            content = self._tokenizer.id_to_token(token_id)
            self._add(content)
            return held + content
        self._ids.append(token_id)
        piece, self._prefix_offset, self._read_offset = self._tokenizer.decode_incremental(
            self._ids, self._prefix_offset, self._read_offset
        )
        self._add(piece)
        return piece

    def flush(self) -> str:
        """At the end: the text still held back (an incomplete UTF-8 character, decoded as U+FFFD)."""
        held = self._tokenizer.decode(self._ids[self._prefix_offset :])
        done = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        piece = held[len(done) :] if self._read_offset < len(self._ids) else ""
        self._read_offset = len(self._ids)
        self._add(piece)
        return piece

    def _add(self, piece: str) -> None:
        self.text += piece
        if not self._stop_sequences or not piece:
            return
        # Invariant: _tail holds the last _tail_length - 1 characters before `piece`, so every match in `window`
        # ends inside the new text and none was reported already.
        window = self._tail + piece
        self._tail = window[-(self._tail_length - 1) :] if self._tail_length > 1 else ""
        if any(stop in window for stop in self._stop_sequences):
            self.stopped = True
