"""The per-request metrics a front end records (TGI's names), shared by the HTTP and public gRPC front ends.

`Validation` records the validation duration, input length and max_new_tokens itself; a front end calls
`started()` once per request, then either `succeeded(end, total_s)` or `failed(error)` (`RequestGroup` does
that for the HTTP routes).
"""

from __future__ import annotations

import time

from . import metrics
from .types import RouterError, StreamEnd

# error_type -> the `err` label TGI uses
_ERR_LABELS = {
    "validation": "validation",
    "overloaded": "overloaded",
    "generation": "generation",
    "incomplete_generation": "incomplete",
    "incomplete_generation_stream": "incomplete",
    "template_error": "template",
    "missing_template_variable": "template",
    "tool_error": "validation",
}


def started() -> None:
    metrics.request_count.inc()


def failed(error: RouterError) -> None:
    metrics.request_failure.labels(err=_ERR_LABELS.get(error.error_type, error.error_type)).inc()


def dropped() -> None:
    """The client went away before the end (its request was cancelled)."""
    metrics.request_failure.labels(err="dropped").inc()


def succeeded(end: StreamEnd, total_s: float) -> None:
    metrics.request_success.inc()
    metrics.request_duration.observe(total_s)
    metrics.request_queue_duration.observe(end.queue_s)
    metrics.request_inference_duration.observe(end.inference_s)
    if end.generated_tokens > 0:
        metrics.request_mean_time_per_token_duration.observe(end.inference_s / end.generated_tokens)
    metrics.request_generated_tokens.observe(end.generated_tokens)


class RequestGroup:
    """The request metrics of one API call: one request per prompt (its n choices or best_of candidates count
    as one, as best_of does in TGI). Each is counted when it starts and ends exactly once, as a success, a
    failure or (a client gone, the group closed early) a drop. A call starts as one request and `grow`s once
    validation knows how many prompts it has."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.open = 1
        started()

    def grow(self, prompts: int) -> None:
        """The call has `prompts` requests in all."""
        for _ in range(prompts - 1):
            started()
        self.open += prompts - 1

    def succeeded(self, end: StreamEnd) -> None:
        assert self.open > 0, "more ends than requests"
        self.open -= 1
        succeeded(end, time.perf_counter() - self.start)

    def failed(self, error: RouterError) -> None:
        """Every request still open failed with `error`."""
        for _ in range(self.open):
            failed(error)
        self.open = 0

    def close(self) -> None:
        """Every request still open was dropped."""
        for _ in range(self.open):
            dropped()
        self.open = 0
