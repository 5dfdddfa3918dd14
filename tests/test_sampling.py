"""TokenSampler, process, choose_tokens, chosen_logprobs and top_n_tokens: their definitions, and transformers'
processors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from text_generation_server.models.types import SamplingParameters
from text_generation_server.utils import sampling
from text_generation_server.utils.sampling import (
    TokenSampler,
    choose_tokens,
    chosen_logprobs,
    process,
    top_n_tokens,
)

CPU = torch.device("cpu")
V = 128  # small vocabulary for the semantic tests


def random_logits(batch: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def samplers(
    params: list[SamplingParameters], histories: list[list[int]] | None = None, vocab: int = V
) -> list[TokenSampler]:
    histories = histories if histories is not None else [[0] for _ in params]
    assert len(histories) == len(params)
    return [TokenSampler(p, history, vocab, CPU) for p, history in zip(params, histories)]


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    return -(logprobs.exp() * logprobs).nansum(-1)


def with_seed(params: SamplingParameters, seed: int) -> SamplingParameters:
    return SamplingParameters(**{**params.__dict__, "seed": seed})


# ---------------------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = random_logits(4)
    next_ids, logprobs = choose_tokens(logits, samplers([SamplingParameters()] * 4))
    assert next_ids.dtype == torch.int64 and next_ids.shape == (4,)
    assert logprobs.rows == [0, 1, 2, 3]
    assert logprobs.values.dtype == torch.float32 and logprobs.values.shape == (4, V)
    assert torch.equal(next_ids, logits.argmax(-1))
    torch.testing.assert_close(logprobs.values, torch.log_softmax(logits, -1))
    torch.testing.assert_close(logprobs.values.exp().sum(-1), torch.ones(4))
    chosen = chosen_logprobs(logprobs, next_ids, [True] * 4, [0] * 4)
    expected = torch.log_softmax(logits, -1).gather(1, next_ids[:, None]).squeeze(1)
    assert [logprob for logprob, _ in chosen] == pytest.approx(expected.tolist())
    assert all(top == ([], []) for _, top in chosen)


def test_logprobs_only_for_the_rows_that_want_them():
    """A row that wants neither its logprob nor top tokens gets NaN and none; the others get exactly what a
    log-softmax of the whole batch gives them."""
    logits = random_logits(4)
    full = torch.log_softmax(logits, -1)  # plain greedy rows: the scores are the logits
    wanted = [True, False, True, False]
    next_ids, logprobs = choose_tokens(logits, samplers([SamplingParameters()] * 4), wanted)
    assert logprobs.rows == [0, 2] and torch.equal(logprobs.values, full[[0, 2]])
    chosen = chosen_logprobs(logprobs, next_ids, wanted, [0, 3, 2, 0])
    assert math.isnan(chosen[1][0]) and math.isnan(chosen[3][0])
    assert chosen[1][1] == ([], []) and chosen[3][1] == ([], [])
    for row in (0, 2):
        assert chosen[row][0] == full[row, next_ids[row]].item()
    assert chosen[2][1] == top_n_tokens(full[2:3], [2])[0] and chosen[0][1] == ([], [])
    next_ids, none = choose_tokens(logits, samplers([SamplingParameters()] * 4), [False] * 4)
    assert none.rows == []
    nothing = chosen_logprobs(none, next_ids, [False] * 4, [0] * 4)
    assert all(math.isnan(logprob) and top == ([], []) for logprob, top in nothing)


def test_a_sampled_row_draws_the_same_whether_or_not_its_logprobs_are_wanted():
    """A sampled row draws from its own logprobs, so they are computed (once) whatever it asked for."""
    params = [with_seed(SamplingParameters(do_sample=True), seed) for seed in range(4)] + [SamplingParameters()]
    logits = random_logits(5)
    every, _ = choose_tokens(logits, samplers(params))
    some, logprobs = choose_tokens(logits, samplers(params), [False, True, False, False, False])
    assert torch.equal(every, some) and logprobs.rows == [0, 1, 2, 3]


def test_plain_greedy_sampler_holds_no_generator_nor_counts():
    greedy = TokenSampler(SamplingParameters(), [5, 6, 6], V, CPU)
    assert greedy.generator is None and greedy.counts is None and greedy.history_length == 3
    sampled = TokenSampler(SamplingParameters(do_sample=True, seed=3), [5], V, CPU)
    assert sampled.generator is not None and sampled.counts is None
    penalized = TokenSampler(SamplingParameters(frequency_penalty=0.5), [5, 6, 6], V, CPU)
    assert penalized.generator is None
    assert penalized.counts is not None and penalized.counts.dtype == torch.float32
    expected = torch.zeros(V)
    expected[5], expected[6] = 1.0, 2.0
    assert torch.equal(penalized.counts, expected)
    penalized.record(6)
    assert penalized.counts[6].item() == 3.0 and penalized.history_length == 4


def test_plain_greedy_batch_builds_no_extra_stage(monkeypatch: pytest.MonkeyPatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a plain greedy batch ran a sampling stage")

    for stage in ("_apply_repetition_penalty", "_apply_frequency_penalty", "_apply_top_k", "_apply_top_p",
                  "_apply_typical_p", "_draw"):
        monkeypatch.setattr(sampling, stage, must_not_run)
    logits = random_logits(3)
    rows = samplers([SamplingParameters()] * 3)
    assert torch.equal(process(logits, rows), logits)
    next_ids, _ = choose_tokens(logits, rows)
    assert torch.equal(next_ids, logits.argmax(-1))


def test_greedy_rows_come_out_of_process_unchanged_next_to_processed_rows():
    logits = random_logits(3, seed=1)
    params = [SamplingParameters(), SamplingParameters(do_sample=True, temperature=0.5, top_k=5, top_p=0.8),
              SamplingParameters()]
    processed = process(logits, samplers(params))
    assert torch.equal(processed[0], logits[0]) and torch.equal(processed[2], logits[2])
    assert not torch.equal(processed[1], logits[1])


def test_does_not_modify_the_callers_logits():
    logits = random_logits(2)
    before = logits.clone()
    params = SamplingParameters(do_sample=True, temperature=0.5, top_k=5, top_p=0.8, typical_p=0.9,
                                repetition_penalty=1.3, frequency_penalty=0.5)
    rows = samplers([params, SamplingParameters()], [[1, 2, 3], [4]])
    process(logits, rows)
    choose_tokens(logits, rows)
    assert torch.equal(logits, before)


def test_top_k_one_with_sampling_equals_greedy():
    rows = samplers([SamplingParameters(do_sample=True, top_k=1, seed=s) for s in range(8)])
    for step in range(5):
        logits = random_logits(8, seed=step)
        next_ids, logprobs = choose_tokens(logits, rows)
        assert torch.equal(next_ids, logits.argmax(-1))
        # Only the kept token has probability: its logprob is 0.
        assert torch.allclose(logprobs.values.gather(1, next_ids[:, None]), torch.zeros(8, 1))


# ---------------------------------------------------------------------------------------------- warpers


def test_tiny_temperature_approaches_greedy():
    logits = random_logits(16)
    rows = samplers([SamplingParameters(temperature=1e-3, seed=s) for s in range(16)])
    next_ids, _ = choose_tokens(logits, rows)
    assert torch.equal(next_ids, logits.argmax(-1))


def test_large_temperature_flattens_the_distribution():
    logits = random_logits(1)
    entropies = []
    for temperature in (0.25, 0.5, 1.0, 2.0, 10.0):
        params = SamplingParameters(do_sample=True, temperature=temperature)
        entropies.append(float(entropy(process(logits, samplers([params])).log_softmax(-1))))
    assert entropies == sorted(entropies) and entropies[-1] > entropies[0] + 1.0
    assert entropies[-1] <= math.log(V) + 1e-4


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(top_p: float) -> list[int]:
        scores = process(logits, samplers([SamplingParameters(top_p=top_p)], vocab=4))
        return torch.isfinite(scores)[0].nonzero().flatten().tolist()

    assert kept(0.4) == [0]
    assert kept(0.7) == [0, 1]
    assert kept(0.85) == [0, 1, 2]
    assert kept(0.99) == [0, 1, 2, 3]
    assert kept(1e-6) == [0]  # at least one token is kept


def test_warpers_match_transformers_per_row():
    """Rows with different warpers in one batch: each equals transformers' processors applied to it alone."""
    logits = random_logits(6, seed=3)
    params = [
        SamplingParameters(top_p=0.8),
        SamplingParameters(typical_p=0.7),
        SamplingParameters(top_k=7),
        SamplingParameters(temperature=0.7, top_k=20, top_p=0.9, typical_p=0.95),
        SamplingParameters(),  # greedy: untouched
        SamplingParameters(do_sample=True, temperature=1.5, typical_p=0.2),
    ]
    processed = process(logits, samplers(params))
    for row, p in enumerate(params):
        expected = logits[row : row + 1].clone()
        if p.temperature != 1.0:
            expected = TemperatureLogitsWarper(p.temperature)(None, expected)
        if p.top_k:
            expected = TopKLogitsWarper(p.top_k)(None, expected)
        if p.top_p < 1.0:
            expected = TopPLogitsWarper(p.top_p)(None, expected)
        if p.typical_p < 1.0:
            expected = TypicalLogitsWarper(p.typical_p)(None, expected)
        torch.testing.assert_close(processed[row : row + 1], expected, msg=f"row {row}: {p}")


