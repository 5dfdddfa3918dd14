"""What goes into the engine and what comes out of it, one step at a time.

These plain dataclasses mirror the shard protocol (TGI's v3 `generate.proto`): the gRPC servicer turns
protobuf messages into them and back, and tests drive the engine with them directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParameters:
    """How one request chooses its next token. The defaults disable every processor (greedy)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: disabled
    top_p: float = 1.0  # 1.0: disabled
    typical_p: float = 1.0  # 1.0: disabled
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0  # 1.0: none
    frequency_penalty: float = 0.0  # 0.0: none

    @property
    def is_greedy(self) -> bool:
        """True when the choice is an argmax: no sampling flag and no warper that implies sampling."""
        return not self.do_sample and self.temperature == 1.0 and self.top_k == 0 and (
            self.top_p == 1.0 and self.typical_p == 1.0
        )


@dataclass(frozen=True)
class StoppingParameters:
    max_new_tokens: int = 20
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False


@dataclass(frozen=True)
class Request:
    """One generation request as the router hands it to the engine.

    `blocks` are allocated by the caller (the router owns the KV cache): block i holds the keys/values of
    positions [i·block_size, (i+1)·block_size). They must cover the prompt; the caller appends more as the
    request grows (`FlashCausalLM.extend_block_tables`). `slots`, when given, spell out the flat cache row of
    each position (block_id · block_size + offset) and must agree with `blocks`.
    """

    id: int
    input_ids: tuple[int, ...]
    blocks: tuple[int, ...]
    slots: tuple[int, ...] = ()
    parameters: SamplingParameters = SamplingParameters()
    stopping: StoppingParameters = StoppingParameters()
    prefill_logprobs: bool = False
    top_n_tokens: int = 0


class FinishReason(enum.IntEnum):
    LENGTH = 0
    EOS_TOKEN = 1
    STOP_SEQUENCE = 2


@dataclass
class Tokens:
    """Parallel lists, one entry per token."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    is_special: list[bool] = field(default_factory=list)


@dataclass
class GeneratedText:
    text: str  # every generated token decoded at once, special tokens skipped
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None  # set only for sampled requests


@dataclass
class Generation:
    """What one request produced in one step."""

    request_id: int
    prefill_tokens: Tokens | None  # on the prefill step when asked; the first token's logprob is NaN
    tokens: Tokens  # the token chosen in this step (its text is the streamed increment)
    generated_text: GeneratedText | None  # set when the request finished in this step
    top_tokens: Tokens | None  # the top_n_tokens best alternatives, when asked
