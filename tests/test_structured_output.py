"""Constrained decoding: the grammar's vocabulary, the shard's masks, and structured output on every API.

The model has random weights, so what makes its output parse and validate is the constraint alone. Schemas are
bounded (enums, maxLength, maxItems, no extra properties) so a random model reaches their end within
max_tokens; the engine-level tests also check that a constraint changes nothing for the other rows of a step.
"""

from __future__ import annotations

import json
import re
import threading

import grpc
import httpx
import jsonschema
import openai
import pytest
import torch
from text_generation import Client
from text_generation.types import Grammar, GrammarType

from helpers import new_request
from router_stack import start_stack
from text_generation_common.grammar import (
    GrammarCompiler,
    GrammarError,
    grammar_from_json_schema,
    grammar_from_regex,
)
from text_generation_common.pb import generation_pb2 as tgis
from text_generation_common.pb import generation_pb2_grpc as tgis_grpc
from text_generation_common.tokenizer import Tokenizer
from text_generation_server.models.types import NewRequest, SamplingParameters
from text_generation_server.utils.constraint import GrammarConstraint, allowed_tokens

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # text_generation uses .dict()

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "location": {
            "type": "object",
            "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90}, "north": {"type": "boolean"}},
            "required": ["lat", "north"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["old", "big", "cold"]}, "maxItems": 3},
    },
    "required": ["city", "location", "tags"],
    "additionalProperties": False,
}
LIST_OF_ITEMS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}},
                "required": ["id"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "nested": NESTED, "list_of_items": LIST_OF_ITEMS}


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    return Tokenizer.from_pretrained(tiny_internlm2_dir)


@pytest.fixture(scope="module")
def engine(tiny_internlm2_dir):
    from text_generation_server.models import get_model

    model = get_model(tiny_internlm2_dir, dtype="float32", device="cpu")
    model.allocate_kv_cache(128, 16)
    return model


@pytest.fixture(scope="module")
def stack(tiny_internlm2_dir, tmp_path_factory):
    with start_stack(tiny_internlm2_dir, tmp_path_factory.mktemp("structured")) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="-", timeout=60)


# ------------------------------------------------------------------------------- the grammar's vocabulary


def test_token_bytes_spell_the_decoded_text_and_mark_special_tokens(tokenizer):
    pieces = tokenizer.token_bytes()
    assert len(pieces) == tokenizer.vocab_size
    text = "Hello world, 世界! tabs\tand\nlines"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(pieces[i] for i in ids).decode("utf-8") == tokenizer.decode(ids)
    for name in ("<|action_start|>", "<|im_end|>", "</s>"):
        assert pieces[tokenizer.token_to_id(name)] == b"\xff" + name.encode()
    # besides them, only the byte piece <0xFF> starts with 0xFF (no UTF-8 text holds that byte)
    marked = [i for i, p in enumerate(pieces) if p.startswith(b"\xff") and i not in tokenizer.special_token_ids]
    assert [pieces[i] for i in marked] == [b"\xff"]


