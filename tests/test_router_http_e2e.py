"""The HTTP API on the real stack (shard processes + router, `tests/router_stack.py`), driven by the official
`text_generation` client, the `openai` client and raw httpx; greedy outputs are checked against the engine
run in-process on the same checkpoint."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.importorskip("text_generation_router.cli", reason="the router CLI is not there yet")

from helpers import metric, new_request
from router_stack import TORCH_BLOCKER_MESSAGE, start_stack
from text_generation import Client
from text_generation_common.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # text_generation uses .dict()

PROMPTS = [
    "Hello world! How are you today?",
    "The quick brown fox",
    "A language model reads a sequence of tokens",
    "你好，世界！",
]


@pytest.fixture(scope="module")
def engine(tiny_internlm2_dir):
    from text_generation_server.models import get_model

    model = get_model(tiny_internlm2_dir, dtype="float32", device="cpu")
    model.allocate_kv_cache(64, 16)
    return model


def reference(engine, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ids from the in-process engine, alone in its batch, stopping on EOS like the router."""
    from text_generation_server.models.local import generate

    return generate(engine, [new_request(input_ids, max_new_tokens, ignore_eos=False)])[0].token_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    return Tokenizer.from_pretrained(tiny_internlm2_dir)


@pytest.fixture(scope="module")
def stack(tiny_internlm2_dir, tmp_path_factory):
    # a step budget far below --max-input-tokens: every prompt past 12 tokens is prefilled in chunks
    args = ["--max-batch-prefill-tokens", "12"]
    with start_stack(tiny_internlm2_dir, tmp_path_factory.mktemp("http-e2e"), grpc=False, router_args=args) as running:
        yield running


def sse_payloads(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data:"):
            payload = line[len("data:") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_official_client_greedy_equals_engine(stack, engine, tokenizer):
    client = Client(stack.http_url, timeout=60)
    for prompt in PROMPTS:
        expected = reference(engine, tokenizer.encode(prompt), 12)
        response = client.generate(prompt, max_new_tokens=12, decoder_input_details=True, top_n_tokens=2)
        details = response.details
        assert [t.id for t in details.tokens] == expected, stack.logs()
        assert details.generated_tokens == len(expected) and details.seed is None
        assert details.finish_reason == ("length" if len(expected) == 12 else "eos_token")
        assert response.generated_text == tokenizer.decode(expected, skip_special_tokens=True)
        assert [t.id for t in details.prefill] == tokenizer.encode(prompt)
        assert all(
            len(step) == 2 and step[0].id == tok.id for step, tok in zip(details.top_tokens, details.tokens)
        )

        streamed = list(client.generate_stream(prompt, max_new_tokens=12, top_n_tokens=1))
        assert [s.token.id for s in streamed] == expected
        assert streamed[-1].generated_text == response.generated_text
        assert streamed[-1].details.generated_tokens == len(expected)
        assert all(s.generated_text is None for s in streamed[:-1])


def test_seed_and_stop_sequences(stack):
    client = Client(stack.http_url, timeout=60)
    first = client.generate("Hello", max_new_tokens=8, do_sample=True, seed=1234)
    again = client.generate("Hello", max_new_tokens=8, do_sample=True, seed=1234)
    assert first.details.seed == 1234 and [t.id for t in first.details.tokens] == [
        t.id for t in again.details.tokens
    ]

    events = list(client.generate_stream("The quick brown fox", max_new_tokens=16))
    texts = [e.token.text for e in events]
    k = next(
        (
            i
            for i in range(1, len(texts))
            if texts[i].strip() and texts[i] not in "".join(texts[: i + 1])[:-1]
        ),
        None,
    )
    if k is None:
        pytest.skip("no usable stop text in this model's output")
    stopped = client.generate("The quick brown fox", max_new_tokens=16, stop_sequences=[texts[k]])
    assert stopped.details.finish_reason == "stop_sequence" and stopped.details.generated_tokens == k + 1
    assert stopped.generated_text.endswith(texts[k])


def test_raw_sse_format_and_errors(stack):
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        r = http.post(
            "/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}}
        )
        blocks = r.text.split("\n\n")
        assert blocks[-1] == "" and all(b.startswith("data:{") for b in blocks[:-1] if not b.startswith(":"))
        r = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 10_000}})
        assert r.status_code == 422 and r.json()["error_type"] == "validation"
        assert "max_new_tokens" in r.json()["error"]
        assert http.get("/health").status_code == 200
        info = http.get("/info").json()
        assert (
            info["router"] == "text-generation-router" and info["max_total_tokens"] > info["max_input_tokens"]
        )


