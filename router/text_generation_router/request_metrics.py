"""The per-request metrics a front end records (TGI's names), shared by the HTTP and public gRPC front ends.

`Validation` records the validation duration, input length and max_new_tokens itself; a front end calls
`started()` once per generation request, then either `succeeded(end, total_s)` or `failed(error)`.
"""

from __future__ import annotations

from . import metrics
from .types import StreamEnd

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


def failed(error: BaseException) -> None:
    error_type = getattr(error, "error_type", "internal")
    metrics.request_failure.labels(err=_ERR_LABELS.get(error_type, error_type)).inc()


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
