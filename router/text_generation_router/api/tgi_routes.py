"""TGI's own routes: /generate, /generate_stream, the compat route `POST /`, /info, /health, /metrics,
/tokenize and /chat_tokenize."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from .. import metrics
from ..chat import encode_chat
from ..request_metrics import RequestGroup
from ..types import RouterError, RouterState, StreamEnd, StreamToken, Token
from ..validation import GenerateParameters
from .common import (
    COMPUTE_TYPE,
    VERSION,
    SSEResponse,
    aclose,
    as_router_error,
    error_body,
    error_response,
    generate_all,
    logprob_or_none,
    mean_logprob,
    sse,
    token_json,
    token_steps,
)
from .openai_routes import ChatRequest, chat_prompt, chat_tools, offered_tools

TAG = "Text Generation Inference"


class GenerateRequest(BaseModel):
    inputs: str
    parameters: GenerateParameters | None = None

    def params(self) -> GenerateParameters:
        return self.parameters if self.parameters is not None else GenerateParameters.absent()


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


def prefill_json(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": logprob_or_none(token.logprob)}


def stream_headers(inputs: str) -> dict:
    return {"x-compute-type": COMPUTE_TYPE, "x-compute-characters": str(len(inputs))}


def details_json(tokens: list[StreamToken], end: StreamEnd, top_n_tokens: int) -> dict:
    prefill = tokens[0].prefill if tokens and tokens[0].prefill is not None else ()
    details = {
        "finish_reason": end.finish_reason,
        "generated_tokens": end.generated_tokens,
        "seed": end.seed,
        "prefill": [prefill_json(t) for t in prefill],
        "tokens": [token_json(t.token) for t in tokens],
    }
    if top_n_tokens > 0:
        details["top_tokens"] = [[token_json(x) for x in t.top_tokens] for t in tokens]
    return details


def timing_headers(inputs: str, end: StreamEnd, total_s: float, validation_s: float) -> dict:
    per_token = end.inference_s / max(end.generated_tokens, 1)
    return {
        "x-compute-type": COMPUTE_TYPE,
        "x-compute-time": f"{total_s:.6f}",
        "x-compute-characters": str(len(inputs)),
        "x-total-time": str(int(total_s * 1000)),
        "x-validation-time": str(int(validation_s * 1000)),
        "x-queue-time": str(int(end.queue_s * 1000)),
        "x-inference-time": str(int(end.inference_s * 1000)),
        "x-time-per-token": str(int(per_token * 1000)),
        "x-prompt-tokens": str(end.input_length),
        "x-generated-tokens": str(end.generated_tokens),
    }


class TGIRoutes:
    """TGI's routes over one RouterState."""

    def __init__(self, state: RouterState):
        self.state = state
        self.validation = state.validation
        self.limits = state.limits

    async def run_generate(self, inputs: str, params: GenerateParameters) -> tuple[dict, dict]:
        """A non-stream generation (best_of candidates ranked by mean logprob): the GenerateResponse and
        TGI's timing headers. Raises RouterError."""
        start = time.perf_counter()
        group = RequestGroup()
        try:
            best_of = self.validation.validate_best_of(params.best_of)
            request = self.validation.validate(inputs, params, add_special_tokens=True, stream=False)
            validation_s = time.perf_counter() - start
            results = await generate_all(self.state, self.validation.choices(request, best_of))
        except Exception as error:  # noqa: BLE001 - counted, then answered by the caller
            error = as_router_error(error)
            group.failed(error)
            raise error from None
        order = sorted(range(len(results)), key=lambda i: mean_logprob(results[i][0]), reverse=True)
        best_tokens, best_end = results[order[0]]
        group.succeeded(best_end)

        def text_of(end: StreamEnd) -> str:
            return inputs + end.generated_text if params.return_full_text else end.generated_text

        response: dict = {"generated_text": text_of(best_end)}
        if params.details:
            details = details_json(best_tokens, best_end, request.top_n_tokens)
            if best_of > 1:
                details["best_of_sequences"] = [
                    {
                        "generated_text": text_of(results[i][1]),
                        **details_json(*results[i], request.top_n_tokens),
                    }
                    for i in order[1:]
                ]
            response["details"] = details
        return response, timing_headers(inputs, best_end, time.perf_counter() - start, validation_s)

    async def generate_events(self, inputs: str, params: GenerateParameters) -> AsyncIterator[str]:
        """The SSE events of /generate_stream; an error becomes one error event (the HTTP status stays 200)."""
        group = RequestGroup()
        steps = None
        try:
            request = self.validation.validate(inputs, params, add_special_tokens=True, stream=True)
            steps = token_steps(self.state, request)
            async for step in steps:
                event: dict = {"index": step.index, "token": token_json(step.token.token)}
                if step.token.top_tokens:
                    event["top_tokens"] = [token_json(t) for t in step.token.top_tokens]
                event["generated_text"] = None
                event["details"] = None
                if step.end is not None:
                    end = step.end
                    event["generated_text"] = (
                        inputs + end.generated_text if params.return_full_text else end.generated_text
                    )
                    if params.details:
                        event["details"] = {
                            "finish_reason": end.finish_reason,
                            "generated_tokens": end.generated_tokens,
                            "seed": end.seed,
                            "input_length": end.input_length,
                        }
                    group.succeeded(end)
                yield sse(event)
        except Exception as error:  # noqa: BLE001 - reported to the client inside the stream
            error = as_router_error(error)
            group.failed(error)
            yield sse(error_body(error))
        finally:
            await aclose(steps)
            group.close()

    async def generate(self, body: GenerateRequest):
        try:
            response, headers = await self.run_generate(body.inputs, body.params())
        except RouterError as error:
            return error_response(error)
        return JSONResponse(response, headers=headers)

    async def generate_stream(self, body: GenerateRequest):
        return SSEResponse(
            self.generate_events(body.inputs, body.params()), headers=stream_headers(body.inputs)
        )

    async def compat_generate(self, body: CompatGenerateRequest):
        params = body.params()
        if params.return_full_text is None:
            params = params.model_copy(update={"return_full_text": True})
        if body.stream:
            return SSEResponse(self.generate_events(body.inputs, params), headers=stream_headers(body.inputs))
        try:
            response, headers = await self.run_generate(body.inputs, params)
        except RouterError as error:
            return error_response(error)
        return JSONResponse([response], headers=headers)

    async def info(self):
        shard = self.state.shard
        return {
            "model_id": self.state.model_id,
            "model_sha": None,
            "model_pipeline_tag": None,
            "model_dtype": shard.dtype,
            "model_device_type": shard.device_type,
            "max_concurrent_requests": self.limits.max_concurrent_requests,
            "max_best_of": self.limits.max_best_of,
            "max_stop_sequences": self.limits.max_stop_sequences,
            "max_input_tokens": self.limits.max_input_tokens,
            "max_total_tokens": self.limits.max_total_tokens,
            "waiting_served_ratio": self.limits.waiting_served_ratio,
            "max_batch_total_tokens": self.limits.max_batch_total_tokens,
            "max_waiting_tokens": self.limits.max_waiting_tokens,
            "max_batch_size": None,
            "validation_workers": 1,
            "max_client_batch_size": self.limits.max_client_batch_size,
            "router": "text-generation-router",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        }

    async def health(self) -> Response:
        if not await self.state.infer.health():
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    async def tokenize(self, body: GenerateRequest):
        try:
            ids = self.validation.truncated_ids(body.inputs, body.params().truncate)
        except RouterError as error:
            return error_response(error)
        return token_offsets(self.state.tokenizer, body.inputs, ids)

    async def chat_tokenize(self, body: ChatRequest):
        try:
            text = chat_prompt(self.state.tokenizer, body, offered_tools(*chat_tools(body)))
        except RouterError as error:
            return error_response(error)
        ids = encode_chat(self.state.tokenizer, text)
        return {"tokenize_response": token_offsets(self.state.tokenizer, text, ids), "templated_text": text}

    def router(self) -> APIRouter:
        """The routes, for `FastAPI.include_router`."""
        router = APIRouter(tags=[TAG])
        router.post("/generate")(self.generate)
        router.post("/generate_stream")(self.generate_stream)
        router.post("/")(self.compat_generate)
        router.get("/info")(self.info)
        router.get("/health")(self.health)
        router.get("/ping", include_in_schema=False)(self.health)
        router.get("/", include_in_schema=False)(self.health)
        router.get("/metrics")(metrics_response)
        router.post("/tokenize")(self.tokenize)
        router.post("/chat_tokenize")(self.chat_tokenize)
        return router


async def metrics_response() -> Response:
    """GET /metrics: the router's registry under TGI's names (also served on --prometheus-port)."""
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_offsets(tokenizer, text: str, ids: list[int]) -> list[dict]:
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
