"""TGI's HTTP API over a `RouterState`: generate, streams, compat route, info, health, metrics, tokenize and the
OpenAI-compatible routes.

Streams are Server-Sent Events written as `data:<json>\\n\\n` (no space after the colon). A client that
disconnects mid-stream cancels its request: the response closes its event generator, which closes the
`Infer` iterator (shielded from the cancellation that the disconnect itself triggers).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.responses import StreamingResponse

from . import request_metrics
from .chat import encode_chat, render_chat, turn_end_id
from .metrics import REGISTRY
from .types import (
    GenerationError,
    GenerationRequest,
    RouterError,
    RouterState,
    StreamEnd,
    StreamToken,
    Token,
    ValidationError,
)
from .validation import GenerateParameters, Validation, invalid

try:
    VERSION = importlib.metadata.version("internlm2-tgi")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.1.0"
SYSTEM_FINGERPRINT = f"{VERSION}-native"
COMPUTE_TYPE = "cpu+native"


class IncompleteGeneration(RouterError):
    status = 500
    error_type = "incomplete_generation"

    def __init__(self, message: str = "Incomplete generation"):
        super().__init__(message)


class ToolError(RouterError):
    status = 422
    error_type = "tool_error"


# ------------------------------------------------------------------------------------------ request bodies


class GenerateRequest(BaseModel):
    inputs: str
    parameters: GenerateParameters | None = None

    def params(self) -> GenerateParameters:
        return self.parameters if self.parameters is not None else GenerateParameters.absent()


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[Any] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage]
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    response_format: Any | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    seed: int | None = None
    suffix: str | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None


# ------------------------------------------------------------------------------------------ JSON helpers


def dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def sse(payload: Any) -> str:
    return f"data:{payload if isinstance(payload, str) else dumps(payload)}\n\n"


def _logprob(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def token_json(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": _logprob(token.logprob), "special": token.special}


def prefill_json(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": _logprob(token.logprob)}


def error_body(error: BaseException) -> dict:
    return {"error": str(error), "error_type": getattr(error, "error_type", "internal")}


def error_response(error: BaseException) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=getattr(error, "status", 500))


def as_router_error(error: BaseException) -> RouterError:
    if isinstance(error, RouterError):
        return error
    return GenerationError(f"Request failed during generation: {type(error).__name__}: {error}")


def openai_error_event(error: BaseException) -> str:
    return sse({"error": {"message": str(error), "http_status_code": 422}})


def mean_logprob(tokens: list[StreamToken]) -> float:
    values = [
        t.token.logprob for t in tokens if t.token.logprob is not None and not math.isnan(t.token.logprob)
    ]
    return sum(values) / len(values) if values else -math.inf


# ------------------------------------------------------------------------------------------ streaming core


@dataclass
class Step:
    """One generated token as a stream sends it, numbered from 1."""

    index: int
    token: StreamToken

    @property
    def end(self) -> StreamEnd | None:
        """Set on the last token."""
        return self.token.end


async def _aclose(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


class TokenStream:
    """`Infer.stream`'s tokens as numbered `Step`s; the scheduler marks the last one with its end."""

    def __init__(self, state: RouterState, request: GenerationRequest):
        self.state = state
        self.request = request

    async def __aiter__(self) -> AsyncIterator[Step]:
        iterator = self.state.infer.stream(self.request)
        index = 0
        try:
            async for item in iterator:
                index += 1
                yield Step(index, item)
                if item.end is not None:
                    return
            raise IncompleteGeneration()
        finally:
            await _aclose(iterator)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its event generator, whatever ended the response."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict | None = None):
        super().__init__(
            content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _aclose(self.body_iterator)


async def merged(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's position; an exception in
    any one ends the merge (re-raised) and closes the others."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((position, item, None))
            queue.put_nowait((position, done, None))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((position, done, error))
        finally:
            await _aclose(stream)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            position, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield position, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------------------------------ the app


def create_app(state: RouterState) -> FastAPI:
    app = FastAPI(
        title="Text Generation Inference (InternLM2)",
        version=VERSION,
        description="TGI-compatible text generation API",
        openapi_url="/api-doc/openapi.json",
        docs_url="/docs",
    )
    app.state.router_state = state
    validation: Validation = state.validation
    tokenizer = state.tokenizer
    limits = state.limits
    chat_turn_end = turn_end_id(tokenizer, tuple(state.shard.eos_token_ids))

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(
                {"error": f"Failed to parse the request body as JSON: {errors}", "error_type": "validation"},
                status_code=400,
            )
        parts = []
        for e in errors:
            location = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{location}: {e.get('msg')}" if location else str(e.get("msg")))
        return JSONResponse(
            {
                "error": "Failed to deserialize the JSON body into the target type: " + "; ".join(parts),
                "error_type": "validation",
            },
            status_code=422,
        )

    # -------------------------------------------------------------------------------- generate

    async def run_generate(inputs: str, params: GenerateParameters) -> tuple[dict, dict]:
        """A non-stream generation (with best_of): the GenerateResponse and the timing headers."""
        start = time.perf_counter()
        best_of = validation.validate_best_of(params.best_of)
        request = validation.validate(inputs, params, add_special_tokens=True, stream=False)
        validation_s = time.perf_counter() - start
        requests = [request] + [Validation.reseed(request) for _ in range(best_of - 1)]
        if len(requests) == 1:
            results = [await state.infer.generate(request)]
        else:
            tasks = [asyncio.create_task(state.infer.generate(r)) for r in requests]
            try:
                results = list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        order = sorted(range(len(results)), key=lambda i: mean_logprob(results[i][0]), reverse=True)
        best_tokens, best_end = results[order[0]]

        def text_of(end: StreamEnd) -> str:
            return inputs + end.generated_text if params.return_full_text else end.generated_text

        def details_of(tokens: list[StreamToken], end: StreamEnd) -> dict:
            prefill = tokens[0].prefill if tokens and tokens[0].prefill is not None else ()
            details = {
                "finish_reason": end.finish_reason,
                "generated_tokens": end.generated_tokens,
                "seed": end.seed,
                "prefill": [prefill_json(t) for t in prefill],
                "tokens": [token_json(t.token) for t in tokens],
            }
            if request.top_n_tokens > 0:
                details["top_tokens"] = [[token_json(x) for x in t.top_tokens] for t in tokens]
            return details

        response: dict = {"generated_text": text_of(best_end)}
        if params.details:
            details = details_of(best_tokens, best_end)
            if best_of > 1:
                details["best_of_sequences"] = [
                    {"generated_text": text_of(results[i][1]), **details_of(*results[i])} for i in order[1:]
                ]
            response["details"] = details
        total_s = time.perf_counter() - start
        request_metrics.succeeded(best_end, total_s)
        per_token = best_end.inference_s / max(best_end.generated_tokens, 1)
        headers = {
            "x-compute-type": COMPUTE_TYPE,
            "x-compute-time": f"{total_s:.6f}",
            "x-compute-characters": str(len(inputs)),
            "x-total-time": str(int(total_s * 1000)),
            "x-validation-time": str(int(validation_s * 1000)),
            "x-queue-time": str(int(best_end.queue_s * 1000)),
            "x-inference-time": str(int(best_end.inference_s * 1000)),
            "x-time-per-token": str(int(per_token * 1000)),
            "x-prompt-tokens": str(best_end.input_length),
            "x-generated-tokens": str(best_end.generated_tokens),
        }
        return response, headers

    async def generate_events(inputs: str, params: GenerateParameters) -> AsyncIterator[str]:
        """The SSE events of /generate_stream; errors become one error event (HTTP status stays 200)."""
        request_metrics.started()
        start = time.perf_counter()
        finished = False
        steps = None
        try:
            request = validation.validate(inputs, params, add_special_tokens=True, stream=True)
            steps = TokenStream(state, request).__aiter__()
            async for step in steps:
                event: dict = {"index": step.index, "token": token_json(step.token.token)}
                if step.token.top_tokens:
                    event["top_tokens"] = [token_json(t) for t in step.token.top_tokens]
                event["generated_text"] = None
                event["details"] = None
                if step.end is not None:
                    end = step.end
                    text = end.generated_text
                    event["generated_text"] = inputs + text if params.return_full_text else text
                    if params.details:
                        event["details"] = {
                            "finish_reason": end.finish_reason,
                            "generated_tokens": end.generated_tokens,
                            "seed": end.seed,
                            "input_length": end.input_length,
                        }
                    request_metrics.succeeded(end, time.perf_counter() - start)
                    finished = True
                yield sse(event)
        except Exception as error:  # noqa: BLE001 - reported to the client inside the stream
            error = as_router_error(error)
            request_metrics.failed(error)
            finished = True
            yield sse(error_body(error))
        finally:
            await _aclose(steps)
            if not finished:
                request_metrics.dropped()

    @app.post("/generate", tags=["Text Generation Inference"])
    async def generate(body: GenerateRequest):
        request_metrics.started()
        try:
            response, headers = await run_generate(body.inputs, body.params())
        except Exception as error:  # noqa: BLE001
            error = as_router_error(error)
            request_metrics.failed(error)
            return error_response(error)
        return JSONResponse(response, headers=headers)

    @app.post("/generate_stream", tags=["Text Generation Inference"])
    async def generate_stream(body: GenerateRequest):
        headers = {"x-compute-type": COMPUTE_TYPE, "x-compute-characters": str(len(body.inputs))}
        return SSEResponse(generate_events(body.inputs, body.params()), headers=headers)

    @app.post("/", tags=["Text Generation Inference"])
    async def compat_generate(body: CompatGenerateRequest):
        params = body.params()
        if params.return_full_text is None:
            params = params.model_copy(update={"return_full_text": True})
        if body.stream:
            headers = {"x-compute-type": COMPUTE_TYPE, "x-compute-characters": str(len(body.inputs))}
            return SSEResponse(generate_events(body.inputs, params), headers=headers)
        request_metrics.started()
        try:
            response, headers = await run_generate(body.inputs, params)
        except Exception as error:  # noqa: BLE001
            error = as_router_error(error)
            request_metrics.failed(error)
            return error_response(error)
        return JSONResponse([response], headers=headers)

    # -------------------------------------------------------------------------------- info & co

    @app.get("/info", tags=["Text Generation Inference"])
    async def info():
        shard = state.shard
        return {
            "model_id": state.model_id,
            "model_sha": None,
            "model_pipeline_tag": None,
            "model_dtype": shard.dtype,
            "model_device_type": shard.device_type,
            "max_concurrent_requests": limits.max_concurrent_requests,
            "max_best_of": limits.max_best_of,
            "max_stop_sequences": limits.max_stop_sequences,
            "max_input_tokens": limits.max_input_tokens,
            "max_total_tokens": limits.max_total_tokens,
            "waiting_served_ratio": limits.waiting_served_ratio,
            "max_batch_total_tokens": limits.max_batch_total_tokens,
            "max_waiting_tokens": limits.max_waiting_tokens,
            "max_batch_size": None,
            "validation_workers": 1,
            "max_client_batch_size": limits.max_client_batch_size,
            "router": "text-generation-router",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        }

    async def check_health() -> Response:
        probe = getattr(state.infer, "health", None)
        healthy = True
        if probe is not None:
            try:
                result = probe()
                if asyncio.iscoroutine(result):
                    result = await result
                healthy = result is not False
            except Exception:  # noqa: BLE001 - any failure means unhealthy
                healthy = False
        if not healthy:
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    app.get("/health", tags=["Text Generation Inference"])(check_health)
    app.get("/ping", include_in_schema=False)(check_health)
    app.get("/", include_in_schema=False)(check_health)

    @app.get("/metrics", tags=["Text Generation Inference"])
    async def prometheus_metrics():
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", tags=["Text Generation Inference"])
    async def tokenize(body: GenerateRequest):
        params = body.params()
        try:
            if not body.inputs:
                raise invalid("`inputs` cannot be empty")
            if params.truncate is not None and not 0 < params.truncate <= limits.max_input_tokens:
                raise invalid(
                    f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
                    f"Given: {params.truncate}"
                )
            ids = validation.tokenize(body.inputs, True, params.truncate)
        except RouterError as error:
            return error_response(error)
        return token_offsets(tokenizer, body.inputs, ids)

    # -------------------------------------------------------------------------------- OpenAI

    def served_model(name: str | None) -> str:
        return state.model_id if not name or name == "tgi" else name

    @app.get("/v1/models", tags=["OpenAI"])
    async def models():
        return {
            "object": "list",
            "data": [{"id": state.model_id, "object": "model", "created": 0, "owned_by": state.model_id}],
        }

    def chat_request(body: ChatRequest) -> GenerationRequest:
        """The validated request for a chat; it also ends at the chat's end-of-turn token."""
        if body.tools and body.tool_choice != "none":
            raise ToolError("Tool error: tools are not supported by this server (no grammar support)")
        if body.response_format is not None:
            raise invalid("grammar is not supported")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        if not messages:
            raise invalid("`messages` cannot be empty")
        continue_final = messages[-1].get("role") == "assistant"
        prompt = render_chat(tokenizer, messages, add_generation_prompt=not continue_final)
        if continue_final:
            # continue the assistant's message: cut the rendering right after its content (as TGI)
            content = str(messages[-1].get("content", ""))
            cut = prompt.rfind(content)
            if content and cut >= 0:
                prompt = prompt[: cut + len(content)]
        temperature = body.temperature
        do_sample = True
        if temperature is not None and temperature == 0:
            do_sample, temperature = False, None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = GenerateParameters(
            temperature=temperature,
            do_sample=do_sample,
            top_p=body.top_p,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=None if body.presence_penalty is None else body.presence_penalty + 2.0,
            max_new_tokens=body.max_tokens if body.max_tokens is not None else body.max_completion_tokens,
            seed=body.seed,
            stop=stop,
            top_n_tokens=body.top_logprobs,
            details=True,
        )
        request = validation.validate(prompt, params, add_special_tokens=False, stream=body.stream)
        if chat_turn_end is not None:
            request = replace(request, stop_token_ids=(*request.stop_token_ids, chat_turn_end))
        return request

    def chat_finish(end: StreamEnd) -> str:
        return "stop" if end.finish_reason == "eos_token" else end.finish_reason

    def logprobs_entry(item: StreamToken) -> dict:
        return {
            "token": item.token.text,
            "logprob": _logprob(item.token.logprob),
            "top_logprobs": [{"token": t.text, "logprob": _logprob(t.logprob)} for t in item.top_tokens],
        }

    def usage_of(end: StreamEnd) -> dict:
        return {
            "prompt_tokens": end.input_length,
            "completion_tokens": end.generated_tokens,
            "total_tokens": end.input_length + end.generated_tokens,
        }

    async def chat_events(body: ChatRequest) -> AsyncIterator[str]:
        request_metrics.started()
        start = time.perf_counter()
        created = int(time.time())
        model = served_model(body.model)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        finished = False
        steps = None
        try:
            request = chat_request(body)
            steps = TokenStream(state, request).__aiter__()
            async for step in steps:
                item = step.token
                chunk = {
                    "object": "chat.completion.chunk",
                    "id": "",
                    "created": created,
                    "model": model,
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": item.token.text},
                            "logprobs": {"content": [logprobs_entry(item)]} if body.logprobs else None,
                            "finish_reason": chat_finish(step.end) if step.end else None,
                        }
                    ],
                    "usage": None,
                }
                yield sse(chunk)
                if step.end is not None:
                    request_metrics.succeeded(step.end, time.perf_counter() - start)
                    finished = True
                    if include_usage:
                        yield sse(
                            {
                                "object": "chat.completion.chunk",
                                "id": "",
                                "created": created,
                                "model": model,
                                "system_fingerprint": SYSTEM_FINGERPRINT,
                                "choices": [],
                                "usage": usage_of(step.end),
                            }
                        )
        except Exception as error:  # noqa: BLE001
            error = as_router_error(error)
            request_metrics.failed(error)
            finished = True
            yield openai_error_event(error)
        finally:
            await _aclose(steps)
            if not finished:
                request_metrics.dropped()
        yield sse("[DONE]")

    @app.post("/v1/chat/completions", tags=["OpenAI"])
    async def chat_completions(body: ChatRequest):
        if body.stream:
            return SSEResponse(chat_events(body))
        request_metrics.started()
        start = time.perf_counter()
        try:
            request = chat_request(body)
            tokens, end = await state.infer.generate(request)
        except Exception as error:  # noqa: BLE001
            error = as_router_error(error)
            request_metrics.failed(error)
            return error_response(error)
        request_metrics.succeeded(end, time.perf_counter() - start)
        return {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": served_model(body.model),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": end.generated_text},
                    "logprobs": {"content": [logprobs_entry(t) for t in tokens]} if body.logprobs else None,
                    "finish_reason": chat_finish(end),
                }
            ],
            "usage": usage_of(end),
        }

    def completion_requests(body: CompletionRequest) -> list[GenerationRequest]:
        if body.suffix is not None:
            raise _Plain422(
                "Suffix is not supported and can be achieved by preprocessing the prompt.",
                "suffix not supported",
            )
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise invalid("`prompt` cannot be empty")
        if len(prompts) > limits.max_client_batch_size:
            raise _Plain422(
                f"Number of prompts exceeds the maximum allowed batch size of {limits.max_client_batch_size}",
                "batch size exceeded",
            )
        temperature = body.temperature
        do_sample = temperature is not None and temperature != 0
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = GenerateParameters(
            temperature=temperature if do_sample else None,
            do_sample=do_sample,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty,
            max_new_tokens=body.max_tokens,
            seed=body.seed,
            stop=stop,
            details=True,
        )
        return [validation.validate(p, params, add_special_tokens=True, stream=body.stream) for p in prompts]

    def completion_finish(reason: str) -> str:
        return "stop" if reason == "eos_token" else reason

    async def completion_events(body: CompletionRequest) -> AsyncIterator[str]:
        start = time.perf_counter()
        created = int(time.time())
        model = served_model(body.model)
        try:
            requests = completion_requests(body)
        except Exception as error:  # noqa: BLE001
            request_metrics.started()
            error = as_router_error(error)
            request_metrics.failed(error)
            yield openai_error_event(error)
            yield sse("[DONE]")
            return
        for _ in requests:
            request_metrics.started()
        open_count = len(requests)
        stream = merged([TokenStream(state, r).__aiter__() for r in requests])
        try:
            async for position, step in stream:
                choice = {
                    "index": position,
                    "text": step.token.token.text,
                    "logprobs": None,
                    "finish_reason": "",
                }
                chunk = {
                    "object": "text_completion",
                    "id": "",
                    "created": created,
                    "model": model,
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                    "choices": [choice],
                }
                if step.end is not None:
                    choice["finish_reason"] = step.end.finish_reason
                    chunk["usage"] = usage_of(step.end)
                    request_metrics.succeeded(step.end, time.perf_counter() - start)
                    open_count -= 1
                yield sse(chunk)
        except Exception as error:  # noqa: BLE001
            error = as_router_error(error)
            for _ in range(open_count):
                request_metrics.failed(error)
            open_count = 0
            yield openai_error_event(error)
        finally:
            await _aclose(stream)
            for _ in range(open_count):
                request_metrics.dropped()
        yield sse("[DONE]")

    @app.post("/v1/completions", tags=["OpenAI"])
    async def completions(body: CompletionRequest):
        if body.stream:
            return SSEResponse(completion_events(body))
        start = time.perf_counter()
        try:
            requests = completion_requests(body)
        except Exception as error:  # noqa: BLE001
            request_metrics.started()
            error = as_router_error(error)
            request_metrics.failed(error)
            return error_response(error)
        for _ in requests:
            request_metrics.started()
        tasks = [asyncio.create_task(state.infer.generate(r)) for r in requests]
        try:
            results = await asyncio.gather(*tasks)
        except Exception as error:  # noqa: BLE001
            error = as_router_error(error)
            for _ in requests:
                request_metrics.failed(error)
            return error_response(error)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        choices = []
        for position, (_, end) in enumerate(results):
            request_metrics.succeeded(end, time.perf_counter() - start)
            for key, value in usage_of(end).items():
                usage[key] += value
            choices.append(
                {
                    "index": position,
                    "text": end.generated_text,
                    "logprobs": None,
                    "finish_reason": completion_finish(end.finish_reason),
                }
            )
        return {
            "object": "text_completion",
            "id": "",
            "created": int(time.time()),
            "model": served_model(body.model),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage,
        }

    @app.post("/chat_tokenize", tags=["Text Generation Inference"])
    async def chat_tokenize(body: ChatRequest):
        try:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            text = render_chat(tokenizer, messages, add_generation_prompt=True)
        except RouterError as error:
            return error_response(error)
        ids = encode_chat(tokenizer, text)
        return {"tokenize_response": token_offsets(tokenizer, text, ids), "templated_text": text}

    return app


