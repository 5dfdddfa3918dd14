"""OpenAI tool calling in InternLM2's own format: the prompt, the forced-call grammar, and the reply parser.

InternLM2 chat models are trained on this exchange (special tokens in angle brackets, each one token id):

    <|im_start|>system name=<|plugin|>
    [{"name": "get_weather", "description": "...", "parameters": {...}}]<|im_end|>    the tools, after the system turn
    ...
    <|im_start|>assistant
    Let me look.<|action_start|><|plugin|>
    {"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|><|im_end|>   a call: text, then the call
    <|im_start|>environment name=<|plugin|>
    {"temperature": 21}<|im_end|>                                                       the tool's result

OpenAI's side: `tools` are `{"type": "function", "function": {"name", "description", "parameters"}}`; a call
comes back as `tool_calls: [{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}]`;
results are sent back as `{"role": "tool", "tool_call_id", "content"}` after the assistant message that holds
the calls. InternLM2's `parameters` is OpenAI's `arguments` (as an object, not a JSON string).

`tool_choice`: `auto` lets the model choose and parses what it writes; `none` neither shows the tools to the
model nor parses; `required` and a named function constrain the reply, token by token, to calls of the tools
(of that one tool) through a grammar: they are enforced, not hoped for.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from text_generation_common.grammar import JSON_STYLE, grammar_from_lark

from .types import RouterError

ACTION_START = "<|action_start|>"
ACTION_END = "<|action_end|>"
PLUGIN = "<|plugin|>"
PLUGIN_SYSTEM_ROLE = f"system name={PLUGIN}"
PLUGIN_RESULT_ROLE = f"environment name={PLUGIN}"
MARKERS = (ACTION_START, ACTION_END, PLUGIN)  # the special tokens a reply with tool calls is parsed by
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class ToolError(RouterError):
    status = 422
    error_type = "tool_error"

    def __init__(self, message: str):
        super().__init__(f"Tool error: {message}")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: the function takes no arguments
    strict: bool | None = None  # accepted; a forced call follows the schema exactly either way


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the call's parameters
    id: str

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_tools(tools: list[Any]) -> list[Tool]:
    """The request's tools, checked; ToolError (422) naming the bad one."""
    parsed = []
    for index, raw in enumerate(tools):
        try:
            tool = Tool.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ToolError(f"`tools[{index}]` is not a valid function tool ({problems})") from None
        name = tool.function.name
        if not FUNCTION_NAME.match(name):
            raise ToolError(f"`tools[{index}]` has function name {name!r}: use 1-64 letters, digits, '_' or '-'")
        if any(t.function.name == name for t in parsed):
            raise ToolError(f"two tools are named {name!r}")
        parsed.append(tool)
    return parsed


def parse_tool_choice(choice: Any, tools: list[Tool]) -> str | None:
    """"auto", "none", "required", or the name of the function a named choice forces; None when no tools."""
    if not tools:
        if choice is not None and choice != "none":
            raise ToolError("`tool_choice` needs `tools`")
        return None
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(t.function.name == name for t in tools):
            raise ToolError(f"`tool_choice` names function {name!r}, which is not among `tools`")
        return f"function:{name}"
    raise ToolError(
        f'`tool_choice` must be "auto", "none", "required" or {{"type": "function", "function": {{"name": ...}}}}. '
        f"Given: {choice!r:.200}"
    )


def forced_function(choice: str | None) -> str | None:
    """The function a named tool_choice forces."""
    return choice.removeprefix("function:") if choice and choice.startswith("function:") else None


# ------------------------------------------------------------------------------------------ the prompt


def _functions(tools: list[Tool]) -> list[dict]:
    return [tool.function.model_dump(exclude_none=True, exclude={"strict"}) for tool in tools]


def _call_text(name: str, parameters: Any) -> str:
    payload = json.dumps({"name": name, "parameters": parameters}, ensure_ascii=False)
    return f"{ACTION_START}{PLUGIN}\n{payload}{ACTION_END}"


def _history_calls(index: int, tool_calls: Any) -> str:
    """An assistant message's `tool_calls` as InternLM2 wrote them."""
    if not isinstance(tool_calls, list):
        raise ToolError(f"`messages[{index}].tool_calls` must be a list")
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f"`messages[{index}].tool_calls` holds a call without a function name")
        arguments = function.get("arguments") or "{}"
        try:
            parameters = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as error:
            raise ToolError(
                f"`messages[{index}].tool_calls` call of {function['name']!r}: arguments are not JSON ({error})"
            ) from None
        calls.append(_call_text(function["name"], parameters))
    return "".join(calls)


