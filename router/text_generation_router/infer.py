"""`Infer`: what the front ends call to run a validated request (see types.py for the flow).

    async with contextlib.aclosing(state.infer.stream(request)) as stream:   # OverloadedError raised here
        async for item in stream:                                            # StreamToken ..., StreamEnd
            ...

`stream()` takes a concurrency slot and queues the request at once: it raises OverloadedError (or
GenerationError for a request that can never fit the KV cache) before any iteration. Closing the iterator
early, cancelling the task that iterates it, or dropping it cancels the request; its KV blocks are freed
within one scheduler step. Request metrics (tgi_request_*) are the front ends' to record; StreamEnd carries
queue_s and inference_s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from text_generation_router.scheduler import Entry, Scheduler
from text_generation_router.types import GenerationRequest, OverloadedError, StreamEnd, StreamToken


class _Stream:
    """The async iterator `Infer.stream` returns."""

    def __init__(self, infer: Infer, entry: Entry):
        self._infer = infer
        self._entry = entry
        self._closed = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> StreamToken | StreamEnd:
        if self._closed:
            raise StopAsyncIteration
        try:
            item = await self._entry.stream.get()
        except BaseException:  # cancelled while waiting: the client is gone
            self._close(cancel=True)
            raise
        if isinstance(item, BaseException):
            self._close(cancel=False)
            raise item
        if isinstance(item, StreamEnd):
            self._close(cancel=False)
        return item

    async def aclose(self) -> None:
        self._close(cancel=True)

    def _close(self, cancel: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if cancel:
            self._infer.scheduler.cancel(self._entry)
        self._infer._release()

    def __del__(self) -> None:
        if not self._closed:
            try:
                self._close(cancel=True)
            except Exception:  # noqa: BLE001 - interpreter shutdown, closed loop
                pass


class Infer:
    def __init__(self, scheduler: Scheduler, max_concurrent_requests: int):
        self.scheduler = scheduler
        self.max_concurrent_requests = max_concurrent_requests
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.health_check = None  # async callable (the shards' Health), set by the CLI

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamToken | StreamEnd]:
        if self.active >= self.max_concurrent_requests:
            raise OverloadedError()
        entry = self.scheduler.submit(request)  # GenerationError when it can never fit
        self.active += 1
        self._idle.clear()
        return _Stream(self, entry)

    async def generate(self, request: GenerationRequest) -> tuple[list[StreamToken], StreamEnd]:
        tokens: list[StreamToken] = []
        stream = self.stream(request)
        try:
            async for item in stream:
                if isinstance(item, StreamEnd):
                    return tokens, item
                tokens.append(item)
        finally:
            await stream.aclose()
        raise RuntimeError("the stream ended without a StreamEnd")

    async def health(self) -> bool:
        """True when the shards answer Health (or there is nothing to ask)."""
        if self.health_check is None:
            return True
        try:
            await self.health_check()
            return True
        except Exception:  # noqa: BLE001
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
