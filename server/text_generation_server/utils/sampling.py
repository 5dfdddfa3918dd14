"""Choosing the next token of every row of a step, each row with its own sampling parameters.

Per row and per step, in TGI's order:
  -. a constrained row's grammar mask: every id the grammar does not allow next scores -inf (`constraint.py`);
  0. logit bias (OpenAI's `logit_bias`): `scores[id] += bias`;
  1. repetition penalty over every id in the row's history (prompt + generated tokens);
  2. frequency penalty, `scores -= penalty * count(id) / len(history)` (TGI's meaning);
  2b. OpenAI's penalties over the generated tokens only:
     `scores -= presence_penalty * (generated_count(id) > 0) + output_frequency_penalty * generated_count(id)`;
  3. for rows that sample: temperature, top-k, top-p, typical-p (HF warper semantics);
  4. the choice: argmax for greedy rows, a draw from softmax(scores) for sampled rows;
  5. logprobs = log_softmax of the processed scores (what TGI reports), for the rows that want them
     (`chosen_logprobs`).

Each request owns a `TokenSampler` (its parameters, its seeded generator, its token counts) for its whole life
on the shard; a step's rows are whichever requests sample in it, so `choose_tokens` builds each stage per step
from the rows that need it. A stage is built only when some row needs it: a step of plain greedy rows costs one
argmax, and one log_softmax over the rows whose logprobs are reported. The penalties and the sort-based warpers
(top-p, typical-p) run only over the rows that enable them, since a sort of a [B, 92544] tensor is the most
expensive thing here.

Every per-row computation is row-local and each sampled row draws exactly one number per token from its own
generator, so a seeded request gives the same tokens whatever else is in the step, and a request recomputed
after a preemption continues its sequence of draws where it was (`TokenSampler` skips the draws already made).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from text_generation_server.utils.constraint import GrammarConstraint, allowed_tokens

if TYPE_CHECKING:  # only annotations need it; a runtime import would cycle through models/__init__
    from text_generation_server.models.types import SamplingParameters

_MAX_SEED = 2**64  # torch.Generator.manual_seed takes any value in [0, 2**64); TGI seeds are u64


def _validate_params(params: SamplingParameters) -> None:
    if not (math.isfinite(params.temperature) and params.temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {params.temperature!r}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {params.top_k!r}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p!r}")
    if not 0.0 < params.typical_p <= 1.0:
        raise ValueError(f"typical_p must be in (0, 1], got {params.typical_p!r}")
    if not (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {params.repetition_penalty!r}")
    for name in ("frequency_penalty", "presence_penalty", "output_frequency_penalty"):
        if not math.isfinite(getattr(params, name)):
            raise ValueError(f"{name} must be finite, got {getattr(params, name)!r}")
    for token_id, bias in params.logit_bias:
        if not math.isfinite(bias):
            raise ValueError(f"logit_bias of id {token_id} must be finite, got {bias!r}")
    if not 0 <= params.seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64), got {params.seed!r}")


def _has_penalty(params: SamplingParameters) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0


def _has_output_penalty(params: SamplingParameters) -> bool:
    return params.presence_penalty != 0.0 or params.output_frequency_penalty != 0.0


def _count(ids: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """counts [V] float32 of each id in `ids`."""
    counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    if ids:
        index = torch.tensor(list(ids), dtype=torch.int64, device=device)
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"history holds token id {low if low < 0 else high}, outside [0, {vocab_size})")
        counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.float32))
    return counts


def _column(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row values as a [b, 1] tensor that broadcasts over the vocabulary."""
    return torch.tensor(list(values), dtype=dtype, device=device).unsqueeze(1)


def _rows_where(flags: Sequence[bool], device: torch.device) -> torch.Tensor | None:
    """Indices [b] of the rows whose flag is set; None when no row is."""
    rows = [i for i, flag in enumerate(flags) if flag]
    return torch.tensor(rows, dtype=torch.int64, device=device) if rows else None


