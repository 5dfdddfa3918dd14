"""Choosing the next token of every row of a batch, each row with its own sampling parameters.

Per row and per step, in TGI's order:
  1. repetition penalty over every id in the row's history (prompt + generated tokens);
  2. frequency penalty, `scores -= penalty * count(id) / len(history)`;
  3. for rows that sample: temperature, top-k, top-p, typical-p (HF warper semantics);
  4. the choice: argmax for greedy rows, a draw from softmax(scores) for sampled rows;
  5. logprobs = log_softmax of the processed scores (what TGI reports).

A stage is built only when some row needs it, so a batch of plain greedy rows costs one argmax and one
log_softmax. A stage that is a no-op for its neutral value (temperature 1, penalty 1, ...) runs over all rows;
the sort-based warpers (top-p, typical-p) run only over the rows that enable them, since a sort of a
[B, 92544] tensor is the most expensive thing here.

Each sampled row draws from its own torch.Generator seeded with the request's seed, and every per-row
computation is row-local, so a seeded request gives the same tokens whatever else is in the batch; `filter`
and `concatenate` hand each row's generator (and its token counts) to the new chooser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

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
    if not math.isfinite(params.frequency_penalty):
        raise ValueError(f"frequency_penalty must be finite, got {params.frequency_penalty!r}")
    if not 0 <= params.seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64), got {params.seed!r}")


def _has_penalty(params: SamplingParameters) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0


def _new_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _column(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row values as a [B, 1] tensor that broadcasts over the vocabulary."""
    return torch.tensor(list(values), dtype=dtype, device=device).unsqueeze(1)


def _rows_where(flags: Sequence[bool], device: torch.device) -> torch.Tensor | None:
    """Indices [b] of the rows whose flag is set; None when no row is."""
    rows = [i for i, flag in enumerate(flags) if flag]
    return torch.tensor(rows, dtype=torch.int64, device=device) if rows else None


def _count_tokens(histories: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """counts[i, t] = how many times id t occurs in histories[i]; [B, V] float32."""
    counts = torch.zeros(len(histories), vocab_size, dtype=torch.float32, device=device)
    for row, history in enumerate(histories):
        if len(history) == 0:
            continue
        ids = torch.tensor(list(history), dtype=torch.int64, device=device)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"history of row {row} holds token id {bad}, outside [0, {vocab_size})")
        counts[row].scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts


class _TokenCounts:
    """Every row's history summarized for the penalties: counts [B, V] float32, lengths [B] float32.

    Invariant: a row whose history was never counted (it came from a chooser without penalties, see
    `concatenate`) has zero counts and length 0, which is harmless because that row has no penalty.
    """

    def __init__(self, counts: torch.Tensor, lengths: torch.Tensor) -> None:
        assert counts.dim() == 2 and lengths.shape == counts.shape[:1]
        self.counts = counts
        self.lengths = lengths

    def record(self, next_ids: torch.Tensor) -> None:
        """Adds one token per row; next_ids [B] int64."""
        self.counts.scatter_add_(1, next_ids.unsqueeze(1), torch.ones_like(self.counts[:, :1]))
        self.lengths += 1

    def select(self, rows: torch.Tensor) -> _TokenCounts:
        return _TokenCounts(self.counts.index_select(0, rows), self.lengths.index_select(0, rows))

    @staticmethod
    def uncounted(batch_size: int, vocab_size: int, device: torch.device) -> _TokenCounts:
        return _TokenCounts(
            torch.zeros(batch_size, vocab_size, dtype=torch.float32, device=device),
            torch.zeros(batch_size, dtype=torch.float32, device=device),
        )


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
    return torch.where(landed_on_masked, probs.argmax(dim=-1), ids)


