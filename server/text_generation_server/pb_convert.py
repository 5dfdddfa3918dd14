"""Protobuf messages of `proto/generate.proto` <-> the engine's dataclasses (`models/types.py`).

Nothing is validated here beyond what the message shapes force: the engine refuses bad values with a
`ValueError` naming them, and the servicer turns that into INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterable

from text_generation_server.models.types import (
    Generation,
    NewRequest,
    SamplingParameters,
    ScheduledRequest,
    Step,
    StoppingParameters,
    Tokens,
)
from text_generation_common.pb import generate_pb2

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
        presence_penalty=pb.presence_penalty,
        output_frequency_penalty=pb.output_frequency_penalty,
        logit_bias=tuple(sorted(pb.logit_bias.items())),
        **values,
    )


def stopping_from_pb(pb: generate_pb2.StoppingCriteriaParameters) -> StoppingParameters:
    return StoppingParameters(
        max_new_tokens=pb.max_new_tokens,
        ignore_eos_token=pb.ignore_eos_token,
        stop_token_ids=tuple(pb.stop_token_ids),
    )


def new_request_from_pb(pb: generate_pb2.NewRequest) -> NewRequest:
    return NewRequest(
        token_ids=tuple(pb.token_ids),
        prompt_length=pb.prompt_length,
        num_cached_tokens=pb.num_cached_tokens,
        parameters=sampling_from_pb(pb.parameters) if pb.HasField("parameters") else SamplingParameters(),
        stopping=stopping_from_pb(pb.stopping_parameters),
        prefill_logprobs=pb.prefill_logprobs,
        top_n_tokens=pb.top_n_tokens,
        grammar=pb.grammar,
        token_logprobs=not pb.omit_token_logprobs,
    )


def step_from_pb(pb: generate_pb2.StepRequest) -> Step:
    return Step(
        requests=tuple(
            ScheduledRequest(
                id=r.id,
                num_tokens=r.num_tokens,
                new_blocks=tuple(r.new_blocks),
                new=new_request_from_pb(r.new_request) if r.HasField("new_request") else None,
            )
            for r in pb.requests
        ),
        released=tuple(pb.released),
        pipelined=pb.step_id > 0,
    )


def tokens_to_pb(tokens: Tokens) -> generate_pb2.Tokens:
    return generate_pb2.Tokens(ids=tokens.ids, logprobs=tokens.logprobs)


def generation_to_pb(generation: Generation) -> generate_pb2.Generation:
    pb = generate_pb2.Generation(request_id=generation.request_id)
    if generation.prefill is not None:
        pb.prefill_tokens.CopyFrom(tokens_to_pb(generation.prefill))
    if generation.token_id is not None:
        pb.token_id = generation.token_id
        pb.logprob = generation.logprob
    if generation.top_tokens is not None:
        pb.top_tokens.CopyFrom(tokens_to_pb(generation.top_tokens))
    if generation.finish_reason is not None:
        pb.finish_reason = int(generation.finish_reason)
    return pb


def generations_to_pb(generations: Iterable[Generation]) -> list[generate_pb2.Generation]:
    return [generation_to_pb(generation) for generation in generations]
