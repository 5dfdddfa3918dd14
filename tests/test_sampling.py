"""NextTokenChooser, top_n_tokens and StoppingCriteria: their definitions, and transformers' processors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from text_generation_server.models.types import FinishReason, SamplingParameters, StoppingParameters
from text_generation_server.utils.sampling import NextTokenChooser, top_n_tokens
from text_generation_server.utils.stopping import StoppingCriteria

CPU = torch.device("cpu")
V = 128  # small vocabulary for the semantic tests


def random_logits(batch: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def chooser(params: list[SamplingParameters], histories: list[list[int]] | None = None) -> NextTokenChooser:
    histories = histories if histories is not None else [[0] for _ in params]
    return NextTokenChooser.from_params(params, histories, V, CPU)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    return -(logprobs.exp() * logprobs).nansum(-1)


# ---------------------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = random_logits(4)
    next_ids, logprobs = chooser([SamplingParameters()] * 4)(logits)
    assert next_ids.dtype == torch.int64 and next_ids.shape == (4,)
    assert torch.equal(next_ids, logits.argmax(-1))
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1))
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(4))


def test_plain_greedy_batch_builds_no_extra_stage():
    c = chooser([SamplingParameters()] * 3)
    assert c._token_counts is None and c._sampled_rows is None and c._temperature is None


def test_does_not_modify_the_callers_logits():
    logits = random_logits(2)
    before = logits.clone()
    params = SamplingParameters(do_sample=True, temperature=0.5, top_k=5, top_p=0.8, typical_p=0.9,
                                repetition_penalty=1.3, frequency_penalty=0.5)
    chooser([params, SamplingParameters()], [[1, 2, 3], [4]])(logits)
    assert torch.equal(logits, before)


def test_top_k_one_with_sampling_equals_greedy():
    sampled = chooser([SamplingParameters(do_sample=True, top_k=1, seed=s) for s in range(8)])
    for step in range(5):
        logits = random_logits(8, seed=step)
        next_ids, logprobs = sampled(logits)
        assert torch.equal(next_ids, logits.argmax(-1))
        # Only the kept token has probability: its logprob is 0.
        assert torch.allclose(logprobs.gather(1, next_ids[:, None]), torch.zeros(8, 1))


# ---------------------------------------------------------------------------------------------- warpers


def test_tiny_temperature_approaches_greedy():
    logits = random_logits(16)
    c = chooser([SamplingParameters(temperature=1e-3, seed=s) for s in range(16)])
    next_ids, _ = c(logits)
    assert torch.equal(next_ids, logits.argmax(-1))


def test_large_temperature_flattens_the_distribution():
    logits = random_logits(1)
    entropies = []
    for temperature in (0.25, 0.5, 1.0, 2.0, 10.0):
        params = SamplingParameters(do_sample=True, temperature=temperature)
        entropies.append(float(entropy(chooser([params]).process(logits).log_softmax(-1))))
    assert entropies == sorted(entropies) and entropies[-1] > entropies[0] + 1.0
    assert entropies[-1] <= math.log(V) + 1e-4


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(top_p: float) -> list[int]:
        c = NextTokenChooser.from_params([SamplingParameters(top_p=top_p)], [[0]], 4, CPU)
        return torch.isfinite(c.process(logits))[0].nonzero().flatten().tolist()

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
    processed = chooser(params).process(logits)
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
    processed = chooser(params, histories).process(logits)
    for row, (p, history) in enumerate(zip(params, histories)):
        reference = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)
        expected = reference(torch.tensor([history]), logits[row : row + 1].clone())
        torch.testing.assert_close(processed[row : row + 1], expected)

    _, penalized = chooser([params[0]], [histories[0]])(logits[:1])
    _, plain = chooser([SamplingParameters()], [histories[0]])(logits[:1])
    for token in set(histories[0]):
        assert penalized[0, token] < plain[0, token]


def test_frequency_penalty_grows_with_the_count():
    logits = torch.zeros(1, V)  # equal logits: only the penalty differs
    history = [5, 6, 6, 6, 7]
    processed = chooser([SamplingParameters(frequency_penalty=1.0)], [history]).process(logits)
    # TGI: scores -= penalty * count / len(history)
    assert processed[0, 5].item() == pytest.approx(-1 / 5)
    assert processed[0, 6].item() == pytest.approx(-3 / 5)
    assert processed[0, 8].item() == 0.0
    assert processed[0, 6] < processed[0, 5] < processed[0, 8]


def test_penalties_see_the_generated_tokens():
    """Each chosen id joins its row's history, so a greedy row with a penalty stops repeating its argmax."""
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11] = 2.0, 1.9
    c = chooser([SamplingParameters(repetition_penalty=2.0)], [[0]])
    first, _ = c(logits)
    second, _ = c(logits)
    assert (first.item(), second.item()) == (10, 11)

    c = chooser([SamplingParameters(frequency_penalty=2.0)], [[0]])
    ids = [c(logits)[0].item() for _ in range(3)]
    assert ids[:2] == [10, 11]


