"""Prometheus metrics with TGI's names and types, in the router's own registry (served at GET /metrics).

The scheduler records batch and queue metrics, the front ends record request metrics. prometheus-client
collects them; `exposition()` writes them out, because the library's own text format renames every counter
sample to `<name>_total` and adds `<name>_created` series, while TGI's exporter does neither: dashboards and
alerts written for TGI query `tgi_request_count`, `tgi_request_failure{err="validation"}` and so on.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry()

# 35 buckets growing 1.5x from 0.15 ms, as TGI's durations
DURATION_BUCKETS = tuple(1.5e-4 * 1.5**i for i in range(35))
TOKEN_BUCKETS = tuple(2**i for i in range(16))

request_count = Counter("tgi_request_count", "Requests received", registry=REGISTRY)
request_success = Counter("tgi_request_success", "Requests that completed", registry=REGISTRY)
request_failure = Counter("tgi_request_failure", "Requests that failed", ["err"], registry=REGISTRY)
request_duration = Histogram("tgi_request_duration", "End-to-end request time (s)", buckets=DURATION_BUCKETS, registry=REGISTRY)
request_validation_duration = Histogram("tgi_request_validation_duration", "Validation time (s)", buckets=DURATION_BUCKETS, registry=REGISTRY)
request_queue_duration = Histogram("tgi_request_queue_duration", "Time in the queue (s)", buckets=DURATION_BUCKETS, registry=REGISTRY)
request_inference_duration = Histogram("tgi_request_inference_duration", "Inference time (s)", buckets=DURATION_BUCKETS, registry=REGISTRY)
request_mean_time_per_token_duration = Histogram("tgi_request_mean_time_per_token_duration", "Mean time per generated token (s)", buckets=DURATION_BUCKETS, registry=REGISTRY)
request_input_length = Histogram("tgi_request_input_length", "Prompt tokens", buckets=TOKEN_BUCKETS, registry=REGISTRY)
request_max_new_tokens = Histogram("tgi_request_max_new_tokens", "max_new_tokens asked", buckets=TOKEN_BUCKETS, registry=REGISTRY)
request_generated_tokens = Histogram("tgi_request_generated_tokens", "Generated tokens", buckets=TOKEN_BUCKETS, registry=REGISTRY)

queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=REGISTRY)
batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch", registry=REGISTRY)
batch_current_max_tokens = Gauge("tgi_batch_current_max_tokens", "Tokens held in the KV cache by the running batch", registry=REGISTRY)
batch_max_total_tokens = Gauge("tgi_batch_max_total_tokens", "KV cache capacity in tokens (after warmup)", registry=REGISTRY)
batch_next_size = Histogram("tgi_batch_next_size", "Requests admitted by a step", buckets=TOKEN_BUCKETS, registry=REGISTRY)
batch_inference_count = Counter("tgi_batch_inference_count", "Shard calls", ["method"], registry=REGISTRY)
batch_inference_success = Counter("tgi_batch_inference_success", "Shard calls that succeeded", ["method"], registry=REGISTRY)
batch_inference_failure = Counter("tgi_batch_inference_failure", "Shard calls that failed", ["method"], registry=REGISTRY)
batch_inference_duration = Histogram("tgi_batch_inference_duration", "Shard call time (s)", ["method"], buckets=DURATION_BUCKETS, registry=REGISTRY)
batch_forward_duration = Histogram("tgi_batch_forward_duration", "Model forward time (s)", ["method"], buckets=DURATION_BUCKETS, registry=REGISTRY)
batch_decode_duration = Histogram("tgi_batch_decode_duration", "Shard time outside the forward: token choice and bookkeeping (s)", ["method"], buckets=DURATION_BUCKETS, registry=REGISTRY)
request_preempted = Counter("tgi_request_preempted", "Running requests preempted for lack of KV blocks (recomputed later)", registry=REGISTRY)

# The KV cache and the prefix cache (not TGI metrics: TGI exposes none for them).
kv_blocks_capacity = Gauge("tgi_kv_blocks_capacity", "KV cache blocks (after warmup)", registry=REGISTRY)
kv_blocks_used = Gauge("tgi_kv_blocks_used", "KV cache blocks held by requests", registry=REGISTRY)
kv_blocks_cached = Gauge("tgi_kv_blocks_cached", "KV cache blocks holding a cached prefix (held or evictable)", registry=REGISTRY)
prefix_cache_queries = Counter("tgi_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=REGISTRY)
prefix_cache_hits = Counter("tgi_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)", registry=REGISTRY)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_line(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {floatToGoString(value)}"
    pairs = ",".join(f'{key}="{_escape(label)}"' for key, label in labels.items())
    return f"{name}{{{pairs}}} {floatToGoString(value)}"


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """`registry` in the Prometheus text format 0.0.4, under TGI's names: a counter's samples carry the
    counter's own name, and no `_created` sample is written."""
    lines = []
    for family in registry.collect():
        help_text = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {family.name} {help_text}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            if sample.name == f"{family.name}_created":
                continue
            name = family.name if family.type == "counter" else sample.name
            lines.append(_sample_line(name, sample.labels, sample.value))
    return ("\n".join(lines) + "\n").encode()