def test_masks_are_the_matchers_bitmasks_and_failed_matchers_allow_only_eos(tokenizer):
    compiler = GrammarCompiler(tokenizer, [2])
    grammar = grammar_from_json_schema(PERSON)
    matchers = [compiler.matcher(grammar), compiler.matcher(grammar_from_regex("[0-9]{2}"))]
    assert matchers[1].consume_tokens(tokenizer.encode("4", add_special_tokens=False))
    constraints = [GrammarConstraint(m, [2]) for m in matchers]
    allowed = allowed_tokens(constraints, tokenizer.vocab_size)
    for row, matcher in enumerate(matchers):
        bits = matcher.compute_bitmask()  # little-endian bits: id i is bit i % 8 of byte i // 8
        expected = [bool(bits[i // 8] >> (i % 8) & 1) for i in range(tokenizer.vocab_size)]
        assert allowed[row].tolist() == expected
    digits = {tokenizer.decode([i]).strip() for i in allowed[1].nonzero().flatten().tolist()}
    assert digits and all(d.isdigit() for d in digits)

    broken = GrammarConstraint(compiler.matcher(grammar_from_regex("ab")), [2, 998])
    broken.advance(tokenizer.token_to_id("<|im_start|>"))  # not allowed: the matcher fails, once and for all
    assert broken.failed
    assert allowed_tokens([broken], tokenizer.vocab_size)[0].nonzero().flatten().tolist() == [2, 998]


def test_compiled_grammars_are_cached_and_bad_ones_named(tokenizer):
    compiler = GrammarCompiler(tokenizer, [2], capacity=2)
    grammar = grammar_from_json_schema(PERSON)
    first, second = compiler.matcher(grammar), compiler.matcher(grammar)
    assert first is not second and len(compiler._compiled) == 1  # one compilation, two fresh copies
    assert first.consume_tokens(tokenizer.encode('{"name', add_special_tokens=False))
    assert not second.is_error() and second.compute_bitmask() != first.compute_bitmask()
    with pytest.raises(GrammarError, match="unclosed group"):
        compiler.check(grammar_from_regex("a(("))
    with pytest.raises(GrammarError, match="properties"):
        compiler.check(grammar_from_json_schema({"type": "object", "properties": 3}))
    compiler.check(grammar_from_regex("b+"))
    compiler.check(grammar_from_regex("c+"))
    assert len(compiler._compiled) == 2 and grammar not in compiler._compiled  # the least recently used went
    with pytest.raises(GrammarError, match="not valid JSON"):
        grammar_from_json_schema("{")


# ------------------------------------------------------------------------------------------- the engine


def test_constrained_rows_validate_and_leave_their_neighbours_unchanged(engine, tokenizer):
    from text_generation_server.models.local import generate

    grammar = grammar_from_json_schema(NESTED)
    prompts = [tokenizer.encode(p) for p in ("Where is it?", "Describe a city.", "Hello there")]
    plain = [new_request(p, 12) for p in prompts]
    alone = [r.token_ids for r in generate(engine, plain)]
    constrained = [
        new_request(prompts[0], 80, ignore_eos=False, grammar=grammar),
        new_request(prompts[1], 80, ignore_eos=False, grammar=grammar,
                    parameters=SamplingParameters(do_sample=True, seed=5, temperature=1.5)),
    ]
    results = generate(engine, [*plain, *constrained], chunk_size=3)
    assert [r.token_ids for r in results[:3]] == alone
    for result in results[3:]:
        assert result.token_ids[-1] in engine.eos_token_ids, tokenizer.decode(result.token_ids)
        jsonschema.validate(json.loads(tokenizer.decode(result.token_ids[:-1])), NESTED)


def test_a_recomputed_constrained_request_continues_where_it_was(engine, tokenizer):
    """After a preemption the shard gets the prompt and the generated tokens: the matcher consumes those."""
    from text_generation_server.models.local import generate

    grammar = grammar_from_json_schema(PERSON)
    prompt = tokenizer.encode("A person:")
    params = SamplingParameters(do_sample=True, seed=9)
    full = generate(engine, [new_request(prompt, 60, ignore_eos=False, grammar=grammar, parameters=params)])[0]
    resumed = NewRequest(
        token_ids=tuple(prompt + full.token_ids[:6]), prompt_length=len(prompt), parameters=params,
        stopping=new_request(prompt, 60, ignore_eos=False).stopping, grammar=grammar,
    )
    assert generate(engine, [resumed])[0].token_ids == full.token_ids[6:]


def test_a_grammar_that_does_not_compile_is_refused_by_the_shard(engine, tokenizer):
    from text_generation_server.models.local import generate

    with pytest.raises(ValueError, match="its grammar does not compile"):
        generate(engine, [new_request(tokenizer.encode("x"), 4, grammar=grammar_from_regex("a(("))])


def test_reported_logprobs_are_those_of_the_masked_distribution(engine, tokenizer):
    from text_generation_server.models.local import generate

    grammar = grammar_from_regex("(yes|no|maybe)")
    result = generate(engine, [new_request(tokenizer.encode("Answer:"), 8, ignore_eos=False, grammar=grammar,
                                           top_n_tokens=20)])[0]
    assert tokenizer.decode(result.token_ids[:-1]) in ("yes", "no", "maybe")
    first = result.top_tokens[0]
    allowed = [(i, v) for i, v in zip(first.ids, first.logprobs) if v > -float("inf")]
    assert allowed and all(any(w.startswith(tokenizer.decode([i])) for w in ("yes", "no", "maybe")) for i, _ in allowed)
    assert 0.99 < sum(torch.tensor([v for _, v in allowed]).exp().tolist()) <= 1.0 + 1e-5  # the few allowed ids


# ----------------------------------------------------------------------------------------- the APIs


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_openai_json_schema_output_validates(client, name):
    schema = SCHEMAS[name]
    reply = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": f"Give me a {name}."}], max_tokens=100, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_openai_json_modes_stream_and_on_completions(client):
    stream = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "A person, please."}], max_tokens=100, temperature=0.8,
        seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)

    completion = client.completions.create(
        model="tgi", prompt="JSON:", max_tokens=60, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": NESTED}}},
    )
    jsonschema.validate(json.loads(completion.choices[0].text), NESTED)
    # json_object: whatever the model writes is a JSON object so far; a finished one parses
    anything = client.completions.create(
        model="tgi", prompt="JSON:", max_tokens=60, temperature=0, extra_body={"response_format": {"type": "json_object"}}
    )
    text = anything.choices[0].text
    assert text.startswith("{")
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_tgi_grammar_json_and_regex_on_generate(stack):
    tgi = Client(stack.http_url, timeout=60)
    json_reply = tgi.generate(
        "Someone:", max_new_tokens=100, grammar=Grammar(type=GrammarType.Json, value=PERSON)
    )
    assert json_reply.details.finish_reason.value == "eos_token"
    jsonschema.validate(json.loads(json_reply.generated_text), PERSON)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    regex_reply = tgi.generate("Code:", max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex, value=pattern))
    assert re.fullmatch(pattern, regex_reply.generated_text), regex_reply.generated_text
    streamed = "".join(
        r.token.text
        for r in tgi.generate_stream("Code:", max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex, value=pattern))
    )
    assert re.fullmatch(pattern, streamed)
    # the schema may also come as its JSON text
    as_text = tgi.generate("Someone:", max_new_tokens=100, grammar=Grammar(type=GrammarType.Json, value=json.dumps(PERSON)))
    assert as_text.generated_text == json_reply.generated_text