def test_repetition_penalty_matches_transformers_and_lowers_repeated_tokens():
    logits = random_logits(3, seed=5)
    histories = [[1, 2, 2, 9, 40], [3], [7, 8]]
    params = [SamplingParameters(repetition_penalty=1.3), SamplingParameters(repetition_penalty=0.8),
              SamplingParameters()]
    processed = process(logits, samplers(params, histories))
    for row, (p, history) in enumerate(zip(params, histories)):
        reference = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)
        expected = reference(torch.tensor([history]), logits[row : row + 1].clone())
        torch.testing.assert_close(processed[row : row + 1], expected)

    _, penalized = choose_tokens(logits[:1], samplers([params[0]], [histories[0]]))
    _, plain = choose_tokens(logits[:1], samplers([SamplingParameters()], [histories[0]]))
    for token in set(histories[0]):
        assert penalized.values[0, token] < plain.values[0, token]


def test_frequency_penalty_grows_with_the_count():
    logits = torch.zeros(1, V)  # equal logits: only the penalty differs
    history = [5, 6, 6, 6, 7]
    processed = process(logits, samplers([SamplingParameters(frequency_penalty=1.0)], [history]))
    # TGI: scores -= penalty * count / len(history)
    assert processed[0, 5].item() == pytest.approx(-1 / 5)
    assert processed[0, 6].item() == pytest.approx(-3 / 5)
    assert processed[0, 8].item() == 0.0
    assert processed[0, 6] < processed[0, 5] < processed[0, 8]


