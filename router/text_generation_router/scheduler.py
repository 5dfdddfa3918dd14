"""Continuous batching: one asyncio task drives the shards (TGI's batching loop, tgi.md §2.9).

    loop:
      wait until the queue has requests
      while batch = next_batch(prefill budget, free KV blocks):
          Prefill(batch)                                 # every new request gets its first token
          waiting_tokens = 1
          while requests are running:
              min_size = None if waiting_tokens >= max_waiting_tokens
                         else floor(running * waiting_served_ratio)
              if new = next_batch(min_size, ...):        # prefilled alone, then decoded with the others
                  Prefill(new); waiting_tokens = 1
              grow block tables (DecodeRequest.extensions), preempting when the cache is full
              Decode(running batches)                    # the shard concatenates several batches
              waiting_tokens += 1

After every Prefill/Decode each generation goes to its request's stream; finished, cancelled and
router-stopped requests leave (FilterBatch, or ClearCache when none remain) and their blocks are freed.

KV blocks are allocated lazily: a new request gets blocks for its prompt only; before each Decode a request
whose next position (its length - 1) has no block gets one through `DecodeRequest.extensions`. When the cache
has no block left for that, the most recently admitted running requests are preempted: filtered out of their
batch, their blocks freed, and queued again at the front with prompt = original prompt + tokens generated so
far and max_new_tokens = what remains. Their streams just continue; the final StreamEnd counts every token.

Torch-free: the shard is anything with ShardedClient's async methods (`prefill`, `decode`, `filter_batch`,
`clear_cache`), answering with `generate_pb2` messages.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

from loguru import logger

from text_generation_router import metrics
from text_generation_router.allocator import BlockAllocator
from text_generation_router.types import (
    GenerationError,
    GenerationRequest,
    RouterError,
    StreamEnd,
    StreamToken,
    Token,
)
from text_generation_server.pb import generate_pb2 as pb

FINISH_REASONS = {0: "length", 1: "eos_token", 2: "stop_sequence"}


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_prefill_tokens: int = 4096
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20


@dataclass(eq=False)
class Entry:
    """One request's life in the router: queued, running, maybe preempted and queued again, then done."""

    id: int  # shard request id (kept across preemptions: the shard forgets it when it is filtered out)
    request: GenerationRequest
    stream: asyncio.Queue  # StreamToken, then StreamEnd or an exception
    queued_at: float
    prompt: tuple[int, ...]  # what the next prefill sends: the original prompt + tokens generated before
    generated_ids: list[int] = field(default_factory=list)
    generated_texts: list[str] = field(default_factory=list)
    generated_special: list[bool] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    started_at: float | None = None  # first prefill
    admitted_seq: int = 0  # larger: admitted more recently (preempted first)
    preemptions: int = 0
    cancelled: bool = False
    done: bool = False
    text_tail: str = ""  # the end of the streamed text, for stop sequences across a preemption

    @property
    def length(self) -> int:
        """Tokens of the sequence so far (prompt + generated); the next Decode writes position length - 1."""
        return len(self.request.input_ids) + len(self.generated_ids)

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.generated_ids)


