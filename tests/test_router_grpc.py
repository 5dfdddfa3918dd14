"""The public gRPC API (TGIS's fmaas.GenerationService + grpc.health.v1) over a real socket.

Two levels:
* the API alone: `serve_grpc` over a deterministic fake `Infer`, the real tokenizer and the real Validation,
  on an event loop in a background thread; a synchronous client from the stubs generated from
  proto/generation.proto;
* end to end: a whole stack (shard + router processes, tests/router_stack.py), whose greedy tokens must be
  the in-process engine's.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from fake_infer import FakeInfer, fake_state
from text_generation_router.types import (
    RouterLimits,
    RouterState,
    Token,
)
from text_generation_common.pb import generation_pb2 as pb
from text_generation_common.pb import generation_pb2_grpc as pb_grpc
from text_generation_common.tokenizer import Tokenizer

LIMITS = RouterLimits(
    max_concurrent_requests=8, max_input_tokens=64, max_total_tokens=96, max_stop_sequences=4
)
PROMPTS = ["Hello world, how are you?", "The quick brown fox"]


# ----- a deterministic Infer ---------------------------------------------------------------------------------


def fake_ids(input_ids, count: int) -> list[int]:
    return [10 + (sum(input_ids) * 31 + i * 17) % 900 for i in range(count)]


class GrpcFakeInfer(FakeInfer):
    """Generates fake_ids(prompt) (the tokenizer's ordinary ids); the chosen token ranks second among its top
    tokens; prompt tokens come with logprob -2."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer, eos_ids=(2,), max_concurrent=8)

    def token_ids(self, request) -> list[int]:
        return fake_ids(request.input_ids, request.max_new_tokens)

    def details(self, request, index: int, token_id: int) -> dict:
        top = ()
        if request.top_n_tokens:
            others = [Token(id=5 + j, text="x", logprob=-0.5 - j) for j in range(request.top_n_tokens)]
            chosen = Token(token_id, self.tokenizer.decode([token_id]), -1.0)
            top = tuple(sorted([*others[:1], chosen, *others[1:]], key=lambda t: -t.logprob))[: request.top_n_tokens]
        prefill = None
        if index == 0 and request.prefill_logprobs:
            prefill = tuple(
                Token(id=t, text="", logprob=None if j == 0 else -2.0) for j, t in enumerate(request.input_ids)
            )
        return {"logprob": -1.0, "top_tokens": top, "prefill": prefill}


class Server:
    """serve_grpc on its own event loop in a thread."""

    def __init__(self, state: RouterState):
        from text_generation_router.grpc_api import serve_grpc

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(serve_grpc(state, "127.0.0.1", 0))
        self.port = self.server.bound_port

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    return Tokenizer.from_pretrained(tiny_internlm2_dir)


@pytest.fixture(scope="module")
def api(tokenizer):
    infer = GrpcFakeInfer(tokenizer)
    state = fake_state(infer, LIMITS)
    server = Server(state)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.GenerationServiceStub(channel), infer, channel
    channel.close()
    server.close()


@pytest.fixture
def stub(api):
    client, infer, _ = api
    infer.delay, infer.max_concurrent, infer.fail_at = 0.0, 8, None
    return client


def generated_text(tokenizer, prompt_ids, ids, complete: bool = True) -> str:
    """What `ids` add to the text after the prompt, by the router's rule, computed without TextStream: the
    ordinary ids decoded after the prompt's last 5 tokens (for their leading spaces), special ids skipped.
    complete=False: a request cut short (time limit) has not sent a trailing incomplete UTF-8 character."""
    context = list(prompt_ids[-5:])
    ordinary = [i for i in ids if i not in tokenizer.special_token_ids]
    text = tokenizer.decode(context + ordinary)[len(tokenizer.decode(context)) :]
    return text if complete else text.rstrip("\ufffd")


def expected_text(tokenizer, prompt: str, count: int, complete: bool = True) -> str:
    prompt_ids = tokenizer.encode(prompt)
    return generated_text(tokenizer, prompt_ids, fake_ids(prompt_ids, count), complete)


def params(**kwargs) -> pb.Parameters:
    return pb.Parameters(**kwargs)


# ----- the API over a fake Infer ------------------------------------------------------------------------------


def test_generate_batch_of_two(stub, tokenizer):
    response = stub.Generate(
        pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text=p) for p in PROMPTS],
            params=params(stopping=pb.StoppingCriteria(max_new_tokens=5)),
        ),
        timeout=10,
    )
    assert len(response.responses) == 2
    for prompt, r in zip(PROMPTS, response.responses):
        assert r.input_token_count == len(tokenizer.encode(prompt))
        assert r.generated_token_count == 5
        assert r.stop_reason == pb.MAX_TOKENS
        assert r.text == expected_text(tokenizer, prompt, 5)
        assert r.seed == 0 and not r.tokens and not r.input_tokens