def test_openai_penalties_count_only_the_generated_tokens():
    """presence_penalty once per id generated so far, output_frequency_penalty per occurrence (OpenAI's
    formula); the prompt's ids (history before the last draws_made tokens) are not penalized."""
    params = SamplingParameters(presence_penalty=0.5, output_frequency_penalty=0.25)
    prompt, generated = [5, 5, 7], [6, 6, 8]
    row = TokenSampler(params, prompt + generated, V, CPU, draws_made=len(generated))
    processed = process(torch.zeros(1, V), [row])
    assert processed[0, 5].item() == 0.0 and processed[0, 7].item() == 0.0  # prompt only
    assert processed[0, 6].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert processed[0, 8].item() == pytest.approx(-(0.5 + 0.25))
    row.record(7)  # generated now: penalized from the next step on
    assert process(torch.zeros(1, V), [row])[0, 7].item() == pytest.approx(-0.75)
    # zeros mean "no penalty": bit-identical scores, no counts held
    plain = TokenSampler(SamplingParameters(presence_penalty=0.0, output_frequency_penalty=0.0), [5, 6], V, CPU)
    assert plain.output_counts is None
    logits = random_logits(1)
    assert torch.equal(process(logits, [plain]), logits)


def test_logit_bias_is_added_to_its_rows_only():
    logits = random_logits(2)
    biased = SamplingParameters(logit_bias=((3, 100.0), (4, -100.0)))
    next_ids, _ = choose_tokens(logits, samplers([biased, SamplingParameters()]))
    assert next_ids.tolist() == [3, logits[1].argmax().item()]
    processed = process(logits, samplers([biased, SamplingParameters()]))
    expected = logits.clone()
    expected[0, 3] += 100.0
    expected[0, 4] -= 100.0
    torch.testing.assert_close(processed, expected)
    with pytest.raises(ValueError, match="outside"):
        TokenSampler(SamplingParameters(logit_bias=((V, 1.0),)), [0], V, CPU)


