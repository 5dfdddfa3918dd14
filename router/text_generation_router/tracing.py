"""OpenTelemetry traces of requests, exported over OTLP/gRPC when `--otlp-endpoint` is given.

One trace per request the scheduler runs:

    generate                      from submission to the last token (or the error, or the cancellation)
    ├── queue                     submission → its first step
    └── infer                     first step → end
        ├── prefill               one per step that computes known tokens of it (a prompt chunk), attribute tokens
        └── decode                one per step that generates one token of it

Without an endpoint nothing is set up, `RequestTracer.enabled` is false and every method returns at once: no
span is made.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loguru import logger
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

if TYPE_CHECKING:
    from .scheduler import Chunk

DEFAULT_SERVICE_NAME = "text-generation-inference.router"  # TGI's


class RequestTracer:
    """The spans of every request in flight, keyed by the scheduler's request id."""

    def __init__(self, endpoint: str | None = None, service_name: str = DEFAULT_SERVICE_NAME):
        self.enabled = bool(endpoint)
        self._provider = None
        self._spans: dict[int, tuple[Span, Span | None, Span | None]] = {}  # id -> (generate, queue, infer)
        if not self.enabled:
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        insecure = not endpoint.startswith("https://")
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))
        )
        self._tracer = self._provider.get_tracer("text_generation_router")
        logger.info(f"exporting traces to {endpoint} as {service_name!r}")

    def submitted(self, request_id: int, input_length: int, max_new_tokens: int) -> None:
        if not self.enabled:
            return
        generate = self._tracer.start_span(
            "generate", attributes={"input_length": input_length, "max_new_tokens": max_new_tokens}
        )
        queue = self._tracer.start_span("queue", context=trace.set_span_in_context(generate))
        self._spans[request_id] = (generate, queue, None)

    def step_started(self, chunks: Sequence[Chunk]) -> list[Span]:
        """The step about to run: a "decode" span for each request it gives its next token, a "prefill" span
        for each chunk of known tokens it computes (a prompt, or what a preempted request had generated); the
        spans, for `step_ended`."""
        spans: list[Span] = []
        if not self.enabled:
            return spans
        now = time.time_ns()
        for chunk in chunks:
            seq = chunk.seq
            if seq.id not in self._spans:  # cancelled while planned: its trace has ended
                continue
            generate, queue, infer = self._spans[seq.id]
            if infer is None:
                queue.end(end_time=now)
                infer = self._tracer.start_span(
                    "infer", context=trace.set_span_in_context(generate), start_time=now
                )
                self._spans[seq.id] = (generate, None, infer)
            span = self._tracer.start_span(
                "decode" if chunk.decodes else "prefill",
                context=trace.set_span_in_context(infer),
                start_time=now,
                attributes={"tokens": chunk.num_tokens},
            )
            spans.append(span)
        return spans

    def step_ended(self, spans: list[Span], error: BaseException | None = None) -> None:
        now = time.time_ns()
        for span in spans:
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, str(error)))
            span.end(end_time=now)

    def ended(
        self, request_id: int, outcome: str, generated_tokens: int = 0, error: BaseException | None = None
    ) -> None:
        """The request is over: `outcome` is its finish reason, "error" or "cancelled"."""
        if not self.enabled:
            return
        spans = self._spans.pop(request_id, None)
        if spans is None:
            return
        generate, queue, infer = spans
        for span in (queue, infer):
            if span is not None:
                span.end()
        generate.set_attribute("outcome", outcome)
        generate.set_attribute("generated_tokens", generated_tokens)
        if error is not None:
            generate.set_status(Status(StatusCode.ERROR, str(error)))
        generate.end()

    def shutdown(self) -> None:
        """Export what is left, then stop (at router exit)."""
        if self._provider is not None:
            self._provider.shutdown()
