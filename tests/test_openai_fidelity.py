"""OpenAI's meaning of the OpenAI routes' fields, on the real stack (shard process + router) through the
`openai` client: penalties, n, logit_bias, echo, best_of, logprobs and their limits, refusals of what is not
supported, and TGI's meaning kept on /generate. Outputs are checked against the in-process engine given the
same sampling parameters."""

from __future__ import annotations

import httpx
import openai
import pytest

from helpers import metric, new_request
from router_stack import start_stack
from text_generation_common.tokenizer import Tokenizer
from text_generation_server.models.types import SamplingParameters

PROMPT = "The quick brown fox jumps over the lazy dog, and then"
LONG_PROMPT = "Three choices of one prompt share its KV blocks: " + PROMPT * 3  # more than two full blocks


@pytest.fixture(scope="module")
def engine(tiny_internlm2_dir):
    from text_generation_server.models import get_model

    model = get_model(tiny_internlm2_dir, dtype="float32", device="cpu")
    model.allocate_kv_cache(64, 16)
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    return Tokenizer.from_pretrained(tiny_internlm2_dir)


@pytest.fixture(scope="module")
def stack(tiny_internlm2_dir, tmp_path_factory):
    with start_stack(tiny_internlm2_dir, tmp_path_factory.mktemp("openai-fidelity"), grpc=False) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="-", timeout=60)


def engine_tokens(engine, ids: list[int], max_new_tokens: int, params: SamplingParameters) -> list[int]:
    from text_generation_server.models.local import generate

    request = new_request(ids, max_new_tokens, ignore_eos=False, parameters=params)
    return generate(engine, [request])[0].token_ids


def test_presence_penalty_zero_is_no_penalty_and_others_have_openai_meaning(client, engine, tokenizer):
    plain = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=16, temperature=0)
    zero = client.completions.create(
        model="tgi", prompt=PROMPT, max_tokens=16, temperature=0, presence_penalty=0, frequency_penalty=0
    )
    assert zero.choices[0].text == plain.choices[0].text
    ids = tokenizer.encode(PROMPT)
    greedy = engine_tokens(engine, ids, 16, SamplingParameters())
    assert plain.choices[0].text == tokenizer.decode(greedy, skip_special_tokens=True)

    # OpenAI's penalties count the generated tokens; the engine given the same parameters agrees
    for fields, params in (
        (dict(presence_penalty=2.0), SamplingParameters(presence_penalty=2.0)),
        (dict(frequency_penalty=1.5), SamplingParameters(output_frequency_penalty=1.5)),
    ):
        penalized = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=16, temperature=0, **fields)
        expected = engine_tokens(engine, ids, 16, params)
        assert expected != greedy, "the penalty must change this greedy run for the test to mean anything"
        assert penalized.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)

    chat_plain = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0
    )
    chat_zero = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0, presence_penalty=0
    )
    assert chat_zero.choices[0].message.content == chat_plain.choices[0].message.content


def test_n_choices_are_seeded_independently_and_share_the_prompt_blocks(client, stack, engine, tokenizer):
    ids = tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 2 * 16
    metrics_before = httpx.get(f"{stack.http_url}/metrics").text
    done = client.completions.create(model="tgi", prompt=LONG_PROMPT, max_tokens=8, temperature=1.0, seed=11, n=3)
    assert [c.index for c in done.choices] == [0, 1, 2]
    for i, choice in enumerate(done.choices):
        # choice i is the request seeded 11 + i: /generate with that seed says which tokens, the engine agrees
        body = {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 11 + i, "details": True}}
        alone = httpx.post(f"{stack.http_url}/generate", json=body, timeout=60).json()
        assert choice.text == alone["generated_text"]
        expected = engine_tokens(engine, ids, 8, SamplingParameters(do_sample=True, seed=11 + i))
        assert [t["id"] for t in alone["details"]["tokens"]] == expected
    assert len({c.text for c in done.choices}) > 1
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 24
    hits = metric(httpx.get(f"{stack.http_url}/metrics").text, "tgi_prefix_cache_hits")
    # the prompt's first two blocks are computed once and found by the other choices (and the /generate calls)
    assert hits - metric(metrics_before, "tgi_prefix_cache_hits") >= 2 * 2 * 16

    chunks = list(client.completions.create(model="tgi", prompt=LONG_PROMPT, max_tokens=8, temperature=1.0, seed=11, n=3, stream=True))
    for i, choice in enumerate(done.choices):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == choice.text

    messages = [{"role": "user", "content": LONG_PROMPT}]
    chat = client.chat.completions.create(model="tgi", messages=messages, max_tokens=6, seed=5, n=2)
    streamed = list(client.chat.completions.create(model="tgi", messages=messages, max_tokens=6, seed=5, n=2, stream=True))
    assert [c.index for c in chat.choices] == [0, 1]
    for choice in chat.choices:
        text = "".join(c.choices[0].delta.content for c in streamed if c.choices[0].index == choice.index)
        assert text == choice.message.content
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tgi", messages=messages, max_tokens=2, n=5)  # > --max-client-batch-size