def test_process_records_nothing():
    row = TokenSampler(SamplingParameters(frequency_penalty=1.0), [5], V, CPU)
    counts = row.counts.clone()
    first = process(random_logits(1), [row])
    assert torch.equal(row.counts, counts) and row.history_length == 1
    assert torch.equal(process(random_logits(1), [row]), first)


def test_penalties_see_the_generated_tokens():
    """choose_tokens records each chosen id, so a greedy row with a penalty stops repeating its argmax."""
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11] = 2.0, 1.9
    rows = samplers([SamplingParameters(repetition_penalty=2.0)], [[0]])
    first, _ = choose_tokens(logits, rows)
    second, _ = choose_tokens(logits, rows)
    assert (first.item(), second.item()) == (10, 11)
    assert rows[0].history_length == 3

    rows = samplers([SamplingParameters(frequency_penalty=2.0)], [[0]])
    ids = [choose_tokens(logits, rows)[0].item() for _ in range(3)]
    assert ids[:2] == [10, 11]


def test_logprobs_are_normalized_for_every_kind_of_row():
    params = [SamplingParameters(), SamplingParameters(do_sample=True, seed=1),
              SamplingParameters(top_k=3, temperature=0.5),
              SamplingParameters(top_p=0.5, repetition_penalty=1.2),
              SamplingParameters(typical_p=0.5, frequency_penalty=0.7)]
    next_ids, row_logprobs = choose_tokens(random_logits(5), samplers(params))
    logprobs = row_logprobs.values
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(5))
    # The chosen token is always one the processors kept.
    assert torch.isfinite(logprobs.gather(1, next_ids[:, None])).all()


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log()
    rows = samplers([SamplingParameters(do_sample=True, seed=123)], vocab=3)
    draws = torch.tensor([choose_tokens(logits, rows)[0].item() for _ in range(3000)])
    frequencies = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(frequencies, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


def test_sampling_never_chooses_a_masked_token():
    logits = random_logits(1, seed=8)
    rows = samplers([SamplingParameters(do_sample=True, seed=5, top_k=3)])
    allowed = set(logits[0].topk(3).indices.tolist())
    chosen = {choose_tokens(logits, rows)[0].item() for _ in range(300)}
    assert chosen <= allowed and len(chosen) > 1


# ------------------------------------------------------------------------------------- seeds and batches


# A deterministic stand-in for a model: the next logits depend only on the row's last token.
LOGIT_TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(99)) * 2.0


def fake_logits(last_ids: list[int]) -> torch.Tensor:
    return LOGIT_TABLE[torch.tensor(last_ids)]


