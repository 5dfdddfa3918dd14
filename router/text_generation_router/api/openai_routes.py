"""OpenAI's routes: /v1/models, /v1/chat/completions and /v1/completions.

Every field the request schemas below accept is honoured, or refused with a 422 naming it; a field they do not
know is refused too. Where OpenAI's meaning differs from TGI's /generate, these routes follow OpenAI:
  * `presence_penalty` and `frequency_penalty` count the generated tokens only, and 0 (or absent) is no penalty
    (/generate keeps TGI's `frequency_penalty` over prompt and output);
  * `temperature` 0 is greedy decoding, `top_p` 1.0 is no nucleus cut;
  * `n` choices are n requests of one prompt (seeds seed, seed+1, ...), which share the prompt's KV blocks
    through the prefix cache; `best_of` (completions) ranks its candidates by mean token logprob;
  * `top_logprobs` (chat) goes up to 20, `logprobs` (completions) up to 5, OpenAI's limits;
  * `user` is accepted: it names the end user for OpenAI's abuse monitoring and changes nothing here;
  * `response_format` `json_object` / `json_schema` constrain the output to JSON (valid under the schema) token
    by token, on chat and completions; `text` is the default;
  * `tools` and `tool_choice` (chat) follow InternLM2's tool format (the `tools` module); `response_format` and tools
    that the model may call are mutually exclusive, as in TGI;
  * `skip_special_tokens` (vLLM's extension, default true): false keeps special tokens' text in the output.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from text_generation_common.grammar import grammar_from_json_schema
from text_generation_common.tokenizer import Tokenizer

from ..chat import render_chat, turn_end_id
from ..request_metrics import RequestGroup
from ..tools import (
    MARKERS,
    Tool,
    ToolCallParser,
    ToolError,
    forced_function,
    parse_reply,
    parse_tool_choice,
    parse_tools,
    tool_call_grammar,
)
from ..types import GenerationRequest, RouterError, RouterState, StreamEnd, StreamToken, ValidationError
from ..validation import GenerateParameters, invalid
from .common import (
    SYSTEM_FINGERPRINT,
    SSEResponse,
    aclose,
    as_router_error,
    error_response,
    generate_all,
    logprob_or_none,
    mean_logprob,
    merged,
    sse,
    token_steps,
    usage_of,
)

TAG = "OpenAI"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for completions' logprobs


class PlainValidationError(ValidationError):
    """A 422 with its own error_type and no prefix (TGI's /v1/completions refusals)."""

    def __init__(self, message: str, error_type: str):
        super().__init__(message)
        self.error_type = error_type


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | bool = Field(alias="schema")  # `schema` would shadow a BaseModel method
    strict: bool | None = None  # accepted: the output follows the schema exactly either way


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: handed to the chat template as they are
    role: str
    content: str | list[Any] | None = None


class OpenAIRequest(BaseModel):
    """The fields chat and completions share."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end-of-sequence token
    skip_special_tokens: bool = True  # vLLM's extension: false keeps the text of special tokens in the output


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool = True  # false: a forced reply holds one call


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    repetition_penalty: float | None = None  # TGI's extension of the route


def chat_messages(body: ChatRequest) -> list[dict]:
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    if not messages:
        raise invalid("`messages` cannot be empty")
    return messages


def chat_tools(body: ChatRequest) -> tuple[list[Tool], str | None]:
    """The request's tools, checked, and its tool_choice ("auto", "none", "required", "function:<name>"; None
    without tools)."""
    tools = parse_tools(body.tools) if body.tools else []
    return tools, parse_tool_choice(body.tool_choice, tools)


def offered_tools(tools: list[Tool], choice: str | None) -> list[Tool] | None:
    """The tools the model is shown: none for tool_choice "none"."""
    return tools if choice not in (None, "none") else None


def chat_prompt(tokenizer: Tokenizer, body: ChatRequest, offered: list[Tool] | None) -> str:
    """The rendered prompt of a chat, with the tools the model may call (what /chat_tokenize shows)."""
    messages = chat_messages(body)
    continue_final = messages[-1].get("role") == "assistant"
    prompt = render_chat(tokenizer, messages, add_generation_prompt=not continue_final, tools=offered)
    if continue_final:
        # continue the assistant's message: cut the rendering right after its content (as TGI)
        content = str(messages[-1].get("content", ""))
        cut = prompt.rfind(content)
        if content and cut >= 0:
            prompt = prompt[: cut + len(content)]
    return prompt


def _count(name: str, value: int | None, limit: int) -> int:
    value = 1 if value is None else value
    if not 1 <= value <= limit:
        raise invalid(f"`{name}` must be >= 1 and <= {limit} (--max-client-batch-size). Given: {value}")
    return value


def _stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _check_common(body: OpenAIRequest) -> None:
    if body.temperature is not None and not 0.0 <= body.temperature <= 2.0:
        raise invalid(f"`temperature` must be >= 0 and <= 2. Given: {body.temperature}")
    if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
        raise invalid(f"`top_p` must be > 0 and <= 1. Given: {body.top_p}")
    if body.stream_options is not None and not body.stream:
        raise invalid("`stream_options` is only allowed when `stream` is true")


def _parameters(body: OpenAIRequest, sample_by_default: bool, **fields: Any) -> GenerateParameters:
    """TGI parameters for an OpenAI body: temperature 0 is greedy, top_p 1.0 is off; details always on."""
    greedy = body.temperature == 0 or (body.temperature is None and not sample_by_default)
    return GenerateParameters(
        temperature=None if greedy else body.temperature,
        do_sample=not greedy,
        top_p=None if body.top_p == 1.0 else body.top_p,
        seed=body.seed,
        stop=_stop_list(body.stop),
        details=True,
        **fields,
    )


def _finish(end: StreamEnd) -> str:
    return "stop" if end.finish_reason == "eos_token" else end.finish_reason


def _tool_finish(end: StreamEnd, called: bool) -> str:
    """A reply that made calls and was not cut at max_tokens finishes with "tool_calls"."""
    return "tool_calls" if called and end.finish_reason != "length" else _finish(end)


def _tool_delta(parser: ToolCallParser, text: str, end: StreamEnd | None) -> tuple[dict, str | None]:
    """A streamed chat's delta for one token's `text` when tools may be called, and its finish_reason: the
    content the parser lets through, and each call the token completed (whole: name and arguments)."""
    before = len(parser.calls)
    content, calls = parser.feed(text)
    if end is not None:
        content += parser.finish()
    delta: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        delta["tool_calls"] = [call.to_openai(before + i) for i, call in enumerate(calls)]
    return delta, (_tool_finish(end, bool(parser.calls)) if end is not None else None)


def _chat_logprobs(tokens: list[StreamToken]) -> dict:
    return {
        "content": [
            {
                "token": t.token.text,
                "logprob": logprob_or_none(t.token.logprob),
                "top_logprobs": [
                    {"token": x.text, "logprob": logprob_or_none(x.logprob)} for x in t.top_tokens
                ],
            }
            for t in tokens
        ]
    }


def _completion_logprobs(tokens: list[StreamToken], offset: int) -> dict:
    """The legacy completions shape; text_offset counts characters from the choice text's start. top_logprobs
    maps text to logprob, so alternatives that print the same text share the entry of the likelier one."""
    text_offset, top_logprobs = [], []
    for t in tokens:
        text_offset.append(offset)
        offset += len(t.token.text)
        alternatives: dict[str, float | None] = {}
        for x in t.top_tokens:  # best first
            alternatives.setdefault(x.text, logprob_or_none(x.logprob))
        top_logprobs.append(alternatives)
    return {
        "tokens": [t.token.text for t in tokens],
        "token_logprobs": [logprob_or_none(t.token.logprob) for t in tokens],
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


class OpenAIRoutes:
    """The OpenAI routes over one RouterState."""

    def __init__(self, state: RouterState):
        self.state = state
        self.validation = state.validation
        self.limits = state.limits
        self.chat_turn_end = turn_end_id(state.tokenizer, tuple(state.shard.eos_token_ids))
        marker_ids = (state.tokenizer.token_to_id(marker) for marker in MARKERS)
        self.marker_ids = frozenset(i for i in marker_ids if i is not None)  # InternLM2's tool-call markers

    def served_model(self, name: str | None) -> str:
        return self.state.model_id if not name or name == "tgi" else name

    def with_openai_sampling(self, request: GenerationRequest, body: OpenAIRequest) -> GenerationRequest:
        """`request` with the body's OpenAI penalties and logit bias, vLLM's `ignore_eos`, the special tokens
        the output shows, and the response format's grammar."""
        request = self.validation.with_openai_sampling(
            request, body.presence_penalty, body.frequency_penalty, body.logit_bias
        )
        shown = frozenset() if body.skip_special_tokens else self.state.tokenizer.special_token_ids
        return replace(
            request, ignore_eos_token=body.ignore_eos, shown_special_ids=shown,
            grammar=self.response_grammar(body.response_format),
        )

    def response_grammar(self, response_format: ResponseFormat | None) -> str:
        """The grammar of `response_format`: "" for text, any JSON object, or JSON valid under the schema."""
        if response_format is None or response_format.type == "text":
            return ""
        if response_format.type == "json_object":
            schema: Any = {"type": "object"}
        elif response_format.json_schema is None:
            raise invalid('`response_format` of type "json_schema" needs `json_schema` {"name", "schema"}')
        else:
            schema = response_format.json_schema.json_schema
        return self.validation.checked_grammar(
            grammar_from_json_schema, schema, what=f"`response_format` ({response_format.type})"
        )

    async def models(self):
        return {
            "object": "list",
            "data": [
                {"id": self.state.model_id, "object": "model", "created": 0, "owned_by": self.state.model_id}
            ],
        }

    # -------------------------------------------------------------------------------- chat

    def tool_mode(self, body: ChatRequest, tools: list[Tool], choice: str | None) -> tuple[str | None, str]:
        """tool_choice ("auto", "required", "function:<name>"; None when the model may call no tool) and the
        grammar that forces the calls ("" unless required or named)."""
        if choice in (None, "none"):
            return None, ""
        if body.response_format is not None and body.response_format.type != "text":
            raise ToolError("Grammar and tools are mutually exclusive")
        if choice == "auto":
            return choice, ""
        grammar = self.validation.checked_grammar(
            tool_call_grammar, tools, forced_function(choice), body.parallel_tool_calls,
            what=f"tool_choice {choice!r}: the grammar of its calls", fail=ToolError,
        )
        return choice, grammar

    def chat_requests(self, body: ChatRequest) -> tuple[list[GenerationRequest], bool]:
        """The n validated requests of a chat, each also ending at the chat's end-of-turn token, and whether
        their replies are parsed for tool calls (tools the model may call: InternLM2's markers are then kept
        in the text for the parser)."""
        _check_common(body)
        n = _count("n", body.n, self.limits.max_client_batch_size)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("`top_logprobs` needs `logprobs` set to true")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise invalid("give `max_tokens` or `max_completion_tokens`, not both")
        tools, requested = chat_tools(body)
        choice, tool_grammar = self.tool_mode(body, tools, requested)
        prompt = chat_prompt(self.state.tokenizer, body, offered_tools(tools, requested))
        params = _parameters(
            body,
            sample_by_default=True,
            max_new_tokens=body.max_tokens if body.max_tokens is not None else body.max_completion_tokens,
            top_n_tokens=body.top_logprobs if body.logprobs else None,
        )
        request = self.validation.validate(
            prompt, params, add_special_tokens=False, stream=body.stream, max_top_n_tokens=MAX_TOP_LOGPROBS,
            token_logprobs=bool(body.logprobs),
        )
        request = self.with_openai_sampling(request, body)
        if choice is not None:
            request = replace(
                request, shown_special_ids=request.shown_special_ids | self.marker_ids,
                grammar=tool_grammar or request.grammar,
            )
        if self.chat_turn_end is not None:
            request = replace(request, stop_token_ids=(*request.stop_token_ids, self.chat_turn_end))
        return self.validation.choices(request, n), choice is not None

    def chat_chunk(
        self, body: ChatRequest, created: int, choices: list[dict], usage: dict | None = None
    ) -> dict:
        return {
            "object": "chat.completion.chunk",
            "id": "",
            "created": created,
            "model": self.served_model(body.model),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage,
        }

    async def chat_events(self, body: ChatRequest, group: RequestGroup) -> AsyncIterator[str]:
        """The chunks of a streamed chat: each choice's tokens as they come, then usage if asked."""
        created = int(time.time())
        requests, parse_calls = self.chat_requests(body)
        parsers = [ToolCallParser() for _ in requests] if parse_calls else None
        stream = merged([token_steps(self.state, r) for r in requests])
        ends: list[StreamEnd] = []
        try:
            async for index, step in stream:
                item = step.token
                delta = {"role": "assistant", "content": item.token.text}
                finish = _finish(step.end) if step.end else None
                if parsers is not None:
                    delta, finish = _tool_delta(parsers[index], item.token.text, step.end)
                choice = {
                    "index": index,
                    "delta": delta,
                    "logprobs": _chat_logprobs([item]) if body.logprobs else None,
                    "finish_reason": finish,
                }
                yield sse(self.chat_chunk(body, created, [choice]))
                if step.end is not None:
                    ends.append(step.end)
                    if len(ends) == len(requests):
                        group.succeeded(step.end)
        finally:
            await aclose(stream)
        if body.stream_options and body.stream_options.include_usage:
            yield sse(self.chat_chunk(body, created, [], usage_of(ends)))

    async def chat_completions(self, body: ChatRequest):
        if body.stream:
            group = RequestGroup()
            return SSEResponse(openai_event_stream(self.chat_events(body, group), group))
        group = RequestGroup()
        try:
            requests, parse_calls = self.chat_requests(body)
            results = await generate_all(self.state, requests)
        except Exception as error:  # noqa: BLE001
            error = as_router_error(error)
            group.failed(error)
            return error_response(error)
        group.succeeded(results[0][1])
        choices = []
        for index, (tokens, end) in enumerate(results):
            message: dict[str, Any] = {"role": "assistant", "content": end.generated_text}
            finish = _finish(end)
            if parse_calls:
                content, calls = parse_reply(end.generated_text)
                message["content"] = content if content or not calls else None
                if calls:
                    message["tool_calls"] = [call.to_openai() for call in calls]
                finish = _tool_finish(end, bool(calls))
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": _chat_logprobs(tokens) if body.logprobs else None,
                    "finish_reason": finish,
                }
            )
        return {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": self.served_model(body.model),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage_of([end for _, end in results]),
        }

    # -------------------------------------------------------------------------------- completions

    def completion_prompts(self, body: CompletionRequest) -> tuple[list[str], int, int]:
        """The prompts, n and the candidates per prompt (best_of, at least n), all checked."""
        if body.suffix is not None:
            raise PlainValidationError(
                "Suffix is not supported and can be achieved by preprocessing the prompt.",
                "suffix not supported",
            )
        _check_common(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise invalid("`prompt` cannot be empty")
        if len(prompts) > self.limits.max_client_batch_size:
            raise PlainValidationError(
                f"Number of prompts exceeds the maximum allowed batch size of {self.limits.max_client_batch_size}",
                "batch size exceeded",
            )
        n = _count("n", body.n, self.limits.max_client_batch_size)
        candidates = _count(
            "best_of", body.best_of if body.best_of is not None else n, self.limits.max_client_batch_size
        )
        if candidates < n:
            raise invalid(f"`best_of` must be >= `n`. Given: best_of {candidates}, n {n}")
        if candidates > n and body.stream:
            raise invalid("`best_of` > `n` cannot be streamed")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise invalid(f"`logprobs` must be >= 0 and <= {MAX_COMPLETION_LOGPROBS}. Given: {body.logprobs}")
        if body.echo and body.logprobs is not None:
            raise invalid(
                "`echo` with `logprobs` is not supported: the prompt's tokens carry no top logprobs"
            )
        return prompts, n, candidates

    def completion_requests(
        self, body: CompletionRequest, prompts: list[str], candidates: int
    ) -> list[list[GenerationRequest]]:
        params = _parameters(
            body,
            sample_by_default=False,
            repetition_penalty=body.repetition_penalty,
            max_new_tokens=body.max_tokens,
            top_n_tokens=body.logprobs,
        )
        out = []
        for prompt in prompts:
            request = self.validation.validate(
                prompt,
                params,
                add_special_tokens=True,
                stream=body.stream,
                max_top_n_tokens=MAX_COMPLETION_LOGPROBS,
                # best_of (more candidates than n) ranks them by their tokens' mean logprob
                token_logprobs=body.logprobs is not None or candidates > (body.n or 1),
            )
            out.append(self.validation.choices(self.with_openai_sampling(request, body), candidates))
        return out

    def completion_choice(
        self, body: CompletionRequest, index: int, prompt: str, tokens: list[StreamToken], text: str
    ) -> dict:
        echo = prompt if body.echo else ""
        return {
            "index": index,
            "text": echo + text,
            "logprobs": _completion_logprobs(tokens, len(echo)) if body.logprobs is not None else None,
        }

    def completion_chunk(self, body: CompletionRequest, created: int, choice: dict) -> dict:
        return {
            "object": "text_completion",
            "id": "",
            "created": created,
            "model": self.served_model(body.model),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [choice],
        }

    async def completion_events(self, body: CompletionRequest, group: RequestGroup) -> AsyncIterator[str]:
        """The chunks of streamed completions: the echoed prompts, every choice's tokens as they come (index
        prompt · n + choice), then usage if asked."""
        created = int(time.time())
        prompts, n, candidates = self.completion_prompts(body)
        requests = [
            r for per_prompt in self.completion_requests(body, prompts, candidates) for r in per_prompt
        ]
        group.grow(len(prompts))
        if body.echo:
            for index in range(len(requests)):
                choice = {"index": index, "text": prompts[index // n], "logprobs": None, "finish_reason": ""}
                yield sse(self.completion_chunk(body, created, choice))
        stream = merged([token_steps(self.state, r) for r in requests])
        ends: dict[int, StreamEnd] = {}
        try:
            async for index, step in stream:
                choice = self.completion_choice(body, index, "", [step.token], step.token.token.text)
                choice["finish_reason"] = ""
                chunk = self.completion_chunk(body, created, choice)
                if step.end is not None:
                    choice["finish_reason"] = _finish(step.end)  # as the non-streamed answer says it
                    chunk["usage"] = usage_of([step.end])
                    ends[index] = step.end
                    first = index - index % n  # the prompt's first choice
                    if all(first + j in ends for j in range(n)):
                        group.succeeded(step.end)  # the prompt's last choice ended
                yield sse(chunk)
        finally:
            await aclose(stream)
        if body.stream_options and body.stream_options.include_usage:
            usage = _completion_usage([[ends[p * n + j] for j in range(n)] for p in range(len(prompts))])
            yield sse({**self.completion_chunk(body, created, {}), "choices": [], "usage": usage})

    async def completions(self, body: CompletionRequest):
        if body.stream:
            group = RequestGroup()
            return SSEResponse(openai_event_stream(self.completion_events(body, group), group))
        group = RequestGroup()
        try:
            prompts, n, candidates = self.completion_prompts(body)
            per_prompt = self.completion_requests(body, prompts, candidates)
            group.grow(len(prompts))
            results = await generate_all(self.state, [r for requests in per_prompt for r in requests])
        except Exception as error:  # noqa: BLE001
            error = as_router_error(error)
            group.failed(error)
            return error_response(error)
        choices, kept = [], []
        for p, prompt in enumerate(prompts):
            best = results[p * candidates : (p + 1) * candidates]
            if candidates > n:  # best_of: the n candidates of highest mean logprob, best first
                best = sorted(best, key=lambda r: mean_logprob(r[0]), reverse=True)[:n]
            group.succeeded(best[0][1])
            kept.append([end for _, end in best])
            for j, (tokens, end) in enumerate(best):
                choice = self.completion_choice(body, p * n + j, prompt, tokens, end.generated_text)
                choice["finish_reason"] = _finish(end)
                choices.append(choice)
        return JSONResponse(
            {
                "object": "text_completion",
                "id": "",
                "created": int(time.time()),
                "model": self.served_model(body.model),
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
                "usage": _completion_usage(kept),
            }
        )

    def router(self) -> APIRouter:
        """The routes, for `FastAPI.include_router`."""
        router = APIRouter(tags=[TAG])
        router.get("/v1/models")(self.models)
        router.post("/v1/chat/completions")(self.chat_completions)
        router.post("/v1/completions")(self.completions)
        return router


def _completion_usage(ends_per_prompt: list[list[StreamEnd]]) -> dict:
    usages = [usage_of(ends) for ends in ends_per_prompt]
    return {
        key: sum(u[key] for u in usages) for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }


async def openai_event_stream(events: AsyncIterator[str], group: RequestGroup) -> AsyncIterator[str]:
    """`events`, then `[DONE]`; an error (validation included: the stream has started) becomes OpenAI's error
    event. A client gone mid-stream closes this generator, which closes `events` and counts the drop."""
    try:
        async for event in events:
            yield event
    except Exception as error:  # noqa: BLE001 - reported to the client inside the stream
        error = as_router_error(error)
        group.failed(error)
        yield openai_error_event(error)
    finally:
        await aclose(events)
        group.close()
    yield sse("[DONE]")


def openai_error_event(error: RouterError) -> str:
    """OpenAI streams report an error as one event (TGI's shape, the code always 422), then [DONE]."""
    return sse({"error": {"message": str(error), "http_status_code": 422}})