class TokenSampler:
    """One request's token choice: its parameters, its generator (sampled requests), its token counts
    (penalized requests: counts [V] float32 of every id in the history, and the history's length; with OpenAI's
    penalties, output_counts [V] of the generated ids), its logit bias (ids [k] int64, values [k]) and its
    grammar (constrained requests)."""

    def __init__(
        self,
        params: SamplingParameters,
        history: Sequence[int],
        vocab_size: int,
        device: torch.device,
        draws_made: int = 0,
        grammar: GrammarConstraint | None = None,
    ) -> None:
        """history: the request's tokens so far; its last `draws_made` ones were generated (after a
        preemption): a sampled request's generator skips their draws, and they count as generated tokens.
        grammar: the request's constraint, already past those generated tokens."""
        _validate_params(params)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}")
        self.params = params
        self.grammar = grammar
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
            for _ in range(draws_made):  # one draw per sampled token (see _draw)
                torch.rand(1, generator=self.generator, dtype=torch.float64, device=device)
        if not 0 <= draws_made <= len(history):
            raise ValueError(f"draws_made must be in [0, {len(history)}], got {draws_made}")
        self.history_length = len(history)
        self.counts = _count(history, vocab_size, device) if _has_penalty(params) else None
        generated = list(history)[len(history) - draws_made :]
        self.output_counts = _count(generated, vocab_size, device) if _has_output_penalty(params) else None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = [token_id for token_id, _ in params.logit_bias]
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise ValueError(f"logit_bias names ids outside [0, {vocab_size}): {ids}")
            values = [bias for _, bias in params.logit_bias]
            self.bias = (
                torch.tensor(ids, dtype=torch.int64, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )

    def record(self, token_id: int) -> None:
        """The request's history grew by `token_id`."""
        self.history_length += 1
        if self.grammar is not None:
            self.grammar.advance(token_id)
        if self.counts is not None:
            self.counts[token_id] += 1
        if self.output_counts is not None:
            self.output_counts[token_id] += 1


# ----------------------------------------------------------------------------------------------------------
# Logits processors. Each takes scores [B, V] (or [b, V] for a row subset) and returns new scores of the same
# shape without modifying its input.


def _apply_repetition_penalty(
    scores: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """HF semantics on every id present in the history: a positive score / p, a negative one * p.

    penalty: [B, 1]; a row with p == 1 comes out bit-identical.
    """
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(counts > 0, penalized, scores)


def _apply_frequency_penalty(
    scores: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """TGI semantics: the count is normalized by the history length (OpenAI subtracts the raw count)."""
    frequencies = counts / lengths.clamp_min(1.0).unsqueeze(1)
    return scores - penalty * frequencies


def _apply_output_penalties(
    scores: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI semantics over the generated tokens: counts [b, V]; presence, frequency [b, 1]."""
    return scores - presence * (counts > 0).float() - frequency * counts


def _apply_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Masks every score below the row's k-th best. top_k: [B, 1] int64, 0 = disabled."""
    vocab_size = scores.shape[-1]
    k = top_k.clamp(max=vocab_size)
    largest_k = int(k.max())
    assert largest_k >= 1, "built only when some row has top_k > 0"
    best = torch.topk(scores, largest_k, dim=-1).values  # [B, largest_k], descending
    kth_best = best.gather(1, (k - 1).clamp_min(0))  # [B, 1]
    threshold = torch.where(k > 0, kth_best, torch.full_like(kth_best, -math.inf))
    return scores.masked_fill(scores < threshold, -math.inf)


def _apply_top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keeps the smallest set of best tokens whose probability reaches top_p, at least one.

    HF semantics: sorted ascending, a token is removed when the cumulative mass up to it is <= 1 - top_p.
    top_p: [b, 1].
    """
    sorted_scores, sorted_ids = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_to_remove = cumulative <= (1 - top_p)
    sorted_to_remove[:, -1] = False  # the best token always stays
    to_remove = sorted_to_remove.scatter(1, sorted_ids, sorted_to_remove)
    return scores.masked_fill(to_remove, -math.inf)


def _apply_typical_p(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (HF TypicalLogitsWarper): keeps the tokens whose surprisal is closest to the
    entropy until their probability reaches `mass`, at least one. mass: [b, 1]."""
    log_probs = torch.log_softmax(scores, dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(-1, keepdim=True)  # nansum: -inf * 0 of masked tokens
    distance = (-log_probs - entropy).abs()  # |surprisal - entropy|
    sorted_distance, sorted_ids = torch.sort(distance, descending=False)
    cumulative = scores.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)
    last_kept = (cumulative < mass).sum(dim=1, keepdim=True).clamp(max=scores.shape[-1] - 1)
    sorted_to_remove = sorted_distance > sorted_distance.gather(1, last_kept)
    sorted_to_remove[:, 0] = False  # the most typical token always stays
    to_remove = sorted_to_remove.scatter(1, sorted_ids, sorted_to_remove)
    return scores.masked_fill(to_remove, -math.inf)


ARGMAX_BLOCK = 128  # ids per block of `first_argmax`'s first pass


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(dim=-1) for scores [B, V]: the first id of each row's largest score (NaN counts as largest,
    as in torch.argmax), in two passes. On CPU torch's argmax over a [32, 92544] row set takes ~1.3 ms and its
    amax ~0.1: the first pass takes each block's amax and picks the first best block, the second the first best
    id within it, ~5x faster in all."""
    rows, vocab_size = scores.shape
    pad = -vocab_size % ARGMAX_BLOCK
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=-math.inf)
    blocks = scores.view(rows, -1, ARGMAX_BLOCK)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # [B]
    within = blocks[torch.arange(rows, device=scores.device), best_block].argmax(dim=-1)
    return best_block * ARGMAX_BLOCK + within


def _on_rows(scores: torch.Tensor, rows: torch.Tensor, processed_rows: torch.Tensor) -> torch.Tensor:
    """scores with the given rows replaced (out of place)."""
    if rows.numel() == scores.shape[0]:
        return processed_rows  # every row, in order (rows are sorted and unique)
    return scores.index_copy(0, rows, processed_rows)


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One id per row from probs [b, V] (rows sum to 1), each row with its own generator; [b] int64.

    Inverse-CDF with one uniform number per row: cheaper on CPU than a multinomial or exponential draw per
    row, and still row-local (row i's id depends only on row i's probs and generator).
    """
    assert probs.shape[0] == len(generators)
    uniforms = torch.cat(
        [torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators]
    )  # [b] in [0, 1)
    cdf = probs.double().cumsum(dim=-1)  # float64: the running sum over ~1e5 ids stays exact enough
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    ids = torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    # Rounding at the very top of the CDF could land on a masked (zero-probability) id; fall back to argmax.
    landed_on_masked = probs.gather(1, ids.unsqueeze(1)).squeeze(1) <= 0
    return torch.where(landed_on_masked, first_argmax(probs), ids)


def process(logits: torch.Tensor, samplers: Sequence[TokenSampler]) -> torch.Tensor:
    """The scores [B, V] float32 of `logits` [B, V] after each row's penalties and warpers (nothing recorded)."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits of shape {list(logits.shape)} do not match {len(samplers)} samplers")
    device = logits.device
    params = [s.params for s in samplers]
    scores = logits.float()
    constrained = _rows_where([s.grammar is not None for s in samplers], device)
    if constrained is not None:
        rows = [samplers[i].grammar for i in constrained.tolist()]
        allowed = allowed_tokens(rows, scores.shape[-1]).to(device)
        part = scores if len(rows) == len(samplers) else scores.index_select(0, constrained)
        part = torch.where(allowed, part, -math.inf)  # a new tensor: logits stay as they were
        scores = _on_rows(scores, constrained, part)
    biased = [(i, s.bias) for i, s in enumerate(samplers) if s.bias is not None]
    if biased:
        scores = scores.clone()  # logits.float() is logits itself when they are float32
        for row, (ids, values) in biased:
            scores[row].index_add_(0, ids, values)
    penalized = _rows_where([s.counts is not None for s in samplers], device)
    if penalized is not None:
        rows = [samplers[i] for i in penalized.tolist()]
        counts = torch.stack([s.counts for s in rows])
        lengths = torch.tensor([float(s.history_length) for s in rows], device=device)
        part = scores.index_select(0, penalized)
        repetition = _column([s.params.repetition_penalty for s in rows], torch.float32, device)
        part = _apply_repetition_penalty(part, counts, repetition)
        part = _apply_frequency_penalty(
            part, counts, lengths, _column([s.params.frequency_penalty for s in rows], torch.float32, device)
        )
        scores = _on_rows(scores, penalized, part)
    output_penalized = _rows_where([s.output_counts is not None for s in samplers], device)
    if output_penalized is not None:
        rows = [samplers[i] for i in output_penalized.tolist()]
        part = _apply_output_penalties(
            scores.index_select(0, output_penalized),
            torch.stack([s.output_counts for s in rows]),
            _column([s.params.presence_penalty for s in rows], torch.float32, device),
            _column([s.params.output_frequency_penalty for s in rows], torch.float32, device),
        )
        scores = _on_rows(scores, output_penalized, part)
    # The warpers are neutral on greedy rows (is_greedy means every warper is disabled).
    if any(p.temperature != 1.0 for p in params):
        scores = scores / _column([p.temperature for p in params], torch.float32, device)
    if any(p.top_k > 0 for p in params):
        scores = _apply_top_k(scores, _column([p.top_k for p in params], torch.int64, device))
    top_p_rows = _rows_where([p.top_p < 1.0 for p in params], device)
    if top_p_rows is not None:
        values = _column([p.top_p for p in params if p.top_p < 1.0], torch.float32, device)
        scores = _on_rows(scores, top_p_rows, _apply_top_p(scores.index_select(0, top_p_rows), values))
    typical_rows = _rows_where([p.typical_p < 1.0 for p in params], device)
    if typical_rows is not None:
        values = _column([p.typical_p for p in params if p.typical_p < 1.0], torch.float32, device)
        scores = _on_rows(scores, typical_rows, _apply_typical_p(scores.index_select(0, typical_rows), values))
    return scores


@dataclass(frozen=True)
class RowLogprobs:
    """log_softmax of a step's processed scores, for some of its rows only: values[k] is row rows[k]'s."""

    rows: list[int]  # ascending
    values: torch.Tensor  # [len(rows), V] float32


def choose_tokens(
    logits: torch.Tensor, samplers: Sequence[TokenSampler], wants_logprobs: Sequence[bool] | None = None
) -> tuple[torch.Tensor, RowLogprobs]:
    """logits [B, V], row i for samplers[i]. Returns (next_ids [B] int64, the logprobs of the rows that sample or
    want them), and records each chosen id in its sampler. wants_logprobs: per row (None: every row).

    The log-softmax over the vocabulary runs once, on those rows only: over 32 rows it (and the [B, V] tensor it
    writes) is ~1.5 ms of a bfloat16 decode step (small preset, 2-core AVX-512 machine: served, the shard's token
    choice 2.2-2.5 against 0.85-1.0 ms a step; in process the step 40.8 against 38.6 ms), for rows whose
    clients mostly never see a logprob (OpenAI's APIs report them only when asked). A sampled row draws from
    the exp of its own logprobs.
    """
    scores = process(logits, samplers)
    next_ids = first_argmax(scores)
    sampled = [s.generator is not None for s in samplers]
    wanted = [True] * len(samplers) if wants_logprobs is None else wants_logprobs
    rows = [i for i, (want, draws) in enumerate(zip(wanted, sampled)) if want or draws]
    if len(rows) == len(samplers):
        values = torch.log_softmax(scores, dim=-1)
    else:
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        values = torch.log_softmax(scores.index_select(0, index), dim=-1)
    drawing = [k for k, row in enumerate(rows) if sampled[row]]
    if drawing:
        at = torch.tensor(drawing, dtype=torch.int64, device=logits.device)
        draw_rows = torch.tensor([rows[k] for k in drawing], dtype=torch.int64, device=logits.device)
        generators = [samplers[rows[k]].generator for k in drawing]
        next_ids = next_ids.index_copy(0, draw_rows, _draw(values.index_select(0, at).exp(), generators))
    for sampler, token_id in zip(samplers, next_ids.tolist()):
        sampler.record(token_id)
    return next_ids, RowLogprobs(rows, values)


ChosenLogprobs = tuple[float, tuple[list[int], list[float]]]  # the chosen id's logprob, (top ids, their logprobs)


def chosen_logprobs(
    logprobs: RowLogprobs, next_ids: torch.Tensor, wanted: Sequence[bool], top_n: Sequence[int]
) -> list[ChosenLogprobs]:
    """Per row of `choose_tokens`' ids [B]: the chosen id's logprob and its top_n[i] best alternatives where
    wanted[i] (which `logprobs` must hold), else (NaN, ([], []))."""
    out: list[ChosenLogprobs] = [(math.nan, ([], [])) for _ in wanted]
    keep = [k for k, row in enumerate(logprobs.rows) if wanted[row]]
    rows = [logprobs.rows[k] for k in keep]
    assert len(rows) == sum(map(bool, wanted)), "a row that wants logprobs has none"
    if not rows:
        return out
    values = logprobs.values
    if len(keep) < len(logprobs.rows):
        values = values.index_select(0, torch.tensor(keep, dtype=torch.int64, device=values.device))
    ids = next_ids.index_select(0, torch.tensor(rows, dtype=torch.int64, device=next_ids.device))
    chosen = values.gather(1, ids[:, None]).squeeze(1).tolist()
    tops = top_n_tokens(values, [top_n[row] for row in rows])
    for row, value, top in zip(rows, chosen, tops):
        out[row] = (value, top)
    return out


def top_n_tokens(logprobs: torch.Tensor, top_n: Sequence[int]) -> list[tuple[list[int], list[float]]]:
    """Per row the top_n[i] best (ids, logprobs), best first; ([], []) when top_n[i] == 0.

    logprobs: [B, V]. Exactly min(top_n[i], V) entries per row (TGI also includes ties at the n-th value).
    """
    if logprobs.dim() != 2 or logprobs.shape[0] != len(top_n):
        raise ValueError(f"logprobs of shape {list(logprobs.shape)} do not match {len(top_n)} top_n values")
    for n in top_n:
        if n < 0:
            raise ValueError(f"top_n must be >= 0, got {n}")
    largest_n = min(max(top_n, default=0), logprobs.shape[1])
    if largest_n == 0:
        return [([], []) for _ in top_n]
    values, ids = torch.topk(logprobs, largest_n, dim=-1)  # [B, largest_n], descending
    values_rows, ids_rows = values.tolist(), ids.tolist()  # one host transfer for the whole batch
    return [(ids_rows[row][:n], values_rows[row][:n]) for row, n in enumerate(top_n)]