def test_tgis_guided_decoding(stack):
    with grpc.insecure_channel(stack.grpc_target) as channel:
        service = tgis_grpc.GenerationServiceStub(channel)

        def generate(decoding: tgis.DecodingParameters) -> str:
            params = tgis.Parameters(decoding=decoding, stopping=tgis.StoppingCriteria(max_new_tokens=100))
            request = tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text="Answer:")], params=params)
            response = service.Generate(request, timeout=60).responses[0]
            assert response.stop_reason == tgis.EOS_TOKEN, response
            return response.text

        jsonschema.validate(json.loads(generate(tgis.DecodingParameters(json_schema=json.dumps(NESTED)))), NESTED)
        assert re.fullmatch(r"id-[0-9]{4}", generate(tgis.DecodingParameters(regex=r"id-[0-9]{4}")))
        choices = ["red", "green", "blue"]
        assert generate(tgis.DecodingParameters(choice=tgis.DecodingParameters.StringChoices(choices=choices))) in choices
        assert re.fullmatch(r"(ab)+", generate(tgis.DecodingParameters(grammar='start: "ab"+')))
        with pytest.raises(grpc.RpcError) as refused:
            generate(tgis.DecodingParameters(regex="a(("))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "guided decoding (regex) is not valid" in refused.value.details()


def test_a_bad_schema_is_a_422_and_the_batch_goes_on(stack):
    """While a request streams, one with a schema that cannot compile is refused; the stream is unaffected."""
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 40, "details": True}}
    streamed: list[str] = []

    def stream():
        with httpx.stream("POST", f"{stack.http_url}/generate_stream", json=body, timeout=60) as response:
            streamed.extend(line for line in response.iter_lines() if line.startswith("data:"))

    alone = httpx.post(f"{stack.http_url}/generate", json=body, timeout=60).json()["generated_text"]
    worker = threading.Thread(target=stream)
    worker.start()
    for grammar, needle in (
        ({"type": "json", "value": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "`grammar` (json)"),
        ({"type": "regex", "value": "(unclosed"}, "`grammar` (regex)"),
    ):
        refused = httpx.post(f"{stack.http_url}/generate", json={"inputs": "x", "parameters": {"grammar": grammar}})
        assert refused.status_code == 422 and needle in refused.json()["error"], refused.text
        assert refused.json()["error_type"] == "validation"
    bad_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": "a"}}}
    refused = httpx.post(
        f"{stack.http_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "response_format": bad_format},
    )
    assert refused.status_code == 422 and "`response_format` (json_schema) is not valid" in refused.json()["error"]
    worker.join(60)
    final = json.loads(streamed[-1].removeprefix("data:"))
    assert final["generated_text"] == alone and final["details"]["finish_reason"] == "length"