def internlm2_turns(messages: list[dict], tools: list[Tool] | None) -> list[dict]:
    """`messages` (content already text) rewritten into InternLM2's tool turns for a template that renders
    `role` and `content` only: the tools as a `system name=<|plugin|>` turn after the first system turn (first
    of all when there is none), each assistant `tool_calls` appended to its content, each `tool` result as an
    `environment name=<|plugin|>` turn."""
    turns = []
    for index, message in enumerate(messages):
        turn = {**message, "content": message.get("content") or ""}
        if message["role"] == "assistant" and message.get("tool_calls"):
            turn["content"] += _history_calls(index, message["tool_calls"])
        elif message["role"] == "tool":
            turn["role"] = PLUGIN_RESULT_ROLE
        turns.append(turn)
    if tools:
        at = 1 if turns and turns[0]["role"] == "system" else 0
        turns.insert(at, {"role": PLUGIN_SYSTEM_ROLE, "content": json.dumps(_functions(tools), ensure_ascii=False)})
    return turns


# ----------------------------------------------------------------------------------------- the grammar


def _call_schema(tool: Tool) -> dict:
    parameters = tool.function.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "parameters": parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def tool_call_grammar(tools: list[Tool], forced: str | None, parallel: bool) -> str:
    """A reply that is only tool calls: one or more calls of any tool (one if not `parallel`), or exactly
    one call of the `forced` function. Each call is InternLM2's markers around a JSON object whose
    `parameters` follow that tool's schema."""
    chosen = [tool for tool in tools if forced is None or tool.function.name == forced]
    schemas = [_call_schema(tool) for tool in chosen]
    payload = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    payload = {**payload, "x-guidance": JSON_STYLE}
    repeat = "+" if parallel and forced is None else ""
    return grammar_from_lark(
        f"start: call{repeat}\n"
        f'call: {ACTION_START} {PLUGIN} "\\n" payload {ACTION_END}\n'
        f"payload: %json {json.dumps(payload)}\n"
    )


# ------------------------------------------------------------------------------------------ the reply


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _held_back(text: str) -> int:
    """How many characters at the end of `text` could be the start of a marker."""
    longest = max(len(marker) for marker in MARKERS) - 1
    for length in range(min(len(text), longest), 0, -1):
        if any(marker.startswith(text[-length:]) for marker in MARKERS):
            return length
    return 0


class ToolCallParser:
    """Splits a reply into content and tool calls as its text arrives (special tokens spelled out).

    `feed(text)` returns the content that can be sent now and the calls completed by `text`; text that may be
    the beginning of a marker is held back until the next piece decides. A call is the text from
    `<|action_start|>` (and an optional `<|plugin|>`) to `<|action_end|>`: a JSON object with a string `name`
    and an object `parameters` (or `arguments`). A call that does not parse, or that the reply never closes,
    goes to the content without its markers. No marker ever reaches the content.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._in_call = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        content, calls = [], []
        while True:
            if self._in_call:
                end = self._pending.find(ACTION_END)
                if end < 0:
                    break
                payload, self._pending = self._pending[:end], self._pending[end + len(ACTION_END) :]
                self._in_call = False
                call = self._parse(payload)
                if call is None:
                    content.append(_without_markers(payload))
                else:
                    calls.append(call)
                continue
            start = self._pending.find(ACTION_START)
            if start < 0:
                keep = _held_back(self._pending)
                content.append(_without_markers(self._pending[: len(self._pending) - keep]))
                self._pending = self._pending[len(self._pending) - keep :]
                break
            content.append(_without_markers(self._pending[:start]))
            self._pending = self._pending[start + len(ACTION_START) :]
            self._in_call = True
        self.calls.extend(calls)
        return "".join(content), calls

    def finish(self) -> str:
        """The content still held back when the reply ends (an unclosed call's text among it)."""
        rest, self._pending, self._in_call = self._pending, "", False
        return _without_markers(rest)

    @staticmethod
    def _parse(payload: str) -> ToolCall | None:
        text = payload.removeprefix(PLUGIN).strip()
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        parameters = call.get("parameters", call.get("arguments", {}))
        if isinstance(parameters, str):  # some fine-tunes write OpenAI's JSON string
            try:
                parameters = json.loads(parameters)
            except json.JSONDecodeError:
                return None
        if not isinstance(parameters, dict):
            return None
        return ToolCall(call["name"], json.dumps(parameters, ensure_ascii=False), _new_call_id())


def _without_markers(text: str) -> str:
    for marker in MARKERS:
        text = text.replace(marker, "")
    return text


def parse_reply(text: str) -> tuple[str, list[ToolCall]]:
    """A whole reply's content and calls."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    return content + parser.finish(), calls
