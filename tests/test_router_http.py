"""The HTTP front end over real sockets: uvicorn serving `create_app` with a real tokenizer and `Validation`,
and a deterministic fake `Infer` (no shard), driven by httpx, the official `text_generation` client and the
`openai` client."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
import uvicorn
from text_generation import Client
from text_generation.errors import OverloadedError as ClientOverloaded
from text_generation.errors import ValidationError as ClientValidationError
from text_generation_router.chat import TemplateError, encode_chat, render_chat
from text_generation_router.api import create_app
from fake_infer import FakeInfer, fake_state
from text_generation_router.types import (
    GenerationRequest,
    RouterLimits,
    Token,
)
from text_generation_common.sockets import free_port
from text_generation_common.tokenizer import Tokenizer

LIMITS = RouterLimits(
    max_concurrent_requests=8,
    max_best_of=2,
    max_stop_sequences=4,
    max_top_n_tokens=5,
    max_input_tokens=64,
    max_total_tokens=128,
    max_client_batch_size=4,
)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # text_generation uses .dict()
STOP_EARLY = "please stop early"  # prompts containing this end with <|im_end|> after 3 tokens


class HttpFakeInfer(FakeInfer):
    """Deterministic tokens from the prompt (and the seed when sampling); a prompt containing STOP_EARLY gets
    <|im_end|> as its third token."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: tuple[int, ...]):
        super().__init__(tokenizer, eos_ids, max_concurrent=LIMITS.max_concurrent_requests)
        self.im_end = tokenizer.token_to_id("<|im_end|>")

    @staticmethod
    def sampled(request: GenerationRequest) -> bool:
        return request.parameters.do_sample or request.parameters.temperature != 1.0

    def token_ids(self, request: GenerationRequest) -> list[int]:
        base = sum(request.input_ids) + (request.parameters.seed % 97 if self.sampled(request) else 0)
        ids = [300 + (base + 37 * i) % 600 for i in range(request.max_new_tokens)]
        if STOP_EARLY in self.tokenizer.decode(list(request.input_ids)) and len(ids) > 3:
            ids[2] = self.im_end
        return ids

    def details(self, request: GenerationRequest, index: int, token_id: int) -> dict:
        logprob = -0.1 * (index + 1) - (request.parameters.seed % 13) * 0.01 * self.sampled(request)
        top = tuple(
            Token(id=token_id + k, text=self.tokenizer.decode([token_id + k]), logprob=logprob - k)
            for k in range(request.top_n_tokens)
        )
        prefill = None
        if index == 0 and request.prefill_logprobs:
            prefill = tuple(
                Token(id=t, text=self.tokenizer.decode([t]), logprob=None if j == 0 else -1.0)
                for j, t in enumerate(request.input_ids)
            )
        return {"logprob": logprob, "top_tokens": top, "prefill": prefill}


def in_context(tokenizer: Tokenizer, prompt_ids, ids) -> str:
    """What `ids` add to the text after the prompt by the router's rule, computed without TextStream: the
    ordinary ids decoded after the prompt's last 5 tokens (for their leading spaces), special ids skipped."""
    context = list(prompt_ids[-5:])
    ordinary = [i for i in ids if i not in tokenizer.special_token_ids]
    return tokenizer.decode(context + ordinary)[len(tokenizer.decode(context)) :]


