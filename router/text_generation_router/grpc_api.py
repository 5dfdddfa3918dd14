"""The public gRPC API: TGIS's `fmaas.GenerationService` (proto/generation.proto) plus `grpc.health.v1`.

    server = await serve_grpc(state, "0.0.0.0", 8033)   # started; the caller stops it

How TGIS's parameters become ours (TGIS router semantics, our TGI-style `Validation` underneath):

* method GREEDY ignores `sampling`; SAMPLE sets do_sample, and temperature unset or 0 means 1.0, top_p /
  typical_p 0 mean "off", top_k 0 means "off"; an unset seed is picked by Validation and returned.
* stopping: max_new_tokens 0 means 20. A prompt whose length plus max_new_tokens passes the sequence limit
  (--max-total-tokens) gets max_new_tokens cut to fit and, if it runs into that cut, stop reason
  TOKEN_LIMIT (TGIS). min_new_tokens > 0 is rejected (the engine cannot suppress EOS). time_limit_millis
  ends the request (it is cancelled) with TIME_LIMIT and what was generated so far. include_stop_sequence
  false strips the matched stop sequence from the text (streams hold back the few characters that could
  still become one).
* response options: input_text, generated_tokens, input_tokens (with logprobs), token_logprobs, top_n_tokens
  for generated tokens. token_ranks are derived from the top tokens (the shard does not send ranks): a
  token's rank is exact when it falls within the --max-top-n-tokens best, otherwise 0 ("unknown"); prompt
  tokens get no ranks or top tokens.
* truncate_input_tokens keeps the last N prompt tokens (only when the prompt is longer).
* guided decoding constrains the output token by token: `format` JSON to any JSON object, `json_schema` to
  JSON valid under the schema, `regex` to a whole match, `choice` to one of the strings, `grammar` to a Lark
  (or llama.cpp GBNF) grammar; one that does not compile is INVALID_ARGUMENT naming the problem.
* adapters / prompt prefixes and length_penalty are not supported: INVALID_ARGUMENT.

Errors: validation -> INVALID_ARGUMENT (the message), overloaded -> RESOURCE_EXHAUSTED, a failed generation ->
INTERNAL (TGIS sends UNKNOWN with the error text), anything else -> INTERNAL. A client that cancels an RPC
(or a stream) cancels its requests: the Infer iterators are closed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from loguru import logger
from text_generation_common.grammar import (
    grammar_from_choices,
    grammar_from_json_schema,
    grammar_from_lark,
    grammar_from_regex,
)
from text_generation_common.pb import generation_pb2 as pb
from text_generation_common.pb import generation_pb2_grpc as pb_grpc

from . import metrics, request_metrics
from .types import (
    GenerationError,
    GenerationRequest,
    OverloadedError,
    RouterError,
    RouterState,
    StreamEnd,
    StreamToken,
    Token,
    ValidationError,
)
from .validation import GenerateParameters, invalid

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name  # "fmaas.GenerationService"
DEFAULT_MAX_NEW_TOKENS = 20  # TGIS's default when stopping.max_new_tokens is 0
MAX_STOP_SEQUENCE_BYTES = 240  # TGIS's limit on one stop sequence
MIN_TEMPERATURE = 0.05  # TGIS rejects smaller (non-zero) temperatures

_STOP_REASONS = {"length": pb.MAX_TOKENS, "eos_token": pb.EOS_TOKEN, "stop_sequence": pb.STOP_SEQUENCE}


def status_code(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, RouterError) and error.status == 503:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


# ----------------------------------------------------------------------------------------- request plans


@dataclasses.dataclass(frozen=True)
class _Options:
    """What a call's `Parameters` ask beyond the GenerationRequest; shared by every prompt of a batch."""

    response: Any  # pb.ResponseOptions
    stop_sequences: tuple[str, ...]
    include_stop_sequence: bool
    deadline: float | None  # event-loop time
    internal_top_n: int  # top tokens asked of the shard (more than requested when ranks are wanted)


@dataclasses.dataclass(frozen=True)
class _Plan:
    text: str
    request: GenerationRequest
    max_is_token_limit: bool  # max_new_tokens was cut to fit the sequence limit