class Scheduler:
    def __init__(
        self,
        client,
        allocator: BlockAllocator,
        config: SchedulerConfig = SchedulerConfig(),
        tokenizer=None,
    ):
        self.client = client
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.config = config
        self.tokenizer = tokenizer  # decode(ids, skip_special_tokens=True) for preempted requests' final text
        self._queue: deque[Entry] = deque()
        self._running: dict[int, Entry] = {}  # request id -> entry, for every request the shards hold
        self._batches: list[pb.CachedBatch] = []  # the shards' batches, decoded together
        self._request_ids = itertools.count()
        self._batch_ids = itertools.count()
        self._admissions = itertools.count(1)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.stats = {
            "prefill": 0,
            "decode": 0,
            "filter": 0,
            "clear": 0,
            "preempted": 0,
            "failed": 0,
            "max_running": 0,
            "concat": 0,
        }
        metrics.batch_max_total_tokens.set(allocator.capacity_tokens)

    # ----- public ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for entry in [*self._queue, *self._running.values()]:
            self._fail(entry, GenerationError("the server is shutting down"))
        self._queue.clear()

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    @property
    def running_size(self) -> int:
        return len(self._running)

    def blocks_needed(self, request: GenerationRequest) -> int:
        """Blocks a request holds at its longest: every position a step writes (the last token is not fed back)."""
        return self.allocator.blocks_for(len(request.input_ids) + request.max_new_tokens - 1)

    def submit(self, request: GenerationRequest) -> Entry:
        """Queue a request; its stream gets StreamTokens, then a StreamEnd (or an exception)."""
        if not request.input_ids:
            raise GenerationError("the prompt is empty")
        if request.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        need = self.blocks_needed(request)
        if need > self.allocator.num_blocks:
            raise GenerationError(
                f"the request needs {need} KV blocks of {self.block_size} tokens "
                f"({len(request.input_ids)} prompt + {request.max_new_tokens} new tokens) but the KV cache only "
                f"has {self.allocator.num_blocks} blocks ({self.allocator.capacity_tokens} tokens): it can never run"
            )
        entry = Entry(
            id=next(self._request_ids),
            request=request,
            stream=asyncio.Queue(),
            queued_at=time.monotonic(),
            prompt=tuple(request.input_ids),
        )
        self._queue.append(entry)
        metrics.queue_size.set(len(self._queue))
        self._wake.set()
        return entry

    def cancel(self, entry: Entry) -> None:
        """The client went away: a queued request leaves now, a running one at the end of the current step."""
        if entry.done or entry.cancelled:
            return
        entry.cancelled = True
        if entry.id not in self._running:
            try:
                self._queue.remove(entry)
            except ValueError:
                pass
            entry.done = True
            metrics.queue_size.set(len(self._queue))
        self._wake.set()

    # ----- the loop -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self._serve_queue()
                if self._queue and not self._running:
                    # nothing fits although nothing runs (should not happen): wait for news instead of spinning
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), 0.05)
                    except asyncio.TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the loop must survive anything; fail what was running
                logger.opt(exception=e).error(f"scheduler error: {type(e).__name__}: {e}")
                await self._fail_all_running(GenerationError(f"internal router error: {type(e).__name__}: {e}"))
            await asyncio.sleep(0)

    async def _serve_queue(self) -> None:
        while True:
            batch = self._next_batch(min_size=None)
            if batch is None:
                return
            await self._prefill(batch)
            waiting_tokens = 1
            while self._running:
                running = len(self._running)
                if waiting_tokens >= self.config.max_waiting_tokens:
                    min_size, reason = None, "wait_exceeded"
                else:
                    min_size, reason = math.floor(running * self.config.waiting_served_ratio), "backpressure"
                new = self._next_batch(min_size=min_size)
                if new is not None:
                    metrics.batch_concat.labels(reason).inc()
                    self.stats["concat"] += 1
                    await self._prefill(new)
                    waiting_tokens = 1
                if not self._running:
                    break
                extensions = await self._grow_blocks()
                if not self._running:
                    break
                await self._decode(extensions)
                waiting_tokens += 1

    # ----- batches --------------------------------------------------------------------------------------

    def _growth_reserve(self) -> int:
        """Blocks the running requests need before their next Decode."""
        return sum(max(self.allocator.blocks_for(e.length) - len(e.blocks), 0) for e in self._running.values())

    def _next_batch(self, min_size: int | None) -> list[Entry] | None:
        """FIFO: take queued requests while the prefill budget and the free blocks allow; the first that does
        not fit stops the batch (nothing is skipped over)."""
        while self._queue and self._queue[0].cancelled:
            self._queue.popleft().done = True
        if not self._queue:
            return None
        if min_size is not None and len(self._queue) < min_size:
            return None
        budget = self.config.max_batch_prefill_tokens
        free = self.allocator.free_blocks - self._growth_reserve()
        chosen: list[Entry] = []
        tokens = blocks = 0
        for entry in self._queue:
            if entry.cancelled:
                continue
            length = len(entry.prompt)
            # blocks for the prompt and for the first Decode's position (when there is one)
            need = self.allocator.blocks_for(length + (1 if entry.remaining > 1 else 0))
            if chosen and tokens + length > budget:
                break
            if blocks + need > free:
                break
            chosen.append(entry)
            tokens += length
            blocks += need
        if not chosen or (min_size is not None and len(chosen) < min_size):
            return None
        chosen_set = set(map(id, chosen))
        self._queue = deque(e for e in self._queue if id(e) not in chosen_set and not e.cancelled)
        metrics.queue_size.set(len(self._queue))
        for entry in chosen:
            entry.blocks = self.allocator.allocate(self.allocator.blocks_for(len(entry.prompt)))
            assert entry.blocks is not None, "free blocks were counted before"
        return chosen

    def _request_pb(self, entry: Entry) -> pb.Request:
        r, p = entry.request, entry.request.parameters
        return pb.Request(
            id=entry.id,
            input_ids=entry.prompt,
            parameters=pb.NextTokenChooserParameters(
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                typical_p=p.typical_p,
                do_sample=p.do_sample,
                seed=p.seed,
                repetition_penalty=p.repetition_penalty,
                frequency_penalty=p.frequency_penalty,
            ),
            stopping_parameters=pb.StoppingCriteriaParameters(
                max_new_tokens=entry.remaining,
                stop_sequences=r.stop_sequences,
                ignore_eos_token=r.ignore_eos_token,
            ),
            prefill_logprobs=r.prefill_logprobs and entry.preemptions == 0,
            top_n_tokens=r.top_n_tokens,
            blocks=entry.blocks,
        )

    async def _prefill(self, entries: list[Entry]) -> None:
        batch_id = next(self._batch_ids)
        now = time.monotonic()
        for entry in entries:
            entry.admitted_seq = next(self._admissions)
            if entry.started_at is None:
                entry.started_at = now
            self._running[entry.id] = entry
        metrics.batch_next_size.observe(len(entries))
        self.stats["max_running"] = max(self.stats["max_running"], len(self._running))
        batch = pb.Batch(id=batch_id, requests=[self._request_pb(e) for e in entries])
        result = await self._call("prefill", self.client.prefill(batch), failing=entries, clear=[batch_id])
        if result is None:
            return
        self.stats["prefill"] += 1
        stepped = [batch.id]
        await self._after_step(result, stepped)

    async def _decode(self, extensions: dict[int, list[int]]) -> None:
        batches = list(self._batches)
        entries = list(self._running.values())
        result = await self._call(
            "decode", self.client.decode(batches, extensions), failing=entries, clear=[b.id for b in batches]
        )
        if result is None:
            return
        self.stats["decode"] += 1
        await self._after_step(result, [b.id for b in batches])

    async def _call(self, method: str, call, failing: list[Entry], clear: list[int]):
        """A Prefill/Decode with its metrics; on error the requests of its batches fail and the batches are
        cleared on the shards. None on error."""
        metrics.batch_inference_count.labels(method).inc()
        start = time.monotonic()
        try:
            result = await call
        except RouterError as e:
            metrics.batch_inference_failure.labels(method).inc()
            logger.error(f"{method} failed: {e}")
            await self._drop_batches(clear, failing, e)
            return None
        except Exception as e:  # noqa: BLE001 - anything from the transport is a generation error
            metrics.batch_inference_failure.labels(method).inc()
            logger.opt(exception=e).error(f"{method} failed: {type(e).__name__}: {e}")
            await self._drop_batches(clear, failing, GenerationError(f"{method} failed: {type(e).__name__}: {e}"))
            return None
        metrics.batch_inference_success.labels(method).inc()
        metrics.batch_inference_duration.labels(method).observe(time.monotonic() - start)
        if getattr(result, "forward_ns", 0):
            metrics.batch_forward_duration.labels(method).observe(result.forward_ns / 1e9)
        if getattr(result, "decode_ns", 0):
            metrics.batch_decode_duration.labels(method).observe(result.decode_ns / 1e9)
        return result

    async def _drop_batches(self, batch_ids: list[int], entries: list[Entry], error: Exception) -> None:
        """Fail `entries` and forget `batch_ids` on the shards (errors while clearing are only logged)."""
        for entry in entries:
            self._fail(entry, error)
        dropped = set(batch_ids)
        self._batches = [b for b in self._batches if b.id not in dropped]
        for batch_id in batch_ids:
            try:
                await self.client.clear_cache(batch_id)
                self.stats["clear"] += 1
            except Exception as e:  # noqa: BLE001
                logger.warning(f"ClearCache({batch_id}) after an error failed too: {e}")
        self._update_gauges()

    async def _after_step(self, result, stepped: list[int]) -> None:
        """Forward generations, then drop finished/cancelled requests from the batch the step produced."""
        for generation in result.generations:
            entry = self._running.get(generation.request_id)
            if entry is not None and not entry.done:
                self._forward(entry, generation)
        stepped_set = set(stepped)
        self._batches = [b for b in self._batches if b.id not in stepped_set]
        if result.batch is not None:
            self._batches.append(result.batch)
        # the requests the shards still hold
        held: set[int] = set()
        for batch in self._batches:
            held.update(batch.request_ids)
        for rid in [rid for rid in self._running if rid not in held]:
            entry = self._running.pop(rid)
            self._release(entry)
            if not entry.done:  # the shard dropped a request without telling why
                self._fail(entry, GenerationError(f"the shard dropped request {rid} without finishing it"))
        await self._filter()

    async def _filter(self, also_remove: set[int] = frozenset()) -> None:
        """FilterBatch (or ClearCache) every batch holding a finished, cancelled or removed request."""
        kept_batches = []
        for batch in self._batches:
            ids = list(batch.request_ids)
            keep = [
                rid for rid in ids
                if rid in self._running
                and not (self._running[rid].done or self._running[rid].cancelled)
                and rid not in also_remove
            ]
            if len(keep) == len(ids):
                kept_batches.append(batch)
                continue
            removed = [self._running.pop(rid) for rid in ids if rid not in keep and rid in self._running]
            start = time.monotonic()
            try:
                if keep:
                    filtered = await self.client.filter_batch(batch.id, keep)
                    self.stats["filter"] += 1
                else:
                    await self.client.clear_cache(batch.id)
                    self.stats["clear"] += 1
                    filtered = None
            except Exception as e:  # noqa: BLE001
                error = e if isinstance(e, RouterError) else GenerationError(f"FilterBatch failed: {e}")
                logger.error(f"FilterBatch({batch.id}) failed: {error}")
                # every request of the batch fails (a preempted one too); _fail frees blocks, skips done ones
                for entry in [*removed, *(self._running.pop(rid) for rid in keep if rid in self._running)]:
                    self._release(entry)
                    self._fail(entry, error)
                try:
                    await self.client.clear_cache(batch.id)
                except Exception:  # noqa: BLE001
                    pass
                continue
            metrics.batch_filter_duration.labels("filter" if keep else "clear").observe(time.monotonic() - start)
            for entry in removed:
                self._release(entry)
                if entry.cancelled:
                    entry.done = True
            if filtered is not None:
                kept_batches.append(filtered)
        self._batches = kept_batches
        self._update_gauges()

    # ----- KV blocks ------------------------------------------------------------------------------------

    async def _grow_blocks(self) -> dict[int, list[int]]:
        """One more block for every running request whose next position has none, preempting the most
        recently admitted requests while the cache cannot hold them all. Returns the Decode extensions."""
        def needs() -> dict[int, int]:
            out = {}
            for entry in self._running.values():
                n = self.allocator.blocks_for(entry.length) - len(entry.blocks)
                if n > 0:
                    out[entry.id] = n
            return out

        need = needs()
        victims: list[Entry] = []

        def shortfall() -> int:
            # a victim's blocks come back and it needs nothing any more
            return sum(need.values()) - self.allocator.free_blocks - sum(len(v.blocks) for v in victims)

        while shortfall() > 0 and len(victims) < len(self._running) - 1:
            victim = max((e for e in self._running.values() if e not in victims), key=lambda e: e.admitted_seq)
            victims.append(victim)
            need.pop(victim.id, None)
        if victims:
            await self._preempt(victims)
            need = needs()
        if sum(need.values()) > self.allocator.free_blocks:
            # one request alone does not fit: submit() refuses those, so this is a bug; fail it clearly
            for rid in list(need):
                entry = self._running.get(rid)
                if entry is not None:
                    self._fail(entry, GenerationError(
                        f"no KV block left for request {rid} at position {entry.length - 1}"
                    ))
            await self._filter()
            need = needs()
        extensions = {}
        for rid, n in need.items():
            blocks = self.allocator.allocate(n)
            assert blocks is not None
            self._running[rid].blocks.extend(blocks)
            extensions[rid] = blocks
        self._update_gauges()
        return extensions

    async def _preempt(self, victims: list[Entry]) -> None:
        ids = {v.id for v in victims}
        for victim in victims:
            logger.info(
                f"preempting request {victim.id} ({victim.length} tokens, {len(victim.generated_ids)} generated, "
                f"{len(victim.blocks)} blocks): the KV cache is full"
            )
            metrics.request_preempted.inc()
            self.stats["preempted"] += 1
        # filter them out of their batches; _filter frees their blocks
        await self._filter(also_remove=ids)
        # newest victim first in `victims`: queue them at the front so the oldest ends up first
        for victim in victims:
            if victim.done or victim.cancelled:
                continue
            victim.preemptions += 1
            victim.prompt = tuple(victim.request.input_ids) + tuple(victim.generated_ids)
            self._queue.appendleft(victim)
        metrics.queue_size.set(len(self._queue))

    def _release(self, entry: Entry) -> None:
        if entry.blocks:
            self.allocator.free(entry.blocks)
            entry.blocks = []

    # ----- streams --------------------------------------------------------------------------------------

    def _forward(self, entry: Entry, generation: pb.Generation) -> None:
        tokens = generation.tokens
        token_id = tokens.ids[0]
        text = tokens.texts[0] if tokens.texts else ""
        token = Token(
            id=token_id,
            text=text,
            logprob=_logprob(tokens.logprobs[0]) if tokens.logprobs else None,
            special=bool(tokens.is_special[0]) if tokens.is_special else False,
        )
        top = tuple(_tokens(generation.top_tokens)) if generation.HasField("top_tokens") else ()
        prefill = None
        if generation.HasField("prefill_tokens") and generation.prefill_tokens.ids:
            prefill = tuple(_tokens(generation.prefill_tokens))
        entry.generated_ids.append(token_id)
        entry.generated_texts.append(text)
        entry.generated_special.append(token.special)
        if not entry.cancelled:
            entry.stream.put_nowait(StreamToken(token=token, top_tokens=top, prefill=prefill))

        finish = None
        seed = None
        shard_text = None
        if generation.HasField("generated_text"):
            g = generation.generated_text
            finish = FINISH_REASONS.get(g.finish_reason, "length")
            seed = g.seed if g.HasField("seed") else None
            shard_text = g.text
        elif entry.preemptions and entry.request.stop_sequences:
            # the shard's stop-sequence window restarted at the re-prefill: check across the boundary here
            window = entry.text_tail + text
            if any(stop in window for stop in entry.request.stop_sequences):
                finish = "stop_sequence"
                if entry.request.parameters.do_sample:
                    seed = entry.request.parameters.seed
        longest = max((len(s) for s in entry.request.stop_sequences), default=0)
        entry.text_tail = (entry.text_tail + text)[-max(longest - 1, 0):] if longest > 1 else ""
        if finish is None:
            return
        if entry.preemptions == 0 and shard_text is not None:
            generated_text = shard_text
        elif self.tokenizer is not None:
            generated_text = self.tokenizer.decode(entry.generated_ids, skip_special_tokens=True)
        else:
            generated_text = "".join(t for t, s in zip(entry.generated_texts, entry.generated_special) if not s)
        now = time.monotonic()
        started = entry.started_at if entry.started_at is not None else now
        end = StreamEnd(
            generated_text=generated_text,
            finish_reason=finish,
            generated_tokens=len(entry.generated_ids),
            seed=seed,
            input_length=len(entry.request.input_ids),
            queue_s=started - entry.queued_at,
            inference_s=now - started,
        )
        entry.done = True
        if not entry.cancelled:
            entry.stream.put_nowait(end)

    def _fail(self, entry: Entry, error: Exception) -> None:
        if entry.done:
            return
        entry.done = True
        self.stats["failed"] += 1
        self._running.pop(entry.id, None)
        self._release(entry)
        if not entry.cancelled:
            entry.stream.put_nowait(error)

    async def _fail_all_running(self, error: Exception) -> None:
        entries = list(self._running.values())
        batch_ids = [b.id for b in self._batches]
        await self._drop_batches(batch_ids, entries, error)
        for entry in entries:
            self._release(entry)
        self._running.clear()
        self._batches = []
        self._update_gauges()

    def _update_gauges(self) -> None:
        metrics.batch_current_size.set(len(self._running))
        metrics.batch_current_max_tokens.set(sum(e.length for e in self._running.values()))
        metrics.queue_size.set(len(self._queue))


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _tokens(tokens: pb.Tokens) -> list[Token]:
    n = len(tokens.ids)
    texts = list(tokens.texts) + [""] * (n - len(tokens.texts))
    logprobs = list(tokens.logprobs) + [math.nan] * (n - len(tokens.logprobs))
    special = list(tokens.is_special) + [False] * (n - len(tokens.is_special))
    return [
        Token(id=tokens.ids[i], text=texts[i], logprob=_logprob(logprobs[i]), special=bool(special[i]))
        for i in range(n)
    ]
