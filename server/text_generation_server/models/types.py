"""What goes into the engine and what comes out of it, one step at a time.

These plain dataclasses mirror the shard protocol (`proto/generate.proto`): the gRPC servicer turns protobuf
messages into them and back, and tests drive the engine with them directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
    frequency_penalty: float = 0.0  # 0.0: none; TGI's: count / length over prompt + generated tokens
    presence_penalty: float = 0.0  # 0.0: none; OpenAI's: once per id present among the generated tokens
    output_frequency_penalty: float = 0.0  # 0.0: none; OpenAI's frequency_penalty: count among generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias) pairs added to the logits first

    @property
    def is_greedy(self) -> bool:
        """True when the choice is an argmax: no sampling flag and no warper that implies sampling."""
        return not self.do_sample and self.temperature == 1.0 and self.top_k == 0 and (
            self.top_p == 1.0 and self.typical_p == 1.0
        )


@dataclass(frozen=True)
class StoppingParameters:
    """What ends a request on the shard: its length, or an EOS id. Stop sequences are the router's (text)."""

    max_new_tokens: int = 20
    ignore_eos_token: bool = False
    stop_token_ids: tuple[int, ...] = ()  # end the request like the model's EOS ids (e.g. <|im_end|> of a chat)


@dataclass(frozen=True)
class NewRequest:
    """A request the shard does not hold yet: its first step, or its first step after a preemption."""

    token_ids: tuple[int, ...]  # every token so far: the prompt, then any tokens generated before a preemption
    prompt_length: int  # the original prompt's length (tokens past it count as generated)
    num_cached_tokens: int = 0  # tokens at the start whose keys/values are already in its first blocks
    parameters: SamplingParameters = SamplingParameters()
    stopping: StoppingParameters = StoppingParameters()
    prefill_logprobs: bool = False
    top_n_tokens: int = 0
    grammar: str = ""  # an llguidance grammar its generated tokens follow; "" for none
    token_logprobs: bool = True  # the chosen tokens' logprobs are wanted (else NaN, unless top_n_tokens > 0)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: `num_tokens` tokens computed from its first uncomputed position."""

    id: int
    num_tokens: int
    new_blocks: tuple[int, ...] = ()  # appended to its block table first, in position order
    new: NewRequest | None = None  # set on the first step of a request the shard does not hold


@dataclass(frozen=True)
class Step:
    """One forward over a ragged batch, as the router planned it."""

    requests: tuple[ScheduledRequest, ...] = ()
    released: tuple[int, ...] = ()  # requests to forget before the step (finished by the router, cancelled, preempted)
    # planned before the previous step's results were known: a request that finished in that step is skipped
    # where it is scheduled or released
    pipelined: bool = False


class FinishReason(enum.IntEnum):
    LENGTH = 0
    EOS_TOKEN = 1


@dataclass
class Tokens:
    """Parallel lists, one entry per token."""

    ids: list[int]
    logprobs: list[float]


@dataclass
class Generation:
    """What one request produced in one step: prompt logprobs of the chunk it computed, the token it chose."""

    request_id: int
    prefill: Tokens | None = None  # prompt tokens this step's chunk covers, when asked (position 0's logprob: NaN)
    token_id: int | None = None  # None while the request is still computing its prompt
    logprob: float = 0.0
    top_tokens: Tokens | None = None  # the top_n_tokens best alternatives, when asked
    finish_reason: FinishReason | None = None  # set when this token ended the request
