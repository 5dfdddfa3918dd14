"""Protobuf messages of `proto/generate.proto` <-> the engine's dataclasses (`models/types.py`).

Nothing is validated here beyond what the message shapes force: the engine refuses bad values with a
`ValueError` naming them, and the servicer turns that into INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterable

from text_generation_server.models.types import (
    GeneratedText,
    Generation,
    Request,
    SamplingParameters,
    StoppingParameters,
    Tokens,
)
from text_generation_server.pb import generate_pb2

# proto3 cannot tell an unset float from 0.0. For these fields 0.0 is not a valid value (each must be > 0),
# so it means "not set" and becomes the value that disables the processor: a message left at its defaults is
# greedy.
_ZERO_MEANS_UNSET = ("temperature", "top_p", "typical_p", "repetition_penalty")


def sampling_from_pb(pb: generate_pb2.NextTokenChooserParameters) -> SamplingParameters:
    values = {name: getattr(pb, name) or 1.0 for name in _ZERO_MEANS_UNSET}
    return SamplingParameters(
        top_k=pb.top_k,
        do_sample=pb.do_sample,
        seed=pb.seed,
        frequency_penalty=pb.frequency_penalty,
        **values,
    )


def stopping_from_pb(pb: generate_pb2.StoppingCriteriaParameters) -> StoppingParameters:
    return StoppingParameters(
        max_new_tokens=pb.max_new_tokens,
        stop_sequences=tuple(pb.stop_sequences),
        ignore_eos_token=pb.ignore_eos_token,
    )


def request_from_pb(pb: generate_pb2.Request) -> Request:
    return Request(
        id=pb.id,
        input_ids=tuple(pb.input_ids),
        blocks=tuple(pb.blocks),
        slots=tuple(pb.slots),
        parameters=sampling_from_pb(pb.parameters) if pb.HasField("parameters") else SamplingParameters(),
        stopping=stopping_from_pb(pb.stopping_parameters),
        prefill_logprobs=pb.prefill_logprobs,
        top_n_tokens=pb.top_n_tokens,
    )


def tokens_to_pb(tokens: Tokens) -> generate_pb2.Tokens:
    return generate_pb2.Tokens(
        ids=tokens.ids, logprobs=tokens.logprobs, texts=tokens.texts, is_special=tokens.is_special
    )


def generated_text_to_pb(generated: GeneratedText) -> generate_pb2.GeneratedText:
    return generate_pb2.GeneratedText(
        text=generated.text,
        generated_tokens=generated.generated_tokens,
        finish_reason=int(generated.finish_reason),
        seed=generated.seed,  # None leaves the optional field unset
    )


def generation_to_pb(generation: Generation) -> generate_pb2.Generation:
    pb = generate_pb2.Generation(request_id=generation.request_id, tokens=tokens_to_pb(generation.tokens))
    if generation.prefill_tokens is not None:
        pb.prefill_tokens.CopyFrom(tokens_to_pb(generation.prefill_tokens))
    if generation.generated_text is not None:
        pb.generated_text.CopyFrom(generated_text_to_pb(generation.generated_text))
    if generation.top_tokens is not None:
        pb.top_tokens.CopyFrom(tokens_to_pb(generation.top_tokens))
    return pb


def generations_to_pb(generations: Iterable[Generation]) -> list[generate_pb2.Generation]:
    return [generation_to_pb(generation) for generation in generations]


def cached_batch_to_pb(batch) -> generate_pb2.CachedBatch:
    """The router's handle on a batch: its id, its requests and the tokens it holds in the KV cache."""
    return generate_pb2.CachedBatch(
        id=batch.batch_id, request_ids=batch.request_ids, current_tokens=sum(batch.cache_lengths)
    )