class _Plain422(ValidationError):
    """A 422 with its own error_type (the /v1/completions refusals), message without a prefix."""

    def __init__(self, message: str, error_type: str):
        super().__init__(message)
        self.error_type = error_type


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_offsets(tokenizer: Any, text: str, ids: list[int]) -> list[dict]:
    """TGI's /tokenize answer: each id with its text and the byte offsets [start, stop) of that text in the
    input. The offsets come from aligning each token's piece with the input bytes; tokens that do not appear
    in the input (a BOS added by the tokenizer) get an empty span."""
    data = text.encode("utf-8")
    cursor = 0
    out = []
    for token_id in ids:
        try:
            piece = tokenizer.id_to_token(token_id)
        except ValueError:
            piece = ""
        match = _BYTE_PIECE.fullmatch(piece)
        candidate = (
            bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8")
        )
        start = stop = cursor
        if candidate and data.startswith(candidate, cursor):
            stop = cursor + len(candidate)
        elif candidate.startswith(b" ") and len(candidate) > 1 and data.startswith(candidate[1:], cursor):
            stop = cursor + len(candidate) - 1
        cursor = stop
        out.append(
            {
                "id": token_id,
                "text": data[start:stop].decode("utf-8", errors="replace"),
                "start": start,
                "stop": stop,
            }
        )
    return out