def test_generate_defaults_and_token_details(stub, api, tokenizer):
    _, infer, _ = api
    response = stub.Generate(
        pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text=PROMPTS[0])],
            params=params(
                response=pb.ResponseOptions(
                    input_text=True,
                    generated_tokens=True,
                    input_tokens=True,
                    token_logprobs=True,
                    token_ranks=True,
                    top_n_tokens=2,
                )
            ),
        ),
        timeout=10,
    ).responses[0]
    request = infer.requests[-1]
    assert request.max_new_tokens == 20  # TGIS's default
    # ranks come from the top tokens: the shard is asked for the most it may send
    assert request.prefill_logprobs and request.top_n_tokens == LIMITS.max_top_n_tokens and request.token_logprobs
    ids = fake_ids(tokenizer.encode(PROMPTS[0]), 20)
    assert response.text == PROMPTS[0] + expected_text(tokenizer, PROMPTS[0], 20)
    assert [t.text for t in response.tokens] == [tokenizer.id_to_token(i) for i in ids]
    assert all(t.logprob == -1.0 and t.rank == 2 and len(t.top_tokens) == 2 for t in response.tokens)
    assert response.tokens[0].top_tokens[1].text == response.tokens[0].text
    prompt_ids = tokenizer.encode(PROMPTS[0])
    assert [t.text for t in response.input_tokens] == [tokenizer.id_to_token(i) for i in prompt_ids]
    assert response.input_tokens[0].logprob == 0.0 and response.input_tokens[1].logprob == -2.0


def test_generate_stream(stub, tokenizer):
    messages = list(
        stub.GenerateStream(
            pb.SingleGenerationRequest(
                request=pb.GenerationRequest(text=PROMPTS[1]),
                params=params(
                    stopping=pb.StoppingCriteria(max_new_tokens=6),
                    response=pb.ResponseOptions(generated_tokens=True, input_text=True),
                ),
            ),
            timeout=10,
        )
    )
    first, rest = messages[0], messages[1:]
    assert first.input_token_count == len(tokenizer.encode(PROMPTS[1])) and first.text == PROMPTS[1]
    assert first.generated_token_count == 0 and not first.tokens
    assert len(rest) == 6  # one per token, the stop reason riding on the last
    assert [m.generated_token_count for m in rest] == list(range(1, 7))
    assert all(m.stop_reason == pb.NOT_FINISHED for m in rest[:-1]) and rest[-1].stop_reason == pb.MAX_TOKENS
    assert "".join(m.text for m in rest) == expected_text(tokenizer, PROMPTS[1], 6)
    ids = fake_ids(tokenizer.encode(PROMPTS[1]), 6)
    assert [t.text for m in rest for t in m.tokens] == [tokenizer.id_to_token(i) for i in ids]


