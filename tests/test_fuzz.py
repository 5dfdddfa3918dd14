"""Fuzzing: schemathesis over every route of our OpenAPI document on a real stack (loopback only), and
hypothesis over the sampling parameters at the engine level.

Bounded: a few dozen examples per route, derandomized (the same examples every run), no example database.
"""

from __future__ import annotations


import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from helpers import new_request
from router_stack import start_stack
from text_generation_server.models.types import SamplingParameters

FUZZ = settings(
    max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def stack(tiny_internlm2_dir, tmp_path_factory):
    # small limits: a fuzzed max_new_tokens cannot make one example run for long
    args = ["--max-total-tokens", "96", "--max-input-tokens", "64", "--max-batch-prefill-tokens", "256"]
    with start_stack(tiny_internlm2_dir, tmp_path_factory.mktemp("fuzz"), router_args=args, grpc=False) as running:
        yield running


def check_response(case, response) -> None:
    """No 500; every error in TGI's shape (401 answers with an empty body, as TGI's)."""
    where = (case.method, case.path, case.query, case.body, response.status_code, response.text[:300])
    assert response.status_code < 500, where
    if response.status_code >= 400 and response.status_code != 401:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), where
        assert isinstance(body.get("error_type"), str), where


def test_no_route_answers_500_and_every_error_has_tgi_shape(stack):
    """Every operation of /api-doc/openapi.json, with valid and with invalid inputs (schemathesis' positive and
    negative generation), called on the real server."""
    schema = schemathesis.openapi.from_url(f"{stack.http_url}/api-doc/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"}
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                response = case.call(base_url=stack.http_url, timeout=60)
                statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
                check_response(case, response)

            try:
                call()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.path  # nothing of it can be made invalid
    for route in ("POST /generate", "POST /v1/chat/completions", "POST /v1/completions"):
        assert 200 in statuses[route] and 422 in statuses[route], (route, statuses[route])  # both sides were reached


def test_the_server_serves_after_the_fuzzing(stack):
    r = httpx.post(f"{stack.http_url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}}, timeout=30)
    assert r.status_code == 200 and r.json()["generated_text"]
    assert httpx.get(f"{stack.http_url}/health", timeout=30).status_code == 200


# ---------------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine(tiny_internlm2_dir):
    from text_generation_server.models import get_model

    model = get_model(tiny_internlm2_dir, dtype="float32", device="cpu")
    model.allocate_kv_cache(64, 16)
    return model


finite = st.floats(allow_nan=False, allow_infinity=False)
SAMPLING = st.builds(
    SamplingParameters,
    temperature=st.one_of(st.just(1.0), st.floats(0.01, 10.0), finite, st.just(float("nan"))),
    top_k=st.integers(-2, 2000),
    top_p=st.one_of(st.just(1.0), st.floats(0.0, 1.5)),
    typical_p=st.one_of(st.just(1.0), st.floats(0.0, 1.5)),
    do_sample=st.booleans(),
    seed=st.integers(-1, 2**64),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(0.0, 5.0), finite),
    frequency_penalty=st.one_of(st.just(0.0), finite),
    presence_penalty=st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
    output_frequency_penalty=st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
    logit_bias=st.lists(st.tuples(st.integers(-1, 1001), st.floats(-100, 100)), max_size=3, unique_by=lambda t: t[0]).map(tuple),
)


@FUZZ
@given(params=SAMPLING, prompt=st.lists(st.integers(0, 999), min_size=1, max_size=12))
def test_sampling_parameters_never_raise_anything_but_a_validation_error(engine, params, prompt):
    """Whatever the parameters, the engine either refuses them with a ValueError naming the value, or runs;
    a seeded run is reproducible."""
    from text_generation_server.models.local import generate

    request = new_request(prompt, 4, parameters=params)
    try:
        first = generate(engine, [request])[0]
    except ValueError as error:
        assert str(error), "a refusal names what is wrong"
        assert not engine.requests, "a refused request leaves nothing held"
        return
    assert len(first.token_ids) == 4 and all(0 <= t < engine.config.vocab_size for t in first.token_ids)
    assert generate(engine, [request])[0].token_ids == first.token_ids  # the same seed, the same tokens