def test_logprobs_are_normalized_for_every_kind_of_row():
    params = [SamplingParameters(), SamplingParameters(do_sample=True, seed=1),
              SamplingParameters(top_k=3, temperature=0.5),
              SamplingParameters(top_p=0.5, repetition_penalty=1.2),
              SamplingParameters(typical_p=0.5, frequency_penalty=0.7)]
    next_ids, logprobs = chooser(params)(random_logits(5))
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(5))
    # The chosen token is always one the processors kept.
    assert torch.isfinite(logprobs.gather(1, next_ids[:, None])).all()


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log()
    c = NextTokenChooser.from_params([SamplingParameters(do_sample=True, seed=123)], [[0]], 3, CPU)
    draws = torch.tensor([c(logits)[0].item() for _ in range(3000)])
    frequencies = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(frequencies, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


# ------------------------------------------------------------------------------------- seeds and batches


# A deterministic stand-in for a model: the next logits depend only on the row's last token.
LOGIT_TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(99)) * 2.0


def fake_logits(last_ids: list[int]) -> torch.Tensor:
    return LOGIT_TABLE[torch.tensor(last_ids)]


def generate_alone(params: SamplingParameters, prompt: list[int], steps: int) -> list[int]:
    c = chooser([params], [prompt])
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(c(fake_logits([tokens[-1]]))[0].item())
    return tokens[len(prompt) :]


SAMPLED_A = SamplingParameters(do_sample=True, seed=42, temperature=0.8, top_k=30, repetition_penalty=1.2)
SAMPLED_B = SamplingParameters(seed=7, top_p=0.9, typical_p=0.95, frequency_penalty=0.5)


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed():
    first = generate_alone(SAMPLED_A, [1, 2, 3], 20)
    assert first == generate_alone(SAMPLED_A, [1, 2, 3], 20)
    other_seed = SamplingParameters(**{**SAMPLED_A.__dict__, "seed": 43})
    assert first != generate_alone(other_seed, [1, 2, 3], 20)


def test_seeded_rows_do_not_depend_on_the_batch_nor_on_filter_and_concatenate():
    steps = 20
    prompts = {"A": [1, 2, 3], "B": [4, 5]}
    expected = {"A": generate_alone(SAMPLED_A, prompts["A"], steps),
                "B": generate_alone(SAMPLED_B, prompts["B"], steps)}

    # Batch: greedy G1, A, sampled S (another seed), B.
    names = ["G1", "A", "S", "B"]
    params = [SamplingParameters(), SAMPLED_A, SamplingParameters(do_sample=True, seed=42), SAMPLED_B]
    tokens = {"G1": [9], "A": list(prompts["A"]), "S": [1, 2, 3], "B": list(prompts["B"])}
    c = NextTokenChooser.from_params(params, [tokens[n] for n in names], V, CPU)

    def step() -> None:
        next_ids, _ = c(fake_logits([tokens[n][-1] for n in names]))
        for name, token in zip(names, next_ids.tolist()):
            tokens[name].append(token)

    for _ in range(6):
        step()
    # G1 and S finish: keep B then A (order changes too).
    c, names = c.filter([3, 1]), ["B", "A"]
    for _ in range(5):
        step()
    # A new batch without penalties (so without token counts) joins in front.
    joining = NextTokenChooser.from_params(
        [SamplingParameters(), SamplingParameters(do_sample=True, seed=42, top_k=30)], [[7], [8]], V, CPU
    )
    tokens.update({"G2": [7], "S2": [8]})
    c, names = NextTokenChooser.concatenate([joining, c]), ["G2", "S2", "B", "A"]
    for _ in range(steps - 11):
        step()

    assert tokens["A"][len(prompts["A"]) :] == expected["A"]
    assert tokens["B"][len(prompts["B"]) :] == expected["B"]


