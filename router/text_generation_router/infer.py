"""`Infer`: the loop that runs the scheduler's plans on the shards, and what the front ends call.

    async with contextlib.aclosing(state.infer.stream(request)) as stream:   # OverloadedError raised here
        async for item in stream:                                            # StreamToken, ..., the last with .end
            ...

The loop is the only I/O around the planner. It keeps STEPS_IN_FLIGHT steps at the shards: the next step is
planned and sent before the last one has answered, so the shards go from one step to the next while the router
applies and streams the results of the one before (the scheduler's plans allow for it; the shards run a
router's steps in `step_id` order):

    while True:
        while fewer than STEPS_IN_FLIGHT steps are out and (plan := scheduler.schedule()) is not None:
            send plan.to_pb() to every rank                 # one forward each
        wait for the oldest step's answer (with room for one more, a request that arrives or leaves wakes it)
        outputs = scheduler.update(oldest plan, its answer)  # or scheduler.fail(plan, error)
        deliver outputs to the requests' streams             # after a failed step, pause before planning again

`stream()` takes a concurrency slot and queues the request at once: it raises OverloadedError (or
GenerationError for a request that can never fit the KV cache) before any iteration. Closing the iterator
early, cancelling the task that iterates it, or dropping it cancels the request; its KV blocks are let go with
the next plan. Request metrics (tgi_request_*) are the front ends' to record; StreamEnd carries queue_s and
inference_s.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loguru import logger

from text_generation_router import metrics
from text_generation_router.scheduler import Output, Scheduler, Sequence, StepPlan
from text_generation_router.tracing import RequestTracer
from text_generation_router.types import (
    GenerationError,
    GenerationRequest,
    OverloadedError,
    RouterError,
    SamplingParams,
    StreamEnd,
    StreamToken,
)


# Two: one step running at the shards, the next one waiting there; more would only plan further ahead of what
# is known, since the router's work for a step is far shorter than the step. Measured on the 2-core AVX-512
# machine against one at a time, bfloat16 small preset: with the shard on one core and the router on the other,
# 21.5-25.8 against 26.4-30.6 ms a token at 1 stream, 245-295 against 217-255 tokens/s at 32. With all of them
# sharing both cores the router's work takes the shard's CPU instead: bfloat16 within the host's noise, float32
# 29.6-31.4 against 27.4-28.4 tokens/s at 1 stream.
STEPS_IN_FLIGHT = 2

# After a failed step the loop pauses before it plans again: with the shards gone (until the launcher stops the
# router) every step fails at once, and the releases of a failed step are due again, so without a pause the
# loop would re-send them as fast as they fail. The pause doubles with each failure in a row, up to the longest;
# an answered step ends it.
FIRST_PAUSE_AFTER_FAILURE_S = 0.05
LONGEST_PAUSE_AFTER_FAILURE_S = 1.0

# token id 0 is valid in every vocabulary; the probe's text is never decoded for a client
HEALTH_PROBE = GenerationRequest(
    input_ids=(0,), parameters=SamplingParams(), max_new_tokens=1, ignore_eos_token=True
)


@dataclass
class _SentStep:
    plan: StepPlan
    call: asyncio.Future  # the shards' answer
    spans: list  # its trace spans
    sent_at: float  # time.monotonic()


class _Stream:
    """The async iterator `Infer.stream` returns."""

    def __init__(self, infer: Infer, seq: Sequence):
        self._infer = infer
        self._seq = seq
        self._closed = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> StreamToken:
        if self._closed:
            raise StopAsyncIteration
        try:
            item = await self._seq.stream.get()
        except BaseException:  # cancelled while waiting: the client is gone
            self._close(cancel=True)
            raise
        if isinstance(item, BaseException):
            self._close(cancel=False)
            raise item
        if item.end is not None:
            self._close(cancel=False)
        return item

    async def aclose(self) -> None:
        self._close(cancel=True)

    def _close(self, cancel: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if cancel:
            self._infer.cancel(self._seq)
        self._infer._release()

    def __del__(self) -> None:
        if not self._closed:
            try:
                self._close(cancel=True)
            except Exception:  # noqa: BLE001 - interpreter shutdown, closed loop
                pass


class Infer:
    def __init__(
        self, scheduler: Scheduler, client, max_concurrent_requests: int, tracer: RequestTracer | None = None
    ):
        self.scheduler = scheduler
        self.tracer = tracer if tracer is not None else RequestTracer()  # disabled unless given one
        self.client = client  # anything with `async step(pb.StepRequest)` and `async health()`
        self.max_concurrent_requests = max_concurrent_requests
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._step_ids = itertools.count(1)  # the shards run the steps in this order (they were cleared at start)
        self._last_answer = 0.0  # time.monotonic() of the last step's answer
        self.step_failed = False  # a step failed since the last health check that went through the shards
        self._failures_in_a_row = 0  # steps that failed since the last answered one

    # ----- the loop -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="infer-loop")

    async def stop(self) -> None:
        """Stop the loop; every request still waiting or running fails."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._deliver(self.scheduler.shutdown(GenerationError("the server is shutting down")))

    async def _run(self) -> None:
        in_flight: deque[_SentStep] = deque()  # in the order they were planned
        try:
            while True:
                try:
                    while len(in_flight) < STEPS_IN_FLIGHT and (plan := self.scheduler.schedule()) is not None:
                        in_flight.append(self._send(plan))
                    if not await self._answer_or_wake(in_flight):
                        continue  # woken: a request arrived or left, plan again
                    outputs = await self._answered(in_flight.popleft())
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the loop must survive anything; fail what was running
                    logger.opt(exception=e).error(f"scheduler error: {type(e).__name__}: {e}")
                    self.step_failed = True
                    # the steps still out are answered as usual: their requests have ended, so nothing is applied
                    outputs = self.scheduler.shutdown(GenerationError(f"internal router error: {type(e).__name__}: {e}"))
                self._deliver(outputs)
                await asyncio.sleep(self._pause_s())  # the front ends read what was delivered (see _pause_s)
        finally:  # stopped: the requests of the steps still out are failed by stop()
            for sent in in_flight:
                sent.call.cancel()

    async def _answer_or_wake(self, in_flight: deque[_SentStep]) -> bool:
        """Wait until the oldest step out has answered (True) or, with room for one more, a request arrives or
        leaves (False)."""
        self._wake.clear()
        if len(in_flight) == STEPS_IN_FLIGHT:
            await asyncio.wait([in_flight[0].call])
            return True
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            oldest = [in_flight[0].call] if in_flight else []
            await asyncio.wait([woken, *oldest], return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
        return bool(in_flight) and in_flight[0].call.done()

    def _pause_s(self) -> float:
        """Seconds before the loop plans again: none after an answered step, else the pause after failures."""
        if not self._failures_in_a_row:
            return 0.0
        return min(FIRST_PAUSE_AFTER_FAILURE_S * 2 ** (self._failures_in_a_row - 1), LONGEST_PAUSE_AFTER_FAILURE_S)

    def _send(self, plan: StepPlan) -> _SentStep:
        """Start one plan on the shards (every rank); its answer is awaited by `_answered`."""
        metrics.batch_inference_count.labels(plan.kind).inc()
        request = plan.to_pb()
        request.step_id = next(self._step_ids)
        spans = self.tracer.step_started(plan.chunks)
        call = asyncio.ensure_future(self.client.step(request))
        return _SentStep(plan, call, spans, time.monotonic())

    async def _answered(self, sent: _SentStep) -> list[Output]:
        """A sent plan's answer applied, with TGI's batch metrics; the outputs for the streams."""
        method = sent.plan.kind
        try:
            response = await sent.call
        except Exception as e:  # noqa: BLE001 - anything from the transport fails the step's requests
            metrics.batch_inference_failure.labels(method).inc()
            self.step_failed = True
            self._failures_in_a_row += 1
            error = e if isinstance(e, RouterError) else GenerationError(f"{type(e).__name__}: {e}")
            logger.error(f"step failed ({len(sent.plan.chunks)} requests): {error}")
            self.tracer.step_ended(sent.spans, error)
            return self.scheduler.fail(sent.plan, error)
        self.tracer.step_ended(sent.spans)
        self._failures_in_a_row = 0
        now = time.monotonic()
        # from when the shards could start it: its sending, or the answer of the step it waited behind
        started, self._last_answer = max(sent.sent_at, self._last_answer), now
        metrics.batch_inference_success.labels(method).inc()
        metrics.batch_inference_duration.labels(method).observe(now - started)
        if response.forward_ns:
            metrics.batch_forward_duration.labels(method).observe(response.forward_ns / 1e9)
            metrics.batch_decode_duration.labels(method).observe(response.decode_ns / 1e9)
        return self.scheduler.update(sent.plan, response)

    def _deliver(self, outputs: list[Output]) -> None:
        for seq, item in outputs:
            if isinstance(item, BaseException):
                self.tracer.ended(seq.id, "error", seq.generated, error=item)
            elif item.end is not None:
                self.tracer.ended(seq.id, item.end.finish_reason, item.end.generated_tokens)
            if seq.stream is not None and not seq.cancelled:
                seq.stream.put_nowait(item)

    # ----- for the front ends ---------------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamToken]:
        if self.active >= self.max_concurrent_requests:
            raise OverloadedError()
        seq = self.scheduler.submit(request)  # GenerationError when it can never fit
        seq.stream = asyncio.Queue()
        self.tracer.submitted(seq.id, len(request.input_ids), request.max_new_tokens)
        self.active += 1
        self._idle.clear()
        self._wake.set()
        return _Stream(self, seq)

    def cancel(self, seq: Sequence) -> None:
        self.tracer.ended(seq.id, "cancelled", seq.generated)
        self.scheduler.cancel(seq)
        self._wake.set()

    async def generate(self, request: GenerationRequest) -> tuple[list[StreamToken], StreamEnd]:
        tokens: list[StreamToken] = []
        stream = self.stream(request)
        try:
            async for item in stream:
                tokens.append(item)
                if item.end is not None:
                    return tokens, item.end
        finally:
            await stream.aclose()
        raise RuntimeError("the stream ended without a final token")

    async def health(self) -> bool:
        """TGI's health check: the shards answer Health and, if a step failed since the last check, a one-token
        generation goes through them (scheduled like any request) before the server counts as healthy again."""
        try:
            await self.client.health()
            if self.step_failed:
                await self.generate(HEALTH_PROBE)
                self.step_failed = False
            return True
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy; logged, answered 503
            logger.warning(f"health check failed: {type(e).__name__}: {e}")
            return False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (graceful shutdown); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _release(self) -> None:
        self.active -= 1
        if self.active <= 0:
            self.active = 0
            self._idle.set()