@pytest.fixture(scope="module")
def server(tiny_internlm2_dir: Path):
    tokenizer = Tokenizer.from_pretrained(tiny_internlm2_dir)
    # the shard's EOS ids without <|im_end|>: the chat route must add its id to stop_token_ids itself
    infer = HttpFakeInfer(tokenizer, (2,))
    state = fake_state(infer, LIMITS, model_id="tiny-internlm2")
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    server = type("Server", (), {})()
    server.url, server.infer, server.tokenizer, server.state = (
        f"http://127.0.0.1:{port}",
        infer,
        tokenizer,
        state,
    )
    yield server
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def sse_events(response: httpx.Response) -> list:
    """Parse a TGI SSE body strictly: every event is `data:<payload>` followed by a blank line."""
    body = response.text
    assert body.endswith("\n\n"), body[-100:]
    events = []
    for block in body.split("\n\n")[:-1]:
        if block.startswith(":"):
            continue  # keep-alive comment
        assert block.startswith("data:") and not block.startswith("data: "), block
        payload = block[len("data:") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ------------------------------------------------------------------------------------------- generate


def test_generate_shapes_and_headers(server, http):
    r = http.post(
        "/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 5, "details": True}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 5
    assert details["seed"] is None  # greedy
    assert details["prefill"] == [] and len(details["tokens"]) == 5
    assert set(details["tokens"][0]) == {"id", "text", "logprob", "special"}
    assert "top_tokens" not in details and "best_of_sequences" not in details
    ids = [t["id"] for t in details["tokens"]]
    # the text is the tokens' texts joined: each decoded in the context of the prompt's last tokens
    assert body["generated_text"] == "".join(t["text"] for t in details["tokens"])
    assert body["generated_text"] == in_context(server.tokenizer, server.infer.requests[-1].input_ids, ids)
    assert r.headers["x-generated-tokens"] == "5"
    assert int(r.headers["x-prompt-tokens"]) == len(server.tokenizer.encode("Hello world"))
    for name in ("x-compute-type", "x-total-time", "x-validation-time", "x-queue-time", "x-inference-time"):
        assert name in r.headers
    # the prompt was encoded with a BOS (add_special_tokens=True)
    assert server.infer.requests[-1].input_ids[0] == server.tokenizer.bos_token_id

    no_details = http.post(
        "/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 5}}
    ).json()
    assert no_details == {"generated_text": body["generated_text"]}


def test_generate_prefill_top_tokens_full_text_truncate(server, http):
    r = http.post(
        "/generate",
        json={
            "inputs": "The quick brown fox",
            "parameters": {
                "max_new_tokens": 3,
                "details": True,
                "decoder_input_details": True,
                "top_n_tokens": 2,
                "return_full_text": True,
                "truncate": 3,
            },
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    details = body["details"]
    assert len(details["prefill"]) == 3  # truncated from the left to 3 tokens
    assert details["prefill"][0]["logprob"] is None and set(details["prefill"][0]) == {
        "id",
        "text",
        "logprob",
    }
    full = server.tokenizer.encode("The quick brown fox")
    assert [t["id"] for t in details["prefill"]] == full[-3:]
    assert len(details["top_tokens"]) == 3 and all(len(step) == 2 for step in details["top_tokens"])
    assert body["generated_text"].startswith("The quick brown fox")


def test_best_of_returns_the_best_by_mean_logprob(http):
    r = http.post(
        "/generate",
        json={
            "inputs": "Hello",
            "parameters": {"max_new_tokens": 4, "best_of": 2, "do_sample": True, "details": True},
        },
    )
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    others = details["best_of_sequences"]
    assert len(others) == 1 and others[0]["seed"] is not None and details["seed"] is not None

    def mean(tokens):
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert mean(details["tokens"]) >= mean(others[0]["tokens"])
    assert set(others[0]) >= {
        "generated_text",
        "finish_reason",
        "generated_tokens",
        "seed",
        "prefill",
        "tokens",
    }


def test_generate_stream_sse_format(server, http):
    r = http.post(
        "/generate_stream",
        json={
            "inputs": "Hello world",
            "parameters": {"max_new_tokens": 6, "details": True, "top_n_tokens": 1},
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5, 6]
    for e in events[:-1]:
        assert e["generated_text"] is None and e["details"] is None and len(e["top_tokens"]) == 1
    last = events[-1]
    assert last["details"] == {
        "finish_reason": "length",
        "generated_tokens": 6,
        "seed": None,
        "input_length": len(server.tokenizer.encode("Hello world")),
    }
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    # with an early EOS-like stop sequence the stream ends there and keeps the stop text
    r = http.post("/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 10}})
    events = sse_events(r)
    assert len(events) == 10 and "details" in events[-1] and events[-1]["details"] is None


def test_stop_sequences(server, http):
    full = http.post(
        "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 8, "details": True}}
    ).json()
    texts = [t["text"] for t in full["details"]["tokens"]]
    stop = texts[2].strip() or texts[2]
    r = http.post(
        "/generate_stream",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 8, "stop": [stop], "details": True}},
    )
    events = sse_events(r)
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert len(events) == 3 and events[-1]["generated_text"].endswith(stop)


def test_compat_route_and_official_client(server):
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 1
        assert r.json()[0]["generated_text"].startswith("Hello")  # return_full_text defaults to true here
    client = Client(server.url, timeout=10)
    response = client.generate("Hello world", max_new_tokens=5, decoder_input_details=True, top_n_tokens=2)
    assert response.details.generated_tokens == 5 and response.details.finish_reason == "length"
    assert response.details.seed is None and len(response.details.prefill) > 0
    assert len(response.details.top_tokens) == 5
    streamed = list(client.generate_stream("Hello world", max_new_tokens=5))
    assert [s.token.id for s in streamed] == [t.id for t in response.details.tokens]
    assert streamed[-1].generated_text == response.generated_text
    assert streamed[-1].details.generated_tokens == 5
    sampled = client.generate("Hello", max_new_tokens=3, do_sample=True, seed=42)
    assert sampled.details.seed == 42
    with pytest.raises(ClientValidationError):
        client.generate("Hello", max_new_tokens=10_000)
    with pytest.raises(ClientValidationError):
        list(client.generate_stream("Hello", max_new_tokens=10_000))


# ------------------------------------------------------------------------------------------- errors

INVALID = [
    ({"temperature": 0}, "`temperature`"),
    ({"temperature": -1.0}, "`temperature`"),
    ({"repetition_penalty": 0}, "`repetition_penalty`"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty`"),
    ({"frequency_penalty": -3}, "`frequency_penalty`"),
    ({"top_k": 0}, "`top_k`"),
    ({"top_p": 1.0}, "`top_p`"),
    ({"top_p": 0}, "`top_p`"),
    ({"typical_p": 1.0}, "`typical_p`"),
    ({"max_new_tokens": 0}, "`max_new_tokens`"),
    ({"max_new_tokens": 1000}, "`max_new_tokens`"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop`"),
    ({"top_n_tokens": 6}, "`top_n_tokens`"),
    ({"best_of": 3, "do_sample": True}, "`best_of`"),
    ({"best_of": 2}, "`best_of`"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed`"),
    ({"truncate": 0}, "`truncate`"),
    ({"truncate": 65}, "`truncate`"),
    ({"grammar": {"type": "regex", "value": "a(("}}, "`grammar` (regex) is not valid: "),
    ({"grammar": {"type": "json", "value": {"type": "foo"}}}, "`grammar` (json) is not valid: "),
    ({"grammar": {"type": "json", "value": "{not json"}}, "not valid JSON"),
    ({"grammar": {"type": "xml", "value": "<a/>"}}, "`grammar` type must be"),
    ({"grammar": "a+"}, '`grammar` must be {"type": ..., "value": ...}'),
    ({"seed": -1}, "`seed`"),
]


@pytest.mark.parametrize("parameters,needle", INVALID, ids=[str(p) for p, _ in INVALID])
def test_invalid_parameters_are_422_naming_the_field(http, parameters, needle):
    r = http.post("/generate", json={"inputs": "Hello", "parameters": parameters})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation" and needle in body["error"]
    assert body["error"].startswith("Input validation error: ")


def test_input_limits_and_stream_only_errors(http):
    long_text = " ".join(["hello world"] * 80)
    r = http.post("/generate", json={"inputs": long_text, "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 422 and "`inputs` must have less than 64 tokens" in r.json()["error"]
    r = http.post("/generate", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422 and "`inputs` cannot be empty" in r.json()["error"]
    # errors on streams: HTTP 200 and one error event
    for parameters, needle in (
        ({"decoder_input_details": True}, "decoder_input_details"),
        ({"best_of": 2, "do_sample": True}, "best_of"),
        ({"temperature": 0}, "temperature"),
    ):
        r = http.post("/generate_stream", json={"inputs": "Hello", "parameters": parameters})
        assert r.status_code == 200
        events = sse_events(r)
        assert len(events) == 1 and events[0]["error_type"] == "validation" and needle in events[0]["error"]
    # malformed bodies get the error JSON too
    r = http.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and "inputs" in r.json()["error"]
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    # and the server keeps serving
    assert (
        http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}}).status_code
        == 200
    )


def test_overloaded_is_429(server, http):
    server.infer.max_concurrent = 0
    try:
        r = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}})
        assert r.status_code == 429 and r.json() == {
            "error": "Model is overloaded",
            "error_type": "overloaded",
        }
        r = http.post("/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}})
        assert sse_events(r) == [{"error": "Model is overloaded", "error_type": "overloaded"}]
        with pytest.raises(ClientOverloaded):
            Client(server.url).generate("Hello", max_new_tokens=1)
        r = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        )
        assert r.status_code == 429
    finally:
        server.infer.max_concurrent = LIMITS.max_concurrent_requests
    assert (
        http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}}).status_code
        == 200
    )


def test_client_disconnect_cancels_the_request(server):
    infer = server.infer
    cancelled_before = infer.cancelled
    infer.delay = 0.02
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            with http.stream(
                "POST", "/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 100}}
            ) as r:
                lines = r.iter_lines()
                seen = 0
                for line in lines:
                    if line.startswith("data:"):
                        seen += 1
                        if seen == 2:
                            break
            deadline = time.monotonic() + 5
            while infer.cancelled == cancelled_before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert infer.cancelled == cancelled_before + 1
            assert infer.active == 0
            # OpenAI streams too
            with http.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 100,
                    "stream": True,
                },
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        break
            deadline = time.monotonic() + 5
            while infer.cancelled == cancelled_before + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert infer.cancelled == cancelled_before + 2 and infer.active == 0
    finally:
        infer.delay = 0.0


# ------------------------------------------------------------------------------------------- the rest


def test_info_health_metrics_tokenize_docs(server, http):
    info = http.get("/info").json()
    assert info["model_id"] == "tiny-internlm2" and info["max_input_tokens"] == 64
    assert info["max_total_tokens"] == 128 and info["router"] == "text-generation-router"
    assert info["max_best_of"] == 2 and info["max_stop_sequences"] == 4 and info["max_client_batch_size"] == 4
    health = http.get("/health")
    assert health.status_code == 200 and health.content == b""
    http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}})
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert_tgi_metric_names(metrics.text)

    text = "Hello world, 你好"
    tokens = http.post("/tokenize", json={"inputs": text}).json()
    ids = server.tokenizer.encode(text)
    assert [t["id"] for t in tokens] == ids
    assert tokens[0]["start"] == tokens[0]["stop"] == 0  # BOS
    data = text.encode()
    for t in tokens:
        assert data[t["start"] : t["stop"]].decode(errors="replace") == t["text"]
    assert tokens[-1]["stop"] == len(data)
    assert http.get("/docs").status_code == 200
    assert "/generate" in http.get("/api-doc/openapi.json").json()["paths"]


# TGI's request metrics: name -> type. Counters carry no _total suffix, and no series ends in _created.
TGI_METRICS = {
    "tgi_request_count": "counter",
    "tgi_request_success": "counter",
    "tgi_request_failure": "counter",
    "tgi_request_duration": "histogram",
    "tgi_request_validation_duration": "histogram",
    "tgi_request_queue_duration": "histogram",
    "tgi_request_inference_duration": "histogram",
    "tgi_request_mean_time_per_token_duration": "histogram",
    "tgi_request_input_length": "histogram",
    "tgi_request_max_new_tokens": "histogram",
    "tgi_request_generated_tokens": "histogram",
    "tgi_queue_size": "gauge",
    "tgi_batch_current_size": "gauge",
    "tgi_batch_current_max_tokens": "gauge",
    "tgi_batch_max_total_tokens": "gauge",
    "tgi_batch_next_size": "histogram",
    "tgi_batch_inference_count": "counter",
    "tgi_batch_inference_success": "counter",
    "tgi_batch_inference_failure": "counter",
    "tgi_batch_inference_duration": "histogram",
    "tgi_batch_forward_duration": "histogram",
    "tgi_batch_decode_duration": "histogram",
}


def assert_tgi_metric_names(text: str) -> None:
    """Parsed with prometheus-client's parser (which itself would rename counter samples to *_total): every TGI
    metric has its name and type; the raw lines name counters as TGI does."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in TGI_METRICS.items():
        assert name in families and families[name].type == kind, (name, families.get(name))
    sample_names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert not [n for n in sample_names if n.endswith(("_total", "_created"))]
    assert {"tgi_request_count", "tgi_request_success", "tgi_request_failure"} <= sample_names
    assert re.search(r'^tgi_request_failure\{err="validation"\} [1-9]', text, re.MULTILINE)


def test_health_503_when_unhealthy(server, http):
    server.infer.healthy = False
    try:
        r = http.get("/health")
        assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    finally:
        server.infer.healthy = True
    assert http.get("/health").status_code == 200


MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! 你好"},
]
EXPECTED_PROMPT = (
    "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHello! 你好<|im_end|>\n<|im_start|>assistant\n"
)


def test_chat_prompt_is_internlm2_format_with_one_bos(server, http):
    tokenizer = server.tokenizer
    assert render_chat(tokenizer, MESSAGES) == EXPECTED_PROMPT
    ids = encode_chat(tokenizer, EXPECTED_PROMPT)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids[1] == tokenizer.token_to_id("<|im_start|>")
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200, r.text
    request = server.infer.requests[-1]
    assert list(request.input_ids) == ids
    # the shard's EOS set lacks <|im_end|> here: the chat ends on its id (a stop token), not on its text
    assert request.stop_token_ids == (tokenizer.token_to_id("<|im_end|>"),)
    assert "<|im_end|>" not in request.stop_sequences
    # content parts are flattened
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]}
    ]
    assert "<|im_start|>user\nHello there<|im_end|>" in render_chat(tokenizer, parts)


def test_the_shard_is_asked_for_token_logprobs_only_where_a_route_reports_them(server, http):
    """TGI's routes always report each token's logprob; OpenAI's only when asked, or to rank best_of's candidates."""
    cases = [
        ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, True),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}, False),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "logprobs": 0}, True),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "best_of": 2, "temperature": 1.0}, True),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "n": 2, "best_of": 2, "temperature": 1.0}, False),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}, False),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "logprobs": True}, True),
    ]
    for route, body, wanted in cases:
        r = http.post(route, json=body)
        assert r.status_code == 200, (route, body, r.text)
        assert server.infer.requests[-1].token_logprobs is wanted, (route, body)


def test_missing_or_broken_template_is_422(server, http):
    tokenizer = server.tokenizer
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 422 and r.json()["error_type"] == "template_error"
        tokenizer.chat_template = "{{ raise_exception('no system messages') }}"
        with pytest.raises(TemplateError, match="no system messages"):
            render_chat(tokenizer, MESSAGES)
        tokenizer.chat_template = (
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        )
        assert render_chat(tokenizer, MESSAGES) == MESSAGES[0]["content"]  # loop controls are on
    finally:
        tokenizer.chat_template = saved


def test_openai_chat(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    done = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5, temperature=0)
    choice = done.choices[0]
    assert done.object == "chat.completion" and done.model == "tiny-internlm2"
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens == len(
        server.infer.requests[-1].input_ids
    )
    assert done.usage.total_tokens == done.usage.prompt_tokens + 5
    assert server.infer.requests[-1].parameters.do_sample is False  # temperature 0 -> greedy

    stream = client.chat.completions.create(
        model="my-model",
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    token_chunks = chunks[:-1]
    assert len(token_chunks) == 5 and all(c.model == "my-model" for c in chunks)
    assert "".join(c.choices[0].delta.content for c in token_chunks) == choice.message.content
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 4 + ["length"]
    assert len(token_chunks[0].choices[0].logprobs.content[0].top_logprobs) == 2

    # <|im_end|> ends the turn: finish_reason "stop", and the special token prints nothing
    early = [{"role": "user", "content": STOP_EARLY}]
    done = client.chat.completions.create(model="tgi", messages=early, max_tokens=10, temperature=0)
    assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens == 3
    assert "<|im_end|>" not in done.choices[0].message.content
    chunks = list(
        client.chat.completions.create(model="tgi", messages=early, max_tokens=10, temperature=0, stream=True)
    )
    assert len(chunks) == 3 and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content == ""

    # OpenAI's top_p 1.0 is "no nucleus cut" (TGI's /generate refuses 1.0); above 1 is refused, naming it
    client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5, top_p=1.0)
    assert server.infer.requests[-1].parameters.top_p == 1.0
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5, top_p=1.5)
    error = refused.value.response.json()
    assert "`top_p`" in error["error"] and error["error_type"] == "validation"
    with pytest.raises(openai.APIError, match="top_p"):
        list(client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5, top_p=1.5, stream=True))


def test_openai_completions_and_models(server, http):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-internlm2"]
    done = client.completions.create(model="tgi", prompt="Hello world", max_tokens=4)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 4
    several = client.completions.create(model="tgi", prompt=["Hello", "The quick brown fox"], max_tokens=3)
    assert [c.index for c in several.choices] == [0, 1] and several.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(model="tgi", prompt=["Hello", "The quick"], max_tokens=3, stream=True)
    )
    by_index: dict[int, str] = {0: "", 1: ""}
    for c in chunks:
        by_index[c.choices[0].index] += c.choices[0].text
    assert by_index[0] == several.choices[0].text
    finals = [c for c in chunks if c.choices[0].finish_reason]
    assert len(finals) == 2 and all(c.usage.completion_tokens == 3 for c in finals)
    r = http.post("/v1/completions", json={"prompt": "Hello", "suffix": "x"})
    assert r.status_code == 422 and r.json()["error_type"] == "suffix not supported"
    r = http.post("/v1/completions", json={"prompt": ["a"] * 5})
    assert r.status_code == 422 and r.json()["error_type"] == "batch size exceeded"
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "stream": True})
    assert sse_events(r)[-1] == "[DONE]"


# ------------------------------------------------------------------------------------------- one text rule

# the second prompt makes the fake emit <|im_end|> (a special token) third, in the middle of the generation
AGREEMENT_PROMPTS = ["Hello world", f"Hi, {STOP_EARLY}!"]


@pytest.mark.parametrize("prompt", AGREEMENT_PROMPTS)
def test_generate_stream_and_generate_texts_agree(server, http, prompt):
    """Streamed token texts joined == the final event's generated_text == /generate's generated_text."""
    im_end = server.tokenizer.token_to_id("<|im_end|>")
    parameters = {"max_new_tokens": 8, "details": True}
    events = sse_events(http.post("/generate_stream", json={"inputs": prompt, "parameters": parameters}))
    stream_request = server.infer.requests[-1]
    done = http.post("/generate", json={"inputs": prompt, "parameters": parameters})
    assert done.status_code == 200, done.text
    done = done.json()
    assert server.infer.requests[-1].input_ids == stream_request.input_ids  # the same greedy request
    assert stream_request.stop_token_ids == ()  # only chats end on <|im_end|>

    tokens = [e["token"] for e in events]
    joined = "".join(t["text"] for t in tokens)
    assert joined and joined == events[-1]["generated_text"] == done["generated_text"]
    assert tokens == done["details"]["tokens"]  # the same ids, texts, logprobs and special flags
    assert events[-1]["details"]["finish_reason"] == done["details"]["finish_reason"] == "length"
    assert len(tokens) == done["details"]["generated_tokens"] == 8
    assert joined == in_context(server.tokenizer, stream_request.input_ids, [t["id"] for t in tokens])

    specials = [(i, t) for i, t in enumerate(tokens) if t["special"]]
    if STOP_EARLY in prompt:
        # mid-way, not the last token: it carries no text and does not end a non-chat request
        assert [(i, t["id"], t["text"]) for i, t in specials] == [(2, im_end, "")]
        assert "<|im_end|>" not in joined
    else:
        assert specials == []
    assert all(t["text"] for t in tokens if not t["special"])  # ordinary tokens here all print something


@pytest.mark.parametrize("prompt", AGREEMENT_PROMPTS)
def test_completions_stream_and_not_agree(server, http, prompt):
    """/v1/completions: the streamed texts joined == the non-streamed text == /generate's generated_text."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    done = client.completions.create(model="tgi", prompt=prompt, max_tokens=8)
    done_request = server.infer.requests[-1]
    chunks = list(client.completions.create(model="tgi", prompt=prompt, max_tokens=8, stream=True))
    stream_request = server.infer.requests[-1]
    generated = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 8}})
    assert generated.status_code == 200, generated.text
    assert done_request.input_ids == stream_request.input_ids == server.infer.requests[-1].input_ids
    assert done_request.stop_token_ids == stream_request.stop_token_ids == ()

    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed and streamed == done.choices[0].text == generated.json()["generated_text"]
    assert len(chunks) == done.usage.completion_tokens == 8
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 8
    assert "<|im_end|>" not in streamed


@pytest.mark.parametrize("content", ["Hello! 你好", STOP_EARLY])
def test_chat_stream_and_not_agree_and_end_on_the_turn_end_id(server, content):
    """/v1/chat/completions: streamed delta.content joined == message.content == the logprobs' tokens joined;
    every chat request carries <|im_end|>'s id in stop_token_ids and ends there with "stop"."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    im_end = server.tokenizer.token_to_id("<|im_end|>")
    messages = [{"role": "user", "content": content}]
    done = client.chat.completions.create(
        model="tgi", messages=messages, max_tokens=8, temperature=0, logprobs=True
    )
    done_request = server.infer.requests[-1]
    chunks = list(
        client.chat.completions.create(
            model="tgi", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    stream_request = server.infer.requests[-1]
    assert done_request.input_ids == stream_request.input_ids
    for request in (done_request, stream_request):
        assert request.stop_token_ids == (im_end,) and "<|im_end|>" not in request.stop_sequences

    streamed = "".join(c.choices[0].delta.content for c in chunks)
    message = done.choices[0].message.content
    assert streamed and streamed == message == "".join(e.token for e in done.choices[0].logprobs.content)
    assert "<|im_end|>" not in message
    count, finish = (3, "stop") if content == STOP_EARLY else (8, "length")
    assert len(chunks) == done.usage.completion_tokens == count
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (count - 1) + [finish]
    assert done.choices[0].finish_reason == finish
    if content == STOP_EARLY:  # the turn-end token is the last one streamed, with no text
        assert chunks[-1].choices[0].delta.content == "" and done.choices[0].logprobs.content[-1].token == ""


def test_chat_adds_no_stop_token_when_im_end_is_an_eos_id(tiny_internlm2_dir):
    """A shard that already ends on <|im_end|> (InternLM2's EOS set) gets no extra stop token id."""
    from fastapi.testclient import TestClient

    tokenizer = Tokenizer.from_pretrained(tiny_internlm2_dir)
    im_end = tokenizer.token_to_id("<|im_end|>")
    infer = HttpFakeInfer(tokenizer, (2, im_end))
    state = fake_state(infer, LIMITS)
    with TestClient(create_app(state)) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": STOP_EARLY}], "max_tokens": 8},
        )
    assert r.status_code == 200, r.text
    assert infer.requests[-1].stop_token_ids == () and infer.requests[-1].stop_sequences == ()
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 3
