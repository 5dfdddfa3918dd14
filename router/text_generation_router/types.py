"""What the router's front ends (HTTP, OpenAI, public gRPC) and its core (validation, scheduler) exchange.

Nothing here imports torch: the router runs beside the shards and only moves token ids and text.

Flow: a front end turns a client request into a `GenerationRequest` through `Validation`, then iterates
`Infer.stream(request)`, which yields one `StreamToken` per generated token; the last one carries the
`StreamEnd`, so no front end has to guess which token is last. Closing the iterator early (a client that
disconnects) cancels the request; its KV blocks are freed within one scheduler step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: these modules import this one
    from text_generation_common.tokenizer import Tokenizer

    from .infer import Infer
    from .validation import Validation

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class SamplingParams:
    """The shard's NextTokenChooserParameters, already validated. Defaults: greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # TGI's: count / length over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI's: once per id among the generated tokens
    output_frequency_penalty: float = 0.0  # OpenAI's frequency_penalty: count among the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias): added to the logits before anything else


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request, ready to queue."""

    input_ids: tuple[int, ...]  # tokenized and truncated prompt, never empty
    parameters: SamplingParams
    max_new_tokens: int  # >= 1; len(input_ids) + max_new_tokens <= max_total_tokens
    stop_sequences: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # more ids that end it like EOS (<|im_end|> for a chat)
    ignore_eos_token: bool = False
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    token_logprobs: bool = True  # each chosen token's logprob is reported (else None, unless top_n_tokens > 0)
    grammar: str = ""  # constrained decoding: an llguidance grammar, checked to compile ("" for none)
    shown_special_ids: frozenset[int] = frozenset()  # special tokens whose text the output keeps (else "")


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None  # None for the first prompt token (it has no logprob)
    special: bool = False


@dataclass(frozen=True)
class StreamEnd:
    """How a request ended; carried by its last StreamToken."""

    generated_text: str  # every streamed token's text joined
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None  # the seed used, for sampled requests only
    input_length: int
    queue_s: float = 0.0  # time waiting in the queue before the first step
    inference_s: float = 0.0  # time from the first step to the end


@dataclass(frozen=True)
class StreamToken:
    """One generated token, as streamed."""

    token: Token  # text: what the token adds to the generated text ("" for special tokens not shown)
    top_tokens: tuple[Token, ...] = ()  # the top_n_tokens best alternatives, best first (each decoded alone)
    prefill: tuple[Token, ...] | None = None  # the prompt's tokens, with the first generated token only, if asked
    end: StreamEnd | None = None  # set on the last token of the request


class RouterError(Exception):
    """An error a client sees: HTTP status and TGI's `error_type`."""

    status = 500
    error_type = "internal"


class ValidationError(RouterError):
    status = 422
    error_type = "validation"


class OverloadedError(RouterError):
    status = 429
    error_type = "overloaded"

    def __init__(self, message: str = "Model is overloaded"):
        super().__init__(message)


class GenerationError(RouterError):
    status = 424
    error_type = "generation"


@dataclass(frozen=True)
class RouterLimits:
    """Limits from the command line (TGI's names and defaults), final after Warmup."""

    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 16384
    prefix_caching: bool = True
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    max_client_batch_size: int = 4
    grammar_support: bool = True  # off with --disable-grammar-support: grammars, response_format and forced tools are refused


@dataclass(frozen=True)
class ShardInfo:
    """What the shards said in Info and Warmup."""

    model_id: str
    architecture: str
    dtype: str
    device_type: str
    block_size: int
    world_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    num_blocks: int = 0
    dynamic_rope: bool = False  # keys past max_position_embeddings depend on the prompt's length
    kernels: str = "reference"


@dataclass(frozen=True)
class RouterState:
    """Everything a front end needs; built once at start-up by the CLI (`text_generation_router.cli`)."""

    infer: Infer
    validation: Validation
    tokenizer: Tokenizer
    limits: RouterLimits
    shard: ShardInfo
    model_id: str  # what clients see (the --model-id given to the launcher)
    features: tuple[str, ...] = ()  # what the shards support (InfoResponse.features)