class NextTokenChooser:
    """Chooses the next token of every row of a batch, each row with its own parameters.

    A chooser is stateful (generators, token counts): after `filter` or `concatenate` use only the new one.
    """

    def __init__(
        self,
        params: Sequence[SamplingParameters],
        generators: Sequence[torch.Generator | None],
        token_counts: _TokenCounts | None,
        vocab_size: int,
        device: torch.device,
    ) -> None:
        """Internal; use `from_params`. generators[i] is set exactly for the rows that sample."""
        assert len(generators) == len(params)
        assert all((g is None) == p.is_greedy for g, p in zip(generators, params))
        assert token_counts is not None or not any(_has_penalty(p) for p in params)
        self.params = tuple(params)
        self.vocab_size = vocab_size
        self.device = device
        self._generators = list(generators)
        self._token_counts = token_counts
        self._build_stages()

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParameters],
        histories: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> NextTokenChooser:
        """histories[i]: row i's tokens so far (its prompt); penalties look at prompt + generated tokens."""
        if len(params) != len(histories):
            raise ValueError(f"got {len(params)} parameter sets but {len(histories)} histories")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}")
        for p in params:
            _validate_params(p)
        device = torch.device(device)
        generators = [None if p.is_greedy else _new_generator(p.seed, device) for p in params]
        token_counts = None
        if any(_has_penalty(p) for p in params):
            lengths = torch.tensor([float(len(h)) for h in histories], dtype=torch.float32, device=device)
            token_counts = _TokenCounts(_count_tokens(histories, vocab_size, device), lengths)
        return cls(params, generators, token_counts, vocab_size, device)

    def _build_stages(self) -> None:
        """Per-row parameter tensors for the stages some row needs; None for the others."""
        params, device = self.params, self.device
        self._repetition_penalty = (
            _column([p.repetition_penalty for p in params], torch.float32, device)
            if any(p.repetition_penalty != 1.0 for p in params)
            else None
        )
        self._frequency_penalty = (
            _column([p.frequency_penalty for p in params], torch.float32, device)
            if any(p.frequency_penalty != 0.0 for p in params)
            else None
        )
        self._temperature = (
            _column([p.temperature for p in params], torch.float32, device)
            if any(p.temperature != 1.0 for p in params)
            else None
        )
        self._top_k = (
            _column([p.top_k for p in params], torch.int64, device)
            if any(p.top_k > 0 for p in params)
            else None
        )
        self._top_p_rows = _rows_where([p.top_p < 1.0 for p in params], device)
        self._top_p = (
            _column([p.top_p for p in params if p.top_p < 1.0], torch.float32, device)
            if self._top_p_rows is not None
            else None
        )
        self._typical_rows = _rows_where([p.typical_p < 1.0 for p in params], device)
        self._typical_p = (
            _column([p.typical_p for p in params if p.typical_p < 1.0], torch.float32, device)
            if self._typical_rows is not None
            else None
        )
        self._sampled_rows = _rows_where([not p.is_greedy for p in params], device)

    def __len__(self) -> int:
        return len(self.params)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores [B, V] float32 after penalties and warpers; does not record anything."""
        if logits.dim() != 2 or logits.shape[0] != len(self) or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits must have shape [{len(self)}, {self.vocab_size}], got {list(logits.shape)}"
            )
        scores = logits.float()
        if self._token_counts is not None:
            counts = self._token_counts.counts
            if self._repetition_penalty is not None:
                scores = _apply_repetition_penalty(scores, counts, self._repetition_penalty)
            if self._frequency_penalty is not None:
                scores = _apply_frequency_penalty(
                    scores, counts, self._token_counts.lengths, self._frequency_penalty
                )
        # The warpers are neutral on greedy rows (is_greedy means every warper is disabled).
        if self._temperature is not None:
            scores = scores / self._temperature
        if self._top_k is not None:
            scores = _apply_top_k(scores, self._top_k)
        if self._top_p_rows is not None:
            rows = self._top_p_rows
            scores = _on_rows(scores, rows, _apply_top_p(scores.index_select(0, rows), self._top_p))
        if self._typical_rows is not None:
            rows = self._typical_rows
            scores = _on_rows(scores, rows, _apply_typical_p(scores.index_select(0, rows), self._typical_p))
        return scores

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: [B, V], one row per request in batch order.

        Returns (next_ids [B] int64, logprobs [B, V] float32 = log_softmax of the processed scores), and
        records each chosen id in its row's history.
        """
        scores = self.process(logits)
        logprobs = torch.log_softmax(scores, dim=-1)
        next_ids = scores.argmax(dim=-1)
        if self._sampled_rows is not None:
            rows = self._sampled_rows
            generators = [self._generators[i] for i in rows.tolist()]
            sampled = _draw(logprobs.index_select(0, rows).exp(), generators)
            next_ids = next_ids.index_copy(0, rows, sampled)
        if self._token_counts is not None:
            self._token_counts.record(next_ids)
        return next_ids, logprobs

    def filter(self, keep: Sequence[int]) -> NextTokenChooser:
        """The chooser of the rows `keep` (indices into this one), in that order."""
        keep = list(keep)
        for index in keep:
            if not 0 <= index < len(self):
                raise ValueError(f"row index {index} out of range for a batch of {len(self)}")
        if len(set(keep)) != len(keep):
            raise ValueError(f"row indices must be unique, got {keep}")
        token_counts = None
        if self._token_counts is not None:
            rows = torch.tensor(keep, dtype=torch.int64, device=self.device)
            token_counts = self._token_counts.select(rows)
        return NextTokenChooser(
            [self.params[i] for i in keep],
            [self._generators[i] for i in keep],
            token_counts,
            self.vocab_size,
            self.device,
        )

    @classmethod
    def concatenate(cls, choosers: Sequence[NextTokenChooser]) -> NextTokenChooser:
        """One chooser with the rows of all, in order."""
        if not choosers:
            raise ValueError("cannot concatenate an empty list of choosers")
        vocab_size, device = choosers[0].vocab_size, choosers[0].device
        for chooser in choosers:
            if chooser.vocab_size != vocab_size or chooser.device != device:
                raise ValueError(
                    f"cannot concatenate a chooser for vocab {chooser.vocab_size} on {chooser.device} "
                    f"with one for vocab {vocab_size} on {device}"
                )
        token_counts = None
        if any(chooser._token_counts is not None for chooser in choosers):
            parts = [
                chooser._token_counts or _TokenCounts.uncounted(len(chooser), vocab_size, device)
                for chooser in choosers
            ]
            token_counts = _TokenCounts(
                torch.cat([part.counts for part in parts]), torch.cat([part.lengths for part in parts])
            )
        return cls(
            [p for chooser in choosers for p in chooser.params],
            [g for chooser in choosers for g in chooser._generators],
            token_counts,
            vocab_size,
            device,
        )


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
