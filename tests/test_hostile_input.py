"""Hostile input against a real stack (shard process + router): each case gets a clear 4xx in TGI's error shape
(or, for connections that send nothing, is closed after the idle timeout), and the server keeps serving."""

from __future__ import annotations

import json
import socket
import time

import grpc
import httpx
import pytest

from router_stack import start_stack
from text_generation_common.pb import generate_pb2 as shard_pb
from text_generation_common.pb import generate_pb2_grpc as shard_grpc
from text_generation_router.cli import IDLE_CONNECTION_TIMEOUT_S
from text_generation_router.validation import MAX_STOP_SEQUENCE_CHARS


@pytest.fixture(scope="module")
def stack(tiny_internlm2_dir, tmp_path_factory):
    with start_stack(tiny_internlm2_dir, tmp_path_factory.mktemp("hostile"), grpc=False) as running:
        yield running


def still_serves(stack) -> None:
    r = httpx.post(f"{stack.http_url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=30)
    assert r.status_code == 200 and r.json()["generated_text"], r.text


def tgi_error(response: httpx.Response, status: int, needle: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and needle in body["error"], body


@pytest.mark.parametrize(
    "body,needle",
    [
        (b'{"inputs": "\xff\xfe", "parameters": {}}', "not valid UTF-8"),
        (b"[" * 50_000 + b"]" * 50_000, "nests too deeply"),
        (b'{"inputs": "a", "parameters": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_001, "nests too deeply"),
        (b'{"inputs": "a", ', "Failed to parse the request body as JSON"),
    ],
    ids=["invalid-utf8", "deep-array", "deep-object", "truncated"],
)
def test_bodies_that_do_not_parse_get_tgi_errors(stack, body, needle):
    for route in ("/generate", "/v1/chat/completions", "/v1/completions", "/tokenize"):
        response = httpx.post(f"{stack.http_url}{route}", content=body, headers={"content-type": "application/json"})
        tgi_error(response, 400, needle)
    still_serves(stack)


def test_framework_errors_keep_tgi_shape(stack):
    tgi_error(httpx.get(f"{stack.http_url}/no-such-route"), 404, "Not Found")
    tgi_error(httpx.put(f"{stack.http_url}/generate"), 405, "Method Not Allowed")


def test_a_megabyte_of_stop_sequences_is_refused(stack):
    huge = {"inputs": "Hello", "parameters": {"stop": ["x" * 1_000_000]}}
    tgi_error(httpx.post(f"{stack.http_url}/generate", json=huge, timeout=30), 422, f"at most {MAX_STOP_SEQUENCE_CHARS}")
    many = {"prompt": "Hello", "stop": ["ab"] * 2000}
    tgi_error(httpx.post(f"{stack.http_url}/v1/completions", json=many, timeout=30), 422, "`stop`")
    still_serves(stack)


def test_length_limits_at_and_past_their_edge(stack):
    info = httpx.get(f"{stack.http_url}/info").json()
    max_input, max_total = info["max_input_tokens"], info["max_total_tokens"]
    prompt = "hello " * (max_input + 50)  # longer than max_input_tokens: truncation keeps the last ones
    n_prompt = len(httpx.post(f"{stack.http_url}/tokenize", json={"inputs": "Hi"}).json())
    edge = {"inputs": "Hi", "parameters": {"max_new_tokens": max_total - n_prompt, "stop": ["."]}}
    assert httpx.post(f"{stack.http_url}/generate", json=edge, timeout=120).status_code == 200
    edge["parameters"]["max_new_tokens"] += 1
    tgi_error(httpx.post(f"{stack.http_url}/generate", json=edge), 422, "`max_new_tokens`")
    at = {"inputs": prompt, "parameters": {"truncate": max_input, "max_new_tokens": 1}}
    r = httpx.post(f"{stack.http_url}/generate", json={**at, "parameters": {**at["parameters"], "details": True, "decoder_input_details": True}})
    assert r.status_code == 200 and len(r.json()["details"]["prefill"]) == max_input, r.text
    tgi_error(httpx.post(f"{stack.http_url}/generate", json={**at, "parameters": {"truncate": max_input + 1}}), 422, "`truncate`")
    tgi_error(httpx.post(f"{stack.http_url}/generate", json={"inputs": prompt}), 422, "`inputs` must have less than")
    for bad in (0, -1, 2**64):
        tgi_error(httpx.post(f"{stack.http_url}/generate", json={"inputs": "a", "parameters": {"max_new_tokens": bad}}), 422, "max_new_tokens")
    still_serves(stack)


def test_token_ids_outside_the_vocabulary_sent_to_a_shard(stack, tiny_internlm2_dir):
    vocab = json.loads((tiny_internlm2_dir / "config.json").read_text())["vocab_size"]
    with grpc.insecure_channel(f"unix://{stack.uds_path}-0") as channel:
        shard = shard_grpc.TextGenerationServiceStub(channel)
        for bad in (vocab, vocab + 1, 2**32 - 1):
            new = shard_pb.NewRequest(
                token_ids=[1, 5, bad], prompt_length=3,
                stopping_parameters=shard_pb.StoppingCriteriaParameters(max_new_tokens=1),
            )
            step = shard_pb.StepRequest(requests=[shard_pb.ScheduledRequest(id=10**9, new_request=new, num_tokens=3, new_blocks=[0])])
            with pytest.raises(grpc.RpcError) as refused:
                shard.Step(step, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"token id {bad} is outside the vocabulary" in refused.value.details()
    still_serves(stack)


def test_connections_that_send_nothing_are_closed_and_others_are_served(stack):
    host, port = stack.http_url.removeprefix("http://").split(":")
    idle = []
    for _ in range(1000):
        connection = socket.create_connection((host, int(port)), timeout=10)
        idle.append(connection)
    try:
        started = time.monotonic()
        still_serves(stack)
        assert time.monotonic() - started < 5
        time.sleep(IDLE_CONNECTION_TIMEOUT_S + 2)
        closed = 0
        for connection in idle:
            connection.settimeout(5)
            try:
                closed += connection.recv(1) == b""  # the server closed it
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass  # still open
        assert closed == len(idle), f"{len(idle) - closed} idle connections still open"
    finally:
        for connection in idle:
            connection.close()
    still_serves(stack)