def _check_unsupported(adapter_id: str, prefix_id: str) -> None:
    if adapter_id or prefix_id:
        name = "adapter_id" if adapter_id else "prefix_id"
        raise invalid(f"{name} is not supported: this server loads no adapters or prompt prefixes")


def _sampling_fields(params: Any) -> dict:
    """TGIS sampling/decoding parameters as TGI GenerateParameters fields (None means "off")."""
    fields: dict[str, Any] = {}
    decoding = params.decoding
    if decoding.HasField("length_penalty"):
        raise invalid("length_penalty is not supported")
    if decoding.repetition_penalty < 0:
        raise invalid("repetition_penalty must be > 0.0 (0 means no penalty)")
    if decoding.repetition_penalty != 0:
        fields["repetition_penalty"] = decoding.repetition_penalty

    if params.method != pb.SAMPLE:
        fields["do_sample"] = False  # greedy: sampling parameters are ignored, as TGIS does
        return fields
    sampling = params.sampling
    fields["do_sample"] = True
    temperature = sampling.temperature if sampling.HasField("temperature") else 0.0
    if temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
        raise invalid(f"temperature must be >= {MIN_TEMPERATURE} (0 means 1.0). Given: {temperature}")
    if temperature not in (0.0, 1.0):
        fields["temperature"] = temperature
    if not 0.0 <= sampling.top_p <= 1.0:
        raise invalid(f"top_p must be > 0.0 and <= 1.0 (0 means off). Given: {sampling.top_p}")
    if 0.0 < sampling.top_p < 1.0:
        fields["top_p"] = sampling.top_p
    if not 0.0 <= sampling.typical_p <= 1.0:
        raise invalid(f"typical_p must be > 0.0 and <= 1.0 (0 means off). Given: {sampling.typical_p}")
    if 0.0 < sampling.typical_p < 1.0:
        fields["typical_p"] = sampling.typical_p
    if sampling.top_k > 0:
        fields["top_k"] = sampling.top_k
    if sampling.HasField("seed"):
        fields["seed"] = sampling.seed
    return fields


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, state: RouterState):
        self.state = state
        self.limits = state.limits
        # TGIS's "max_max_new_tokens": a one-token prompt may generate up to the sequence limit
        self.max_new_tokens = max(self.limits.max_total_tokens - 1, 1)

    # ------------------------------------------------------------------------------------- validation

    def _options(self, params: Any, loop_time: float) -> _Options:
        stopping, response = params.stopping, params.response
        if stopping.min_new_tokens > 0:
            if stopping.min_new_tokens > (stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS):
                raise invalid("min_new_tokens must be <= max_new_tokens")
            raise invalid("min_new_tokens is not supported by this server (use 0)")
        if stopping.max_new_tokens > self.max_new_tokens:
            raise invalid(f"max_new_tokens must be <= {self.max_new_tokens}")
        for stop in stopping.stop_sequences:
            if not stop or len(stop.encode("utf-8")) > MAX_STOP_SEQUENCE_BYTES:
                raise invalid(
                    f"stop sequences must be non-empty and at most {MAX_STOP_SEQUENCE_BYTES} UTF-8 bytes each"
                )
        detail = response.token_logprobs or response.token_ranks or response.top_n_tokens > 0
        if detail and not (response.input_tokens or response.generated_tokens):
            raise invalid(
                "token_logprobs, token_ranks and top_n_tokens need input_tokens and/or generated_tokens"
            )
        internal_top_n = response.top_n_tokens if response.generated_tokens else 0
        if response.token_ranks and response.generated_tokens:
            internal_top_n = max(internal_top_n, self.limits.max_top_n_tokens)
        return _Options(
            response=response,
            stop_sequences=tuple(stopping.stop_sequences),
            include_stop_sequence=(
                stopping.include_stop_sequence if stopping.HasField("include_stop_sequence") else True
            ),
            deadline=loop_time + stopping.time_limit_millis / 1000 if stopping.time_limit_millis else None,
            internal_top_n=internal_top_n,
        )

    def _plan(self, text: str, params: Any, options: _Options, fields: dict) -> _Plan:
        validation = self.state.validation
        full_length = len(validation.tokenize(text, True)) if text else 0
        truncate = params.truncate_input_tokens
        truncate = truncate if 0 < truncate < full_length else None
        input_length = truncate if truncate is not None else full_length
        requested = params.stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        room = self.limits.max_total_tokens - input_length
        max_new_tokens = min(requested, room) if room > 0 else requested  # no room: Validation explains
        response = options.response
        parameters = GenerateParameters(
            **fields,
            max_new_tokens=max_new_tokens,
            stop=list(options.stop_sequences),
            truncate=truncate,
            top_n_tokens=response.top_n_tokens or None,  # checked against --max-top-n-tokens
            decoder_input_details=response.input_tokens,
        )
        # stream=False even for GenerateStream: its prompt details go out in the first message, so prompt
        # logprobs (which TGI's HTTP streams refuse) are fine here.
        request = validation.validate(text, parameters, add_special_tokens=True, stream=False)
        request = dataclasses.replace(
            request, top_n_tokens=options.internal_top_n, grammar=self._guided_grammar(params.decoding),
            token_logprobs=response.token_logprobs or response.token_ranks,  # a rank compares the logprobs
        )
        return _Plan(text=text, request=request, max_is_token_limit=max_new_tokens < requested)

    def _guided_grammar(self, decoding: Any) -> str:
        """The grammar of the `guided` oneof ("" for none or format TEXT)."""
        guided = decoding.WhichOneof("guided")
        if guided is None or (guided == "format" and decoding.format == pb.DecodingParameters.TEXT):
            return ""
        build, value = {
            "format": (grammar_from_json_schema, {"type": "object"}),
            "json_schema": (grammar_from_json_schema, decoding.json_schema),
            "regex": (grammar_from_regex, decoding.regex),
            "choice": (grammar_from_choices, list(decoding.choice.choices)),
            "grammar": (grammar_from_lark, decoding.grammar),
        }[guided]
        return self.state.validation.checked_grammar(build, value, what=f"guided decoding ({guided})")

    # ------------------------------------------------------------------------------------- responses

    def _piece(self, token: Token) -> str:
        try:
            return self.state.tokenizer.id_to_token(token.id)
        except (ValueError, AttributeError):
            return token.text

    def _token_info(self, token: Token, top: Sequence[Token], options: _Options) -> Any:
        response = options.response
        info = pb.TokenInfo(text=self._piece(token))
        if response.token_logprobs and token.logprob is not None:
            info.logprob = token.logprob
        ranked = sorted((t for t in top if t.logprob is not None), key=lambda t: -t.logprob)
        if response.token_ranks:
            info.rank = _rank(token, ranked)
        for alternative in ranked[: response.top_n_tokens]:
            info.top_tokens.add(text=self._piece(alternative), logprob=alternative.logprob)
        return info

    def _input_token_infos(self, plan: _Plan, first: StreamToken | None, options: _Options) -> list:
        prefill = first.prefill if first is not None else None
        if prefill is None:
            prefill = tuple(Token(id=i, text="", logprob=None) for i in plan.request.input_ids)
        infos = []
        for token in prefill:
            info = pb.TokenInfo(text=self._piece(token))
            if options.response.token_logprobs and token.logprob is not None:
                info.logprob = token.logprob
            infos.append(info)
        return infos

    def _stop_fields(self, plan: _Plan, end: StreamEnd | None, text: str, options: _Options) -> dict:
        """stop_reason, stop_sequence and seed of a finished request (end None: its time limit ran out)."""
        request = plan.request
        if end is None:
            seed = request.parameters.seed if request.parameters.do_sample else 0
            return {"stop_reason": pb.TIME_LIMIT, "seed": seed}
        reason = _STOP_REASONS.get(end.finish_reason, pb.MAX_TOKENS)
        if reason == pb.MAX_TOKENS and plan.max_is_token_limit:
            reason = pb.TOKEN_LIMIT
        fields: dict[str, Any] = {"stop_reason": reason, "seed": end.seed or 0}
        if reason == pb.STOP_SEQUENCE:
            stop = _matched_stop(text, options.stop_sequences)
            if stop is not None:
                fields["stop_sequence"] = stop
        return fields

    # ------------------------------------------------------------------------------------- RPCs

    async def _abort(self, context: grpc.aio.ServicerContext, error: BaseException) -> None:
        code = status_code(error)
        if code == grpc.StatusCode.INTERNAL:
            logger.opt(exception=error).error("gRPC request failed")
        await context.abort(code, str(error))

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        count = len(request.requests)
        if count == 0:
            return pb.BatchedGenerationResponse()
        for _ in range(count):
            request_metrics.started()
        loop = asyncio.get_running_loop()
        streams: list[_Pump] = []
        try:
            _check_unsupported(request.adapter_id, request.prefix_id)
            if count > self.limits.max_concurrent_requests:
                raise OverloadedError()
            options = self._options(request.params, loop.time())
            fields = _sampling_fields(request.params)
            plans = [self._plan(r.text, request.params, options, fields) for r in request.requests]
            for plan in plans:  # all or nothing: an overloaded sub-request closes the ones already queued
                streams.append(_Pump(self.state.infer.stream(plan.request)))
        except RouterError as error:
            for stream in streams:
                await stream.close()
            for _ in range(count):
                request_metrics.failed(error)
            await self._abort(context, error)
            raise  # not reached: abort raises

        tasks = [asyncio.ensure_future(_collect(stream, options.deadline)) for stream in streams]
        try:
            results = await asyncio.gather(*tasks)
        except RouterError as error:
            for _ in range(count):
                request_metrics.failed(error)
            await self._abort(context, error)
            raise
        except asyncio.CancelledError:
            for _ in range(count):
                request_metrics.dropped()
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            for stream in streams:
                await stream.close()

        total_s = time.perf_counter() - start
        responses = []
        for plan, (tokens, end) in zip(plans, results):
            responses.append(self._generation_response(plan, tokens, end, options))
            _record_success(end, len(tokens), total_s)
        return pb.BatchedGenerationResponse(responses=responses)

    def _generation_response(
        self, plan: _Plan, tokens: list[StreamToken], end: StreamEnd | None, options: _Options
    ) -> Any:
        response = options.response
        text = end.generated_text if end is not None else "".join(t.token.text for t in tokens)
        fields = self._stop_fields(plan, end, text, options)
        if fields["stop_reason"] == pb.STOP_SEQUENCE and not options.include_stop_sequence:
            text = _strip_stop(text, fields.get("stop_sequence"))
        message = pb.GenerationResponse(
            input_token_count=len(plan.request.input_ids),
            generated_token_count=end.generated_tokens if end is not None else len(tokens),
            text=(plan.text + text) if response.input_text else text,
            **fields,
        )
        if response.generated_tokens:
            message.tokens.extend(self._token_info(t.token, t.top_tokens, options) for t in tokens)
        if response.input_tokens:
            message.input_tokens.extend(self._input_token_infos(plan, tokens[0] if tokens else None, options))
        return message

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        start = time.perf_counter()
        request_metrics.started()
        loop = asyncio.get_running_loop()
        try:
            _check_unsupported(request.adapter_id, request.prefix_id)
            options = self._options(request.params, loop.time())
            plan = self._plan(request.request.text, request.params, options, _sampling_fields(request.params))
            stream = _Pump(self.state.infer.stream(plan.request))
        except RouterError as error:
            request_metrics.failed(error)
            await self._abort(context, error)
            return

        response = options.response
        # Text already sent vs. generated: without include_stop_sequence, hold back what could still turn into
        # a stop sequence so that it can be left out.
        hold = 0
        if not options.include_stop_sequence and options.stop_sequences:
            hold = max(len(s) for s in options.stop_sequences) - 1
        generated = ""
        sent = 0
        count = 0
        first = True
        finished = False
        try:
            while True:
                item = await stream.next(options.deadline)
                if first and not isinstance(item, _Failure):
                    first = False
                    head = pb.GenerationResponse(
                        input_token_count=len(plan.request.input_ids),
                        seed=plan.request.parameters.seed if plan.request.parameters.do_sample else 0,
                    )
                    if response.input_text:
                        head.text = plan.text
                    if response.input_tokens:
                        token = item if isinstance(item, StreamToken) else None
                        head.input_tokens.extend(self._input_token_infos(plan, token, options))
                    yield head
                if isinstance(item, _Failure):
                    raise item.error
                end: StreamEnd | None = None
                message = pb.GenerationResponse(input_token_count=len(plan.request.input_ids))
                if item is not None:
                    count += 1
                    generated += item.token.text
                    if response.generated_tokens:
                        message.tokens.append(self._token_info(item.token, item.top_tokens, options))
                    end = item.end
                last = end is not None or item is None
                if last:
                    stop_fields = self._stop_fields(plan, end, generated, options)
                    final_text = generated
                    if stop_fields["stop_reason"] == pb.STOP_SEQUENCE and not options.include_stop_sequence:
                        final_text = _strip_stop(generated, stop_fields.get("stop_sequence"))
                    message.text = final_text[sent:]
                    sent = max(sent, len(final_text))
                    for key, value in stop_fields.items():
                        setattr(message, key, value)
                    message.generated_token_count = end.generated_tokens if end is not None else count
                else:
                    upto = max(sent, len(generated) - hold)
                    message.text = generated[sent:upto]
                    sent = upto
                    message.generated_token_count = count
                yield message
                if last:
                    finished = True
                    _record_success(end, count, time.perf_counter() - start)
                    return
        except RouterError as error:
            request_metrics.failed(error)
            finished = True
            await self._abort(context, error)
        finally:
            if not finished:
                request_metrics.dropped()
            await stream.close()

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_unsupported(request.adapter_id, request.prefix_id)
            responses = [self._tokenize(r.text, request) for r in request.requests]
        except RouterError as error:
            await self._abort(context, error)
            raise
        return pb.BatchedTokenizeResponse(responses=responses)

    def _tokenize(self, text: str, request: Any) -> Any:
        tokenizer = self.state.tokenizer
        try:
            ids = tokenizer.encode(text, add_special_tokens=True)
        except ValueError as error:
            raise invalid(f"tokenizer error {error}") from error
        keep = len(ids)
        if 0 < request.truncate_input_tokens < keep:
            keep = request.truncate_input_tokens
        result = pb.TokenizeResponse(token_count=keep)
        if request.return_tokens:
            result.tokens.extend(tokenizer.id_to_token(i) for i in ids[len(ids) - keep :])
        if request.return_offsets:
            spans = _offsets(tokenizer, text, ids)
            result.offsets.extend(
                pb.TokenizeResponse.Offset(start=s, end=e) for s, e in spans[len(ids) - keep :]
            )
        return result

    async def ModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ModelInfoResponse(
            model_kind=pb.ModelInfoResponse.DECODER_ONLY,
            max_sequence_length=self.limits.max_total_tokens,
            max_new_tokens=self.max_new_tokens,
        )