def test_filter_and_concatenate_validate():
    c = chooser([SamplingParameters()] * 2)
    with pytest.raises(ValueError, match="5"):
        c.filter([0, 5])
    with pytest.raises(ValueError, match="unique"):
        c.filter([1, 1])
    with pytest.raises(ValueError):
        NextTokenChooser.concatenate([])
    other = NextTokenChooser.from_params([SamplingParameters()], [[0]], V + 1, CPU)
    with pytest.raises(ValueError, match="vocab"):
        NextTokenChooser.concatenate([c, other])
    assert len(NextTokenChooser.concatenate([c, c.filter([1])])) == 3


@pytest.mark.parametrize(
    "bad, value",
    [("temperature", 0.0), ("temperature", -1.0), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
     ("typical_p", 0.0), ("repetition_penalty", 0.0), ("frequency_penalty", math.inf), ("seed", -1),
     ("seed", 2**64)],
)
def test_from_params_rejects_bad_parameters(bad, value):
    with pytest.raises(ValueError, match=bad):
        chooser([SamplingParameters(**{bad: value})])


def test_from_params_and_call_reject_bad_shapes():
    with pytest.raises(ValueError, match="histories"):
        NextTokenChooser.from_params([SamplingParameters()], [], V, CPU)
    with pytest.raises(ValueError, match=str(V)):
        chooser([SamplingParameters(repetition_penalty=1.1)], [[V]])
    with pytest.raises(ValueError, match="shape"):
        chooser([SamplingParameters()])(torch.zeros(2, V))


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


# ---------------------------------------------------------------------------------------------- stopping

EOS = frozenset({2, 92542})


def test_stops_at_max_new_tokens():
    criteria = StoppingCriteria(EOS, StoppingParameters(max_new_tokens=3))
    assert [criteria(5, "a"), criteria(6, "b"), criteria(7, "c")] == [None, None, FinishReason.LENGTH]


def test_stops_at_any_eos_id_unless_ignored():
    assert StoppingCriteria(EOS, StoppingParameters())(92542, "") == FinishReason.EOS_TOKEN
    assert StoppingCriteria(EOS, StoppingParameters())(2, "") == FinishReason.EOS_TOKEN
    ignoring = StoppingCriteria(EOS, StoppingParameters(max_new_tokens=3, ignore_eos_token=True))
    assert [ignoring(2, ""), ignoring(2, ""), ignoring(2, "")] == [None, None, FinishReason.LENGTH]


def test_length_wins_over_eos_on_the_same_token():
    criteria = StoppingCriteria(EOS, StoppingParameters(max_new_tokens=2))
    assert criteria(5, "a") is None
    assert criteria(2, "") == FinishReason.LENGTH


def test_stop_sequence_spanning_two_tokens():
    criteria = StoppingCriteria(EOS, StoppingParameters(stop_sequences=("\nUser:",)))
    assert criteria(10, "Hello") is None
    assert criteria(11, "\nUs") is None
    assert criteria(12, "er:") == FinishReason.STOP_SEQUENCE


def test_stop_sequence_inside_a_token_counts_once():
    criteria = StoppingCriteria(EOS, StoppingParameters(stop_sequences=("ab", "zz")))
    assert criteria(1, "xabc") == FinishReason.STOP_SEQUENCE  # "ab" ends inside this token's text
    criteria = StoppingCriteria(EOS, StoppingParameters(stop_sequences=("zz",)))
    assert criteria(1, "zaz") is None
    assert criteria(3, "y") is None
    assert criteria(4, "z") is None  # "yz": the earlier "z" is no longer adjacent
    assert criteria(5, "z") == FinishReason.STOP_SEQUENCE


def test_stop_sequence_still_found_after_much_text():
    criteria = StoppingCriteria(EOS, StoppingParameters(max_new_tokens=10_000, stop_sequences=("STOP",)))
    for i in range(2000):
        assert criteria(1, f"word{i} ") is None
    assert criteria(1, "ST") is None
    assert criteria(1, "OP") == FinishReason.STOP_SEQUENCE


@pytest.mark.parametrize(
    "params, shown",
    [(StoppingParameters(max_new_tokens=0), "0"), (StoppingParameters(max_new_tokens=-3), "-3"),
     (StoppingParameters(stop_sequences=("ok", "")), "''"),
     (StoppingParameters(stop_sequences=(None,)), "None")],
)
def test_stopping_validation(params, shown):
    with pytest.raises(ValueError, match=shown):
        StoppingCriteria(EOS, params)