def test_stop_sequences_truncation_and_sampling(stub, api, tokenizer):
    full = expected_text(tokenizer, PROMPTS[0], 8)
    stop = full.strip()[4:7]
    assert stop and stop in full
    head = full[: full.index(stop)]
    request = pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=PROMPTS[0])],
        params=params(stopping=pb.StoppingCriteria(max_new_tokens=8, stop_sequences=[stop, "zzzz"])),
    )
    kept = stub.Generate(request, timeout=10).responses[0]
    assert (
        kept.stop_reason == pb.STOP_SEQUENCE
        and kept.stop_sequence == stop
        and kept.text.startswith(head + stop)
    )
    request.params.stopping.include_stop_sequence = False
    assert stub.Generate(request, timeout=10).responses[0].text == head
    streamed = list(
        stub.GenerateStream(pb.SingleGenerationRequest(request=request.requests[0], params=request.params))
    )
    assert "".join(m.text for m in streamed) == head and streamed[-1].stop_reason == pb.STOP_SEQUENCE

    # truncate_input_tokens keeps the prompt's last tokens; sampling returns the seed used
    sampled = stub.Generate(
        pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text=PROMPTS[0])],
            params=params(
                method=pb.SAMPLE,
                sampling=pb.SamplingParameters(temperature=0.7, top_k=5, top_p=0.9, seed=1234),
                truncate_input_tokens=3,
                stopping=pb.StoppingCriteria(max_new_tokens=2),
            ),
        ),
        timeout=10,
    ).responses[0]
    sent = api[1].requests[-1]
    assert sampled.input_token_count == 3 and sent.input_ids == tuple(tokenizer.encode(PROMPTS[0])[-3:])
    assert sampled.seed == 1234 and sent.parameters.do_sample and sent.parameters.top_k == 5
    assert sent.parameters.temperature == pytest.approx(0.7)
    assert not sent.token_logprobs  # not asked for in its response options

    # a max_new_tokens past the sequence limit is cut to fit: TOKEN_LIMIT
    limited = stub.Generate(
        pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text=PROMPTS[0])],
            params=params(stopping=pb.StoppingCriteria(max_new_tokens=LIMITS.max_total_tokens - 1)),
        ),
        timeout=10,
    ).responses[0]
    assert limited.stop_reason == pb.TOKEN_LIMIT
    assert limited.input_token_count + limited.generated_token_count == LIMITS.max_total_tokens


def test_tokenize_and_model_info(stub, tokenizer):
    text = "Hello world, how are you?"
    response = stub.Tokenize(
        pb.BatchedTokenizeRequest(
            requests=[pb.TokenizeRequest(text=text), pb.TokenizeRequest(text="fox")],
            return_tokens=True,
            return_offsets=True,
        ),
        timeout=10,
    )
    ids = tokenizer.encode(text)
    first = response.responses[0]
    assert first.token_count == len(ids) == len(first.tokens) == len(first.offsets)
    assert list(first.tokens) == [tokenizer.id_to_token(i) for i in ids]
    spans = [(o.start, o.end) for o in first.offsets]
    assert all(0 <= s <= e <= len(text) for s, e in spans)
    assert "".join(text[s:e] for s, e in spans).replace(" ", "") == text.replace(" ", "")
    assert response.responses[1].token_count == len(tokenizer.encode("fox"))

    truncated = stub.Tokenize(
        pb.BatchedTokenizeRequest(
            requests=[pb.TokenizeRequest(text=text)], return_tokens=True, truncate_input_tokens=2
        )
    ).responses[0]
    assert truncated.token_count == 2 and list(truncated.tokens) == list(first.tokens[-2:])

    info = stub.ModelInfo(pb.ModelInfoRequest(model_id="tiny"), timeout=10)
    assert info.model_kind == pb.ModelInfoResponse.DECODER_ONLY
    assert (
        info.max_sequence_length == LIMITS.max_total_tokens
        and info.max_new_tokens == LIMITS.max_total_tokens - 1
    )