def continue_alone(sampler: TokenSampler, last_id: int, steps: int) -> list[int]:
    tokens = [last_id]
    for _ in range(steps):
        tokens.append(choose_tokens(fake_logits([tokens[-1]]), [sampler])[0].item())
    return tokens[1:]


def generate_alone(params: SamplingParameters, prompt: list[int], steps: int) -> list[int]:
    return continue_alone(TokenSampler(params, prompt, V, CPU), prompt[-1], steps)


SAMPLED_A = SamplingParameters(do_sample=True, seed=42, temperature=0.8, top_k=30, repetition_penalty=1.2)
SAMPLED_B = SamplingParameters(seed=7, top_p=0.9, typical_p=0.95, frequency_penalty=0.5)
PLAIN_SAMPLED = SamplingParameters(do_sample=True, seed=2**64 - 1)


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed():
    for params in (SAMPLED_A, SAMPLED_B, PLAIN_SAMPLED):
        first = generate_alone(params, [1, 2, 3], 20)
        assert first == generate_alone(params, [1, 2, 3], 20)
        assert first != generate_alone(with_seed(params, 43), [1, 2, 3], 20)


def test_seeded_rows_do_not_depend_on_the_other_rows_of_the_step():
    """The same sampler objects run in steps whose companions join, leave and change places every step."""
    steps = 24
    prompts = {"A": [1, 2, 3], "B": [4, 5], "P": [6]}
    params = {"A": SAMPLED_A, "B": SAMPLED_B, "P": PLAIN_SAMPLED}
    expected = {name: generate_alone(params[name], prompts[name], steps) for name in params}

    companion_params = [
        SamplingParameters(),
        SamplingParameters(do_sample=True, seed=42),  # A's seed, other parameters
        SamplingParameters(do_sample=True, seed=42, top_k=30),
        SAMPLED_A,  # A's very parameters, in another sampler
        SamplingParameters(repetition_penalty=1.5, top_p=0.5),
        SamplingParameters(typical_p=0.3, frequency_penalty=1.0, seed=7),
    ]
    tracked = {name: TokenSampler(params[name], prompts[name], V, CPU) for name in params}
    tokens = {name: list(prompts[name]) for name in params}
    rng = random.Random(0)
    for step in range(steps):
        # Fresh companions every few steps, a random subset of them every step, all in a random order.
        if step % 4 == 0:
            companions = [
                (f"c{step}.{i}", TokenSampler(p, [9 + i], V, CPU)) for i, p in enumerate(companion_params)
            ]
            tokens.update({name: [9 + i] for i, (name, _) in enumerate(companions)})
        rows = list(tracked.items()) + rng.sample(companions, rng.randrange(len(companions) + 1))
        rng.shuffle(rows)
        next_ids, _ = choose_tokens(fake_logits([tokens[name][-1] for name, _ in rows]), [s for _, s in rows])
        for (name, _), token in zip(rows, next_ids.tolist()):
            tokens[name].append(token)

    for name in params:
        assert tokens[name][len(prompts[name]) :] == expected[name], name


@pytest.mark.parametrize(
    "params", [SAMPLED_A, SAMPLED_B, PLAIN_SAMPLED, SamplingParameters(repetition_penalty=1.3)]
)
@pytest.mark.parametrize("draws", [1, 7])
def test_draws_made_continues_where_the_sampler_was(params: SamplingParameters, draws: int):
    """A request recomputed after `draws` tokens: a new sampler with the longer history and draws_made=draws
    chooses exactly what the original sampler chooses next."""
    prompt = [1, 2, 3]
    original = TokenSampler(params, prompt, V, CPU)
    generated = continue_alone(original, prompt[-1], draws)
    resumed = TokenSampler(params, prompt + generated, V, CPU, draws_made=draws)
    assert resumed.history_length == original.history_length == len(prompt) + draws
    if params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0:
        assert torch.equal(resumed.counts, original.counts)
    assert continue_alone(resumed, generated[-1], 15) == continue_alone(original, generated[-1], 15)


