"""Small statistics helpers shared by every phase."""

from __future__ import annotations

import statistics


def percentile(values, q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    values = sorted(values)
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    position = (len(values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return float(values[low] + (values[high] - values[low]) * (position - low))


def median(values) -> float | None:
    values = list(values)
    return float(statistics.median(values)) if values else None


def latency_summary(ttfts: list[float], gaps: list[float], tokens: int, wall: float) -> dict:
    """Throughput (generated tokens / wall time of the phase), TTFT and ITL p50/p90 in milliseconds."""
    return {
        "requests": len(ttfts),
        "generated_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall if wall > 0 else None,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p90_ms": ms(percentile(ttfts, 90)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p90_ms": ms(percentile(gaps, 90)),
    }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def prefill_figures(prompt_tokens: int, seconds: list[float]) -> dict:
    """The prefill workload's figures from the time to the first token of each repeat (their median)."""
    s = median(seconds)
    return {"prefill_tok_s": prompt_tokens / s, "ttft_ms": s * 1000, "prompt_tokens": prompt_tokens,
            "repeats": len(seconds)}
