"""Tool calling in InternLM2's format: the prompt, the reply parser, and tool_choice through the `openai` client.

A random-weight model never chooses a tool by itself, so `auto` is shown two ways: the parser and the
streaming path on scripted token streams (served by a fake Infer over a real socket), and end to end only for
"no tool called". `required` and a named function are enforced by the grammar, so they are shown on the real
model: whatever its weights, the reply is calls of the tools with valid arguments.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import uvicorn

from fake_infer import FakeInfer, fake_state
from router_stack import free_port, start_stack
from text_generation_common.tokenizer import Tokenizer
from text_generation_router.api import create_app
from text_generation_router.chat import render_chat
from text_generation_router.tools import ToolCallParser, parse_reply, parse_tools
from text_generation_router.types import GenerationRequest, RouterLimits

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'

# The follow-up turn as InternLM2 expects it, written out by hand: the tools after the system turn, the call in
# the assistant turn, the result as an environment turn.
FOLLOW_UP = [
    {"role": "system", "content": "You are a helpful assistant."},
    *QUESTION,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
]
FOLLOW_UP_PROMPT = (
    "<s><|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>system name=<|plugin|>\n"
    '[{"name": "get_weather", "description": "The weather of a city", "parameters": {"type": "object", '
    '"properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, '
    '"required": ["city", "days"], "additionalProperties": false}}]<|im_end|>\n'
    "<|im_start|>user\n"
    "What is the weather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n"
    '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|action_end|>'
    "<|im_end|>\n"
    "<|im_start|>environment name=<|plugin|>\n"
    '{"temperature": 21, "sky": "clear"}<|im_end|>\n'
    "<|im_start|>assistant\n"
)


def call_text(payload: str = CALL) -> str:
    return f"<|action_start|><|plugin|>\n{payload}<|action_end|>"


# ------------------------------------------------------------------------------------------ the parser


def feed_all(pieces: list[str]) -> tuple[list[str], list]:
    parser = ToolCallParser()
    contents, calls = [], []
    for piece in pieces:
        content, done = parser.feed(piece)
        contents.append(content)
        calls.extend(done)
    contents.append(parser.finish())
    return contents, calls


def test_markers_split_over_pieces():
    pieces = ["Sure, ", "<|action_", "start|>", "<|plu", "gin|>", "\n", '{"name": "get_weather", ', '"parameters": {"city": "Paris", ',
              '"days": 2}}', "<|action", "_end|>"]
    contents, calls = feed_all(pieces)
    assert "".join(contents) == "Sure, " and not any("<|" in c for c in contents)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": 2})]


def test_a_whole_call_in_one_piece_and_text_around_it():
    contents, calls = feed_all(["I will look." + call_text() + " Done."])
    assert "".join(contents) == "I will look. Done."
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["days"] == 2


def test_two_calls_become_two_tool_calls():
    second = '{"name": "get_time", "parameters": {"zone": "UTC"}}'
    content, calls = parse_reply(call_text() + call_text(second))
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].id != calls[1].id and all(c.id.startswith("call_") for c in calls)


def test_malformed_and_unclosed_calls_go_to_the_content_without_markers():
    content, calls = parse_reply("A" + call_text('{"name": get_weather}') + "B")
    assert calls == [] and content == 'A\n{"name": get_weather}B'
    content, calls = parse_reply("C" + call_text('{"parameters": {}}'))  # no name
    assert calls == [] and "<|" not in content
    content, calls = parse_reply('D<|action_start|><|plugin|>\n{"name": "get_weather", "para')  # cut off
    assert calls == [] and content == 'D\n{"name": "get_weather", "para'


def test_openai_style_arguments_are_accepted_and_normalised():
    content, calls = parse_reply(call_text('{"name": "get_time", "arguments": "{\\"zone\\":\\"CET\\"}"}'))
    assert json.loads(calls[0].arguments) == {"zone": "CET"} and content == ""


def test_text_that_only_looks_like_a_marker_start_is_not_lost():
    contents, calls = feed_all(["a <", "| b", " <|im", " c"])
    assert "".join(contents) == "a <| b <|im c" and calls == []


# ------------------------------------------------------------------------------------------ the prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    return Tokenizer.from_pretrained(tiny_internlm2_dir)


def test_follow_up_turn_renders_internlm2s_format(tokenizer):
    assert render_chat(tokenizer, FOLLOW_UP, tools=parse_tools([WEATHER])) == FOLLOW_UP_PROMPT


def test_a_template_that_renders_tools_gets_them_as_they_are(tiny_internlm2_dir):
    template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{{ '\\n' }}{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    custom = Tokenizer.from_pretrained(tiny_internlm2_dir, chat_template=template)
    text = render_chat(custom, [*QUESTION, {"role": "tool", "content": "21"}], tools=parse_tools(TOOLS))
    assert text == "TOOLS:get_weather;get_time;\nuser: What is the weather in Paris?\ntool: 21\n"


# ------------------------------------------------------------------- scripted replies over a real socket


class ScriptedInfer(FakeInfer):
    """Replies with the text after `SCRIPT:` in the last user message, tokenized (specials as single ids)."""

    def token_ids(self, request: GenerationRequest) -> list[int]:
        prompt = self.tokenizer.decode(list(request.input_ids))
        script = prompt.rsplit("SCRIPT:", 1)[1].split("<|im_end|>", 1)[0]
        return self.tokenizer.encode(script.replace("«", "<|").replace("»", "|>"), add_special_tokens=False)


@pytest.fixture(scope="module")
def scripted(tokenizer):
    im_end = tokenizer.token_to_id("<|im_end|>")
    limits = RouterLimits(max_input_tokens=1000, max_total_tokens=1400)
    infer = ScriptedInfer(tokenizer, (2, im_end))
    server = uvicorn.Server(uvicorn.Config(create_app(fake_state(infer, limits)), port=(port := free_port()), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=30), infer
    server.should_exit = True
    thread.join(10)


def script(reply: str) -> list[dict]:
    """A user turn that makes ScriptedInfer reply `reply` («name» spells the special token <|name|>)."""
    return [{"role": "user", "content": "SCRIPT:" + reply.replace("<|", "«").replace("|>", "»")}]


def streamed_reply(client, messages, **kwargs) -> tuple[str, dict[int, dict], str, list[str]]:
    """content, tool calls by index (id, name, arguments joined), finish_reason and every content delta."""
    contents, calls, finish = [], {}, None
    for chunk in client.chat.completions.create(model="tgi", messages=messages, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        contents.append(delta.content or "")
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or call.id
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return "".join(contents), calls, finish, contents


def test_scripted_call_streamed_and_not(scripted):
    client, _ = scripted
    reply = "Let me check." + call_text() + "<|im_end|>"
    content, calls, finish, deltas = streamed_reply(client, script(reply), tools=TOOLS)
    assert content == "Let me check." and finish == "tool_calls"
    assert not any("<|" in d or "|>" in d for d in deltas)
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 2}

    whole = client.chat.completions.create(model="tgi", messages=script(reply), tools=TOOLS)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("function", "get_weather", {"city": "Paris", "days": 2})
    ]


def test_scripted_two_calls_and_a_malformed_one(scripted):
    client, _ = scripted
    two = call_text() + call_text('{"name": "get_time", "parameters": {"zone": "UTC"}}') + "<|im_end|>"
    content, calls, finish, _ = streamed_reply(client, script(two), tools=TOOLS)
    assert content == "" and finish == "tool_calls" and [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    whole = client.chat.completions.create(model="tgi", messages=script(two), tools=TOOLS)
    assert whole.choices[0].message.content is None and len(whole.choices[0].message.tool_calls) == 2

    broken = "Hm." + call_text('{"name": "get_weather", "parameters": [1, 2]}') + "<|im_end|>"
    whole = client.chat.completions.create(model="tgi", messages=script(broken), tools=TOOLS)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == 'Hm.\n{"name": "get_weather", "parameters": [1, 2]}'


def test_markers_are_text_only_for_requests_with_tools_or_without_skipping(scripted):
    client, infer = scripted
    reply = "A<|im_start|>B" + call_text() + "<|im_end|>"
    plain = client.chat.completions.create(model="tgi", messages=script(reply))
    assert plain.choices[0].message.content == "AB\n" + CALL  # no tools: special tokens carry no text
    shown = client.chat.completions.create(model="tgi", messages=script(reply), extra_body={"skip_special_tokens": False})
    assert shown.choices[0].message.content == "A<|im_start|>B" + call_text()  # every special but the final EOS
    assert infer.requests[-1].shown_special_ids == infer.tokenizer.special_token_ids
    with_tools = client.chat.completions.create(
        model="tgi", messages=script(reply), tools=TOOLS, extra_body={"skip_special_tokens": False}
    )
    assert with_tools.choices[0].message.content == "A<|im_start|>B" and with_tools.choices[0].message.tool_calls
    none = client.chat.completions.create(model="tgi", messages=script(reply), tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.content == "AB\n" + CALL and not none.choices[0].message.tool_calls
    completion = client.completions.create(model="tgi", prompt="SCRIPT:x«im_start»y«im_end»", extra_body={"skip_special_tokens": False})
    assert completion.choices[0].text == "x<|im_start|>y"


# ------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def stack(tiny_internlm2_dir, tmp_path_factory):
    with start_stack(tiny_internlm2_dir, tmp_path_factory.mktemp("tools"), grpc=False) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="-", timeout=60)


def check_call(name: str, arguments: str) -> None:
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_the_server_renders_the_follow_up_turn(stack):
    body = {"messages": FOLLOW_UP, "tools": [WEATHER]}
    assert httpx.post(f"{stack.http_url}/chat_tokenize", json=body).json()["templated_text"] == FOLLOW_UP_PROMPT


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_calls_parse_on_the_real_model(client, stream):
    forced = {"type": "function", "function": {"name": "get_time"}}
    for tool_choice, names in (("required", {"get_weather", "get_time"}), (forced, {"get_time"})):
        kwargs = dict(tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=100, temperature=0)
        if stream:
            content, calls, finish, _ = streamed_reply(client, QUESTION, **kwargs)
            calls = [(c["name"], c["arguments"]) for c in calls.values()]
        else:
            choice = client.chat.completions.create(model="tgi", messages=QUESTION, **kwargs).choices[0]
            content, finish = choice.message.content, choice.finish_reason
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert finish == "tool_calls" and not content and len(calls) == 1, (content, calls)
        assert calls[0][0] in names
        check_call(*calls[0])


def test_required_with_parallel_calls_gives_calls_of_the_tools(client):
    choice = client.chat.completions.create(
        model="tgi", messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0.7, seed=1
    ).choices[0]
    assert choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        check_call(call.function.name, call.function.arguments)
    assert "<|" not in (choice.message.content or "")


def test_auto_on_a_model_that_calls_no_tool(client, stack):
    choice = client.chat.completions.create(
        model="tgi", messages=QUESTION, tools=TOOLS, max_tokens=20, temperature=0
    ).choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    plain = httpx.post(
        f"{stack.http_url}/v1/chat/completions",
        json={"messages": QUESTION, "max_tokens": 20, "temperature": 0},
    ).json()["choices"][0]
    assert plain["message"]["content"] != choice.message.content  # the tools were in the prompt


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "`tools[0]`"),
        ({"tools": [{"type": "retrieval"}]}, "`tools[0]`"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "function name 'bad name!'"),
        ({"tools": [WEATHER, WEATHER]}, "two tools are named 'get_weather'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "`tool_choice`"),
        ({"tool_choice": "required"}, "`tool_choice` needs `tools`"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "mutually exclusive"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
             "tool_choice": "required"},
            "the grammar of its calls is not valid",
        ),
    ],
)
def test_bad_tools_are_422_tool_errors(stack, extra, needle):
    r = httpx.post(f"{stack.http_url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4, **extra})
    assert r.status_code == 422 and r.json()["error_type"] == "tool_error", r.text
    assert needle in r.json()["error"] and r.json()["error"].startswith("Tool error: ")


def test_disabled_grammar_support_refuses_constraints_but_not_auto_tools(tokenizer):
    from fastapi.testclient import TestClient

    infer = ScriptedInfer(tokenizer, (2, tokenizer.token_to_id("<|im_end|>")))
    limits = RouterLimits(max_input_tokens=1000, max_total_tokens=1400, grammar_support=False)
    with TestClient(create_app(fake_state(infer, limits))) as http:
        regex = {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}
        refused = http.post("/generate", json=regex)
        assert refused.status_code == 422 and "--disable-grammar-support" in refused.json()["error"]
        schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
        refused = http.post("/v1/chat/completions", json={"messages": QUESTION, "response_format": schema})
        assert refused.status_code == 422 and refused.json()["error_type"] == "validation"
        forced = http.post("/v1/chat/completions", json={"messages": QUESTION, "tools": TOOLS, "tool_choice": "required"})
        assert forced.status_code == 422 and forced.json()["error_type"] == "tool_error"
        auto = http.post("/v1/chat/completions", json={"messages": script("Hi" + call_text() + "<|im_end|>"), "tools": TOOLS})
        assert auto.status_code == 200 and auto.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