def test_health(api):
    _, _, channel = api
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "fmaas.GenerationService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == 1  # SERVING
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "bad, message",
    [
        (params(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_p=1.5)), "top_p"),
        (params(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.01)), "temperature"),
        (params(stopping=pb.StoppingCriteria(min_new_tokens=3, max_new_tokens=5)), "min_new_tokens"),
        (params(stopping=pb.StoppingCriteria(max_new_tokens=10_000)), "max_new_tokens"),
        (params(response=pb.ResponseOptions(token_logprobs=True)), "generated_tokens"),
        (params(decoding=pb.DecodingParameters(regex="a((")), "guided decoding (regex) is not valid"),
        (params(decoding=pb.DecodingParameters(json_schema="{\"type\": 3}")), "guided decoding (json_schema)"),
        (params(stopping=pb.StoppingCriteria(stop_sequences=["a", "b", "c", "d", "e"])), "stop"),
        (params(response=pb.ResponseOptions(generated_tokens=True, top_n_tokens=50)), "top_n_tokens"),
    ],
)
def test_invalid_arguments_and_the_server_keeps_serving(stub, tokenizer, bad, message):
    request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=PROMPTS[0])], params=bad)
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        list(
            stub.GenerateStream(
                pb.SingleGenerationRequest(request=request.requests[0], params=bad), timeout=10
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = stub.Generate(
        pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=PROMPTS[0])], params=params()),
        timeout=10,
    )
    assert ok.responses[0].text == expected_text(tokenizer, PROMPTS[0], 20)


def test_empty_prompt_and_adapters_are_invalid(stub):
    for request in (
        pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="")]),
        pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="hi")], adapter_id="lora"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Generate(pb.BatchedGenerationRequest(), timeout=10).responses == []


def test_overloaded_and_generation_errors(stub, api):
    _, infer, _ = api
    infer.max_concurrent = 1  # the batch's second request finds no slot: the first is closed again
    batch = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=p) for p in PROMPTS])
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(batch, timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    infer.max_concurrent = 0
    with pytest.raises(grpc.RpcError) as error:
        list(stub.GenerateStream(pb.SingleGenerationRequest(request=batch.requests[0]), timeout=10))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    infer.max_concurrent, infer.fail_at = 8, 2
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(batch, timeout=10)
    assert error.value.code() == grpc.StatusCode.INTERNAL and "the shard failed" in error.value.details()
    received = []
    with pytest.raises(grpc.RpcError) as error:
        received.extend(
            stub.GenerateStream(pb.SingleGenerationRequest(request=batch.requests[0]), timeout=10)
        )
    assert error.value.code() == grpc.StatusCode.INTERNAL and len(received) == 3  # head + 2 tokens
    _wait_until(lambda: infer.active == 0)


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_time_limit_and_cancellation(stub, api, tokenizer):
    _, infer, _ = api
    infer.delay = 0.05
    start = time.monotonic()
    response = stub.Generate(
        pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text=p) for p in PROMPTS],
            params=params(stopping=pb.StoppingCriteria(max_new_tokens=60, time_limit_millis=300)),
        ),
        timeout=10,
    )
    assert time.monotonic() - start < 2.0
    for prompt, r in zip(PROMPTS, response.responses):
        assert r.stop_reason == pb.TIME_LIMIT and 0 < r.generated_token_count < 60
        # the text of a time limit is the received tokens' texts joined
        assert r.text == expected_text(tokenizer, prompt, r.generated_token_count, complete=False)
    _wait_until(lambda: infer.active == 0)

    cancelled = infer.cancelled
    stream = stub.GenerateStream(
        pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text=PROMPTS[0]),
            params=params(stopping=pb.StoppingCriteria(max_new_tokens=60)),
        ),
        timeout=10,
    )
    assert next(stream).input_token_count > 0
    next(stream)
    stream.cancel()  # the client goes away: the request's Infer iterator is closed
    _wait_until(lambda: infer.cancelled == cancelled + 1 and infer.active == 0)

    streamed = list(
        stub.GenerateStream(
            pb.SingleGenerationRequest(
                request=pb.GenerationRequest(text=PROMPTS[0]),
                params=params(stopping=pb.StoppingCriteria(max_new_tokens=60, time_limit_millis=200)),
            ),
            timeout=10,
        )
    )
    assert streamed[-1].stop_reason == pb.TIME_LIMIT and 0 < streamed[-1].generated_token_count < 60
    _wait_until(lambda: infer.active == 0)