# ----------------------------------------------------------------------------------------- streams


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException


class _Pump:
    """Reads one Infer stream into a local buffer, so that a reader can wait with a time limit without
    cancelling the Infer iterator mid-read."""

    def __init__(self, iterator: AsyncIterator[StreamToken]):
        self._iterator = iterator
        self._buffer: collections.deque = collections.deque()
        self._ready = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for item in self._iterator:
                self._push(item)
                if item.end is not None:
                    return
            self._push(_Failure(GenerationError("the generation stream ended without a final message")))
        except Exception as error:  # noqa: BLE001 - handed to the reader
            self._push(_Failure(error if isinstance(error, RouterError) else GenerationError(str(error))))

    def _push(self, item: Any) -> None:
        self._buffer.append(item)
        self._ready.set()

    async def next(self, deadline: float | None) -> StreamToken | _Failure | None:
        """The next item; None once `deadline` (event-loop time) passed with nothing new."""
        while not self._buffer:
            self._ready.clear()
            if deadline is None:
                await self._ready.wait()
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return self._buffer.popleft()

    async def close(self) -> None:
        """Stop reading and close the Infer iterator (which cancels the request if it has not finished)."""
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait([self._task])
        try:
            await self._iterator.aclose()
        except Exception:  # noqa: BLE001 - the client is gone either way; logged
            logger.exception("closing a generation stream failed")