def test_openai_clients(stack, engine, tokenizer):
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="-", timeout=60)
    assert [m.id for m in client.models.list().data]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    prompt = "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == 1 and ids[1] != 1
    expected = reference(engine, ids, 10)
    done = client.chat.completions.create(model="tgi", messages=messages, max_tokens=10, temperature=0)
    assert done.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == len(expected)
    assert done.choices[0].finish_reason == ("length" if len(expected) == 10 else "stop")
    chunks = list(
        client.chat.completions.create(
            model="tgi",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == len(expected)
    assert "".join(c.choices[0].delta.content for c in chunks[:-1]) == done.choices[0].message.content

    completion = client.completions.create(model="tgi", prompt=["Hello", "The quick brown fox"], max_tokens=6)
    for choice, text in zip(completion.choices, ["Hello", "The quick brown fox"]):
        assert choice.text == tokenizer.decode(
            reference(engine, tokenizer.encode(text), 6), skip_special_tokens=True
        )
    chunks = list(client.completions.create(model="tgi", prompt="Hello", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text


def test_the_router_process_never_imports_torch(stack):
    """The stack's router runs where `import torch` fails; it started, and it serves."""
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=stack.router_env, capture_output=True, text=True)
    assert blocked.returncode != 0 and TORCH_BLOCKER_MESSAGE in blocked.stderr
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 3}}
    assert httpx.post(f"{stack.http_url}/generate", json=body, timeout=60).status_code == 200
    assert stack.router.poll() is None


def test_streamed_and_final_texts_agree_on_every_route(stack):
    """The same greedy request, streamed and not: the streamed texts joined, the stream's final text and the
    non-streamed text are equal on /generate(_stream), /v1/completions and /v1/chat/completions."""
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="-", timeout=60)
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        for prompt in [*PROMPTS, "数学 ünïcödé 🙂 mixed text"]:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, "details": True}}
            events = sse_payloads(http.post("/generate_stream", json=body).text.splitlines())
            final = http.post("/generate", json=body).json()
            joined = "".join(e["token"]["text"] for e in events)
            assert joined == events[-1]["generated_text"] == final["generated_text"]
            assert [e["token"]["id"] for e in events] == [t["id"] for t in final["details"]["tokens"]]
            assert all(e["token"]["text"] == "" for e in events if e["token"]["special"])

            done = client.completions.create(model="tgi", prompt=prompt, max_tokens=24)
            chunks = list(client.completions.create(model="tgi", prompt=prompt, max_tokens=24, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text == final["generated_text"]
            assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason

            messages = [{"role": "user", "content": prompt}]
            done = client.chat.completions.create(model="tgi", messages=messages, max_tokens=24, temperature=0)
            chunks = list(client.chat.completions.create(
                model="tgi", messages=messages, max_tokens=24, temperature=0, stream=True
            ))
            assert "".join(c.choices[0].delta.content for c in chunks) == done.choices[0].message.content
            assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


async def _stream(client: httpx.AsyncClient, prompt: str, max_new_tokens: int) -> list:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    async with client.stream("POST", "/generate_stream", json=body) as r:
        return sse_payloads([line async for line in r.aiter_lines()])


def test_64_concurrent_streams(stack, engine, tokenizer):
    expected = {p: reference(engine, tokenizer.encode(p), 10) for p in PROMPTS}

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_stream(client, PROMPTS[i % len(PROMPTS)], 10) for i in range(64)))

    results = asyncio.run(main())
    for i, events in enumerate(results):
        prompt = PROMPTS[i % len(PROMPTS)]
        assert all("error" not in e for e in events), events
        assert [e["token"]["id"] for e in events] == expected[prompt]
        assert events[-1]["details"]["generated_tokens"] == len(expected[prompt])


def test_disconnect_mid_stream_frees_its_request(stack):
    async def main():
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=120) as client:
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 400}}

            async def abandon():
                async with client.stream("POST", "/generate_stream", json=body) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            seen += 1
                            if seen == 3:
                                return  # leaving the block closes the connection

            others = [asyncio.create_task(_stream(client, p, 8)) for p in PROMPTS]
            await asyncio.gather(*(abandon() for _ in range(3)))
            return await asyncio.gather(*others)

    decodes = 'tgi_batch_inference_count{method="decode"}'
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        before = http.get("/metrics").text
        results = asyncio.run(main())
        assert all(events[-1]["details"]["generated_tokens"] >= 1 for events in results)
        # the abandoned requests leave the batch within a few scheduler steps, their KV blocks freed
        deadline = time.monotonic() + 10
        while True:
            text = http.get("/metrics").text
            if all(
                metric(text, name) == 0
                for name in ("tgi_batch_current_size", "tgi_queue_size", "tgi_batch_current_max_tokens")
            ):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        dropped = 'tgi_request_failure{err="dropped"}'
        assert metric(text, dropped) - (metric(before, dropped) if dropped in before else 0) == 3
        # running 400 tokens to the end would need ~400 decode steps: they were cancelled, not finished
        assert metric(text, decodes) - metric(before, decodes) < 100
        r = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text


def test_preemption_with_a_small_kv_cache(tiny_internlm2_dir, tmp_path, engine, tokenizer):
    args = [
        "--max-batch-total-tokens",
        "192",
        "--max-input-tokens",
        "32",
        "--max-total-tokens",
        "96",
        "--max-batch-prefill-tokens",
        "96",
    ]
    with start_stack(tiny_internlm2_dir, tmp_path, router_args=args, grpc=False) as small:
        expected = {p: reference(engine, tokenizer.encode(p), 48) for p in PROMPTS}

        async def main():
            async with httpx.AsyncClient(base_url=small.http_url, timeout=120) as client:
                return await asyncio.gather(
                    *(_stream(client, PROMPTS[i % len(PROMPTS)], 48) for i in range(8))
                )

        results = asyncio.run(main())
        for i, events in enumerate(results):
            prompt = PROMPTS[i % len(PROMPTS)]
            assert all("error" not in e for e in events), (events, small.router_log()[-3000:])
            assert [e["token"]["id"] for e in events] == expected[prompt]
        text = httpx.get(f"{small.http_url}/metrics").text
        assert metric(text, "tgi_request_preempted") > 0  # the small cache did force preemption