def test_logit_bias_echo_best_of_and_logprobs(client, engine, tokenizer):
    target = tokenizer.encode(" fox", add_special_tokens=False)[-1]
    biased = client.completions.create(
        model="tgi", prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(target): 100}
    )
    assert biased.choices[0].text == tokenizer.decode([target] * 5)

    echoed = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=4, temperature=0)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = list(client.completions.create(model="tgi", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text

    with_logprobs = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = with_logprobs.choices[0].logprobs
    assert "".join(lp.tokens) == with_logprobs.choices[0].text
    assert len(lp.token_logprobs) == 6 and all(x <= 0 for x in lp.token_logprobs)
    # a dict by token text (OpenAI's shape): alternatives that print the same text share an entry
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(max(top.values()) == pytest.approx(chosen) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]

    # best_of 3: the candidates are the requests seeded 3, 4, 5 (what n=3 returns); the best mean logprob wins
    best = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, best_of=3, logprobs=0)
    every = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, n=3, logprobs=0)
    assert len(best.choices) == 1 and len({c.text for c in every.choices}) > 1
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices]
    assert best.choices[0].text == every.choices[means.index(max(means))].text
    # without logprobs asked, the candidates' logprobs are still computed to rank them: on a seed whose best
    # candidate is not its first, which is what a ranking without logprobs would return
    for seed in range(4, 20):
        every = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=seed, n=3, logprobs=0)
        means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices]
        winner = every.choices[means.index(max(means))].text
        if winner != every.choices[0].text:
            break
    else:
        pytest.fail("no seed in 4..19 whose best candidate differs from its first")
    unasked = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=seed, best_of=3)
    assert unasked.choices[0].text == winner and unasked.choices[0].logprobs is None

    for bad in (dict(logprobs=6), dict(best_of=1, n=2), dict(echo=True, logprobs=1), dict(logit_bias={"99999": 1})):
        with pytest.raises(openai.UnprocessableEntityError):
            client.completions.create(model="tgi", prompt=PROMPT, max_tokens=2, **bad)
    with pytest.raises(openai.APIError, match="best_of"):  # a stream reports it in its first event
        list(client.completions.create(model="tgi", prompt=PROMPT, max_tokens=2, best_of=2, stream=True))


def test_ignore_eos_generates_max_tokens_past_the_eos_token(client, tokenizer):
    eos = {str(tokenizer.eos_token_id): 100}  # EOS at every step
    stopped = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=eos)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    kept = client.completions.create(
        model="tgi", prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=eos, extra_body={"ignore_eos": True}
    )
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 6


def test_top_logprobs_up_to_openai_limit_and_generate_keeps_tgi_limit(client, stack):
    messages = [{"role": "user", "content": PROMPT}]
    done = client.chat.completions.create(
        model="tgi", messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=20
    )
    assert all(len(entry.top_logprobs) == 20 for entry in done.choices[0].logprobs.content)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tgi", messages=messages, max_tokens=3, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tgi", messages=messages, max_tokens=3, top_logprobs=2)  # logprobs off
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "top_n_tokens": 6}}
    refused = httpx.post(f"{stack.http_url}/generate", json=body, timeout=30)
    assert refused.status_code == 422 and "top_n_tokens" in refused.json()["error"]


def test_unknown_and_unsupported_fields_are_refused_not_dropped(client, stack):
    messages = [{"role": "user", "content": PROMPT}]
    for extra in ({"not_a_field": 1}, {"response_format": {"type": "xml"}}):
        r = httpx.post(f"{stack.http_url}/v1/chat/completions", json={"messages": messages, **extra}, timeout=30)
        assert r.status_code == 422 and next(iter(extra)) in r.json()["error"], r.text
    text = client.chat.completions.create(
        model="tgi", messages=messages, max_tokens=2, temperature=0, response_format={"type": "text"}, user="u-1"
    )
    assert text.choices[0].finish_reason in ("length", "stop")