async def _collect(stream: _Pump, deadline: float | None) -> tuple[list[StreamToken], StreamEnd | None]:
    """Every token of one request and its StreamEnd (None: the time limit ran out first)."""
    tokens: list[StreamToken] = []
    while True:
        item = await stream.next(deadline)
        if item is None:
            return tokens, None
        if isinstance(item, _Failure):
            raise item.error
        tokens.append(item)
        if item.end is not None:
            return tokens, item.end


def _record_success(end: StreamEnd | None, generated_tokens: int, total_s: float) -> None:
    if end is not None:
        request_metrics.succeeded(end, total_s)
        return
    metrics.request_success.inc()  # a time limit: no queue/inference split is known
    metrics.request_duration.observe(total_s)
    metrics.request_generated_tokens.observe(generated_tokens)


# ----------------------------------------------------------------------------------------- helpers


def _rank(token: Token, ranked: list[Token]) -> int:
    """1-based rank of `token` among the alternatives (best first); 0 when it ranks below all of them."""
    if token.logprob is None or not ranked:
        return 0
    better = sum(1 for t in ranked if t.logprob > token.logprob)
    if better < len(ranked) or any(t.id == token.id for t in ranked):
        return better + 1
    return 0


def _matched_stop(text: str, stops: Sequence[str]) -> str | None:
    """The stop sequence that ended `text`: the one whose last occurrence ends latest (longest on ties)."""
    best, best_end = None, -1
    for stop in stops:
        index = text.rfind(stop)
        if index < 0:
            continue
        end = index + len(stop)
        if end > best_end or (end == best_end and best is not None and len(stop) > len(best)):
            best, best_end = stop, end
    return best