def test_draws_made_matters_for_sampled_rows():
    prompt = [1, 2, 3]
    original = TokenSampler(SAMPLED_A, prompt, V, CPU)
    generated = continue_alone(original, prompt[-1], 5)
    restarted = TokenSampler(SAMPLED_A, prompt + generated, V, CPU)  # draws_made=0: the sequence starts over
    assert continue_alone(restarted, generated[-1], 15) != continue_alone(original, generated[-1], 15)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad, value",
    [("temperature", 0.0), ("temperature", -1.0), ("temperature", math.nan), ("top_k", -1), ("top_p", 0.0),
     ("top_p", 1.5), ("typical_p", 0.0), ("typical_p", 1.01), ("repetition_penalty", 0.0),
     ("repetition_penalty", math.inf), ("frequency_penalty", math.inf), ("seed", -1), ("seed", 2**64)],
)
def test_rejects_bad_parameters_naming_the_value(bad: str, value: float):
    with pytest.raises(ValueError, match=bad) as raised:
        TokenSampler(SamplingParameters(**{bad: value}), [0], V, CPU)
    assert repr(value) in str(raised.value)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenSampler(SamplingParameters(), [0], 0, CPU)
    with pytest.raises(ValueError, match=str(V)):
        TokenSampler(SamplingParameters(repetition_penalty=1.1), [V], V, CPU)
    with pytest.raises(ValueError, match="-1"):
        TokenSampler(SamplingParameters(frequency_penalty=0.1), [3, -1], V, CPU)
    rows = samplers([SamplingParameters()])
    for logits in (torch.zeros(2, V), torch.zeros(V), torch.zeros(1, 1, V)):
        with pytest.raises(ValueError, match="shape"):
            process(logits, rows)
        with pytest.raises(ValueError, match="shape"):
            choose_tokens(logits, rows)


# ---------------------------------------------------------------------------------------------- top_n_tokens


def test_top_n_tokens():
    logprobs = torch.log_softmax(random_logits(3, vocab=10), -1)
    result = top_n_tokens(logprobs, [2, 0, 20])
    assert result[1] == ([], [])
    ids, values = result[0]
    assert ids == logprobs[0].argsort(descending=True)[:2].tolist()
    assert values == pytest.approx(logprobs[0, ids].tolist())
    assert len(result[2][0]) == 10 and result[2][1] == sorted(result[2][1], reverse=True)
    assert top_n_tokens(logprobs, [0, 0, 0]) == [([], [])] * 3
    with pytest.raises(ValueError, match="-1"):
        top_n_tokens(logprobs, [1, -1, 0])
    with pytest.raises(ValueError):
        top_n_tokens(logprobs, [1])


@pytest.mark.parametrize("vocab_size", [92544, 1000, 128, 7])
def test_first_argmax_is_torch_argmax(vocab_size):
    """The same first-occurrence ids as torch.argmax: random rows, ties across and within blocks, rows of -inf,
    NaN, and vocabularies that are not a multiple of the block."""
    g = torch.Generator().manual_seed(vocab_size)
    scores = torch.randn(12, vocab_size, generator=g)
    scores[1] = 0.0  # all tied: id 0
    scores[2, [vocab_size - 1, vocab_size // 2]] = 50.0  # a tie in two blocks: the first wins
    scores[3] = -math.inf
    scores[4, vocab_size // 3] = math.nan
    scores[5, :] = 3.0
    scores[5, min(5, vocab_size - 1)] = 4.0
    scores[6, -1] = 100.0  # the last id, in the padded block
    assert torch.equal(sampling.first_argmax(scores), scores.argmax(dim=-1))
    assert torch.equal(sampling.first_argmax(scores.bfloat16()), scores.bfloat16().argmax(dim=-1))