# ----- end to end: shard + router processes ----------------------------------------------------------------

E2E_PROMPTS = ["Hello world, how are you?", "The quick brown fox jumps"]
E2E_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def stack(tiny_internlm2_dir, tmp_path_factory):
    router_stack = pytest.importorskip("router_stack")
    with router_stack.start_stack(
        tiny_internlm2_dir,
        tmp_path_factory.mktemp("grpc-stack"),
        router_args=["--max-input-tokens", "64", "--max-total-tokens", "128"],
    ) as running:
        yield running


@pytest.fixture(scope="module")
def engine_tokens(tiny_internlm2_dir, tokenizer):
    """Greedy ids of each E2E prompt from the engine in this process (stopping at EOS, as the stack does)."""
    from helpers import new_request
    from text_generation_server.models import get_model
    from text_generation_server.models.local import generate

    model = get_model(tiny_internlm2_dir, dtype="float32", device="cpu")
    model.allocate_kv_cache(64, 16)
    requests = [new_request(tokenizer.encode(p), E2E_NEW_TOKENS, ignore_eos=False) for p in E2E_PROMPTS]
    return [list(r.token_ids) for r in generate(model, requests)]


def test_e2e_greedy_generate_matches_the_engine(stack, engine_tokens, tokenizer):
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        response = stub.Generate(
            pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text=p) for p in E2E_PROMPTS],
                params=params(
                    stopping=pb.StoppingCriteria(max_new_tokens=E2E_NEW_TOKENS),
                    response=pb.ResponseOptions(generated_tokens=True, token_logprobs=True),
                ),
            ),
            timeout=60,
        )
        for prompt, ids, r in zip(E2E_PROMPTS, engine_tokens, response.responses):
            assert [t.text for t in r.tokens] == [tokenizer.id_to_token(i) for i in ids], stack.logs()
            assert r.text == generated_text(tokenizer, tokenizer.encode(prompt), ids)
            assert r.generated_token_count == len(ids) and r.input_token_count == len(
                tokenizer.encode(prompt)
            )
            assert r.stop_reason == (pb.MAX_TOKENS if len(ids) == E2E_NEW_TOKENS else pb.EOS_TOKEN)
            assert all(t.logprob < 0 for t in r.tokens)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_e2e_generate_stream_streams_the_same_tokens(stack, engine_tokens, tokenizer):
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        messages = list(
            stub.GenerateStream(
                pb.SingleGenerationRequest(
                    request=pb.GenerationRequest(text=E2E_PROMPTS[0]),
                    params=params(
                        stopping=pb.StoppingCriteria(max_new_tokens=E2E_NEW_TOKENS),
                        response=pb.ResponseOptions(generated_tokens=True),
                    ),
                ),
                timeout=60,
            )
        )
    ids = engine_tokens[0]
    assert messages[0].input_token_count == len(tokenizer.encode(E2E_PROMPTS[0])) and not messages[0].tokens
    assert [t.text for m in messages[1:] for t in m.tokens] == [tokenizer.id_to_token(i) for i in ids]
    expected = generated_text(tokenizer, tokenizer.encode(E2E_PROMPTS[0]), ids)
    assert "".join(m.text for m in messages[1:]) == expected
    assert messages[-1].generated_token_count == len(ids) and messages[-1].stop_reason != pb.NOT_FINISHED
    assert all(m.stop_reason == pb.NOT_FINISHED for m in messages[:-1])