def _strip_stop(text: str, stop: str | None) -> str:
    if not stop:
        return text
    index = text.rfind(stop)
    return text[:index] if index >= 0 else text


def _offsets(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in `text` (end exclusive); (0, 0) for added bos/eos tokens.

    The tokenizer has no offset mapping, so each token's text comes from incremental decoding and is matched
    against `text` from a cursor; a token whose text is not found where expected gets the next span of its
    length (never past the end).
    """
    core = tokenizer.encode(text, add_special_tokens=False)
    lead = next((k for k in range(len(ids) - len(core) + 1) if ids[k : k + len(core)] == core), 0)
    spans: list[tuple[int, int]] = [(0, 0)] * lead
    prefix = read = 0
    cursor = 0
    # tokens holding part of a character share the span of the token that completes it
    pending: list[int] = []
    for i in range(len(core)):
        piece, new_prefix, new_read = tokenizer.decode_incremental(core[prefix : i + 1], 0, read - prefix)
        prefix, read = prefix + new_prefix, prefix + new_read
        if not piece:
            pending.append(len(spans))
            spans.append((cursor, cursor))
            continue
        if text.startswith(piece, cursor):
            start, length = cursor, len(piece)
        else:  # a space the decoder made up (or one the encoder folded): match without it
            stripped = piece.lstrip()
            start = cursor
            while start < len(text) and text[start].isspace():
                start += 1
            if stripped and text.startswith(stripped, start):
                length = len(stripped)
            else:
                start, length = cursor, min(len(piece), len(text) - cursor)
        spans.append((start, start + length))
        for index in pending:
            spans[index] = (start, start + min(length, 1))
        pending.clear()
        cursor = start + length
    spans.extend([(0, 0)] * (len(ids) - len(spans)))
    return spans[: len(ids)]


# ----------------------------------------------------------------------------------------- server


class _HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1: Check asks the shards (through Infer.health) for the server and the generation service."""

    def __init__(self, state: RouterState):
        super().__init__()
        self._state = state

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.service in ("", SERVICE_NAME):
            healthy = await self._state.infer.health()
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if healthy
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            return health_pb2.HealthCheckResponse(status=status)
        return await super().Check(request, context)


async def serve_grpc(state: RouterState, host: str, port: int) -> grpc.aio.Server:
    """Start the public gRPC API on host:port (port 0: any free port, found in `server.bound_port`)."""
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(state), server)
    health_servicer = _HealthServicer(state)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    await server.start()
    server.bound_port = bound  # type: ignore[attr-defined]
    logger.info(f"gRPC API (fmaas.GenerationService, grpc.health.v1) listening on {host}:{bound}")
    return server
