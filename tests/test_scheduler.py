"""The continuous-batching scheduler driven by a fake shard: no torch, no processes.

The fake shard keeps batches like the real one (Prefill caches, Decode concatenates into the first id and
applies block extensions, FilterBatch/ClearCache) and checks the KV contract strictly: a request's blocks must
cover its prompt at Prefill and the position each Decode writes, block ids must be in range, and no block may
belong to two live requests. Its "model" is deterministic: the next token is a function of the whole sequence,
so a preempted request (re-prefilled with prompt + generated) must produce the same tokens as an undisturbed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from text_generation_router import metrics
from text_generation_router.allocator import BlockAllocator
from text_generation_router.client import ShardError, StepResult
from text_generation_router.infer import Infer
from text_generation_router.scheduler import Scheduler, SchedulerConfig
from text_generation_router.types import (
    GenerationError,
    GenerationRequest,
    OverloadedError,
    SamplingParams,
    StreamEnd,
    StreamToken,
)
from text_generation_server.pb import generate_pb2 as pb

VOCAB = 1000
EOS = 2


def next_token(sequence) -> int:
    """The fake model: deterministic in the whole sequence, never EOS unless the sequence asks for it."""
    value = (sum((i + 1) * t for i, t in enumerate(sequence)) * 7919 + len(sequence)) % (VOCAB - 10) + 10
    return value


def reference(prompt, max_new_tokens) -> list[int]:
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        token = next_token(seq)
        seq.append(token)
        out.append(token)
    return out


class FakeReq:
    def __init__(self, request: pb.Request):
        self.id = request.id
        self.tokens = list(request.input_ids)
        self.prompt_len = len(request.input_ids)
        self.max_new = request.stopping_parameters.max_new_tokens
        self.stops = list(request.stopping_parameters.stop_sequences)
        self.blocks = list(request.blocks)
        self.generated = 0
        self.text = ""
        self.prefill_logprobs = request.prefill_logprobs


class FakeShard:
    """ShardedClient's async interface over an in-memory "model"."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.batches: dict[int, list[FakeReq]] = {}
        self.calls: list[tuple] = []  # (method, details)
        self.prefills: list[list[pb.Request]] = []
        self.decodes: list[tuple[list[int], dict[int, list[int]]]] = []
        self.fail_prefill_if = None  # predicate on a pb.Request
        self.fail_decode_at: int | None = None  # the n-th Decode call (0-based) fails
        self.on_decode = None  # callback(n) before each Decode
        self.max_live_blocks = 0

    # ----- checks ---------------------------------------------------------------------------------------

    def live(self) -> dict[int, FakeReq]:
        return {r.id: r for reqs in self.batches.values() for r in reqs}

    def _check_blocks(self, extra: list[FakeReq] = ()) -> None:
        owner = {}
        for r in [*self.live().values(), *extra]:
            for b in r.blocks:
                assert 0 <= b < self.num_blocks, f"block {b} out of range"
                assert b not in owner, f"block {b} owned by requests {owner[b]} and {r.id}"
                owner[b] = r.id
        self.max_live_blocks = max(self.max_live_blocks, len(owner))

    async def _tick(self):
        await asyncio.sleep(0)

    # ----- the interface --------------------------------------------------------------------------------

    async def prefill(self, batch: pb.Batch) -> StepResult:
        await self._tick()
        self.calls.append(("prefill", [r.id for r in batch.requests]))
        self.prefills.append(list(batch.requests))
        assert batch.id not in self.batches
        if self.fail_prefill_if is not None and any(self.fail_prefill_if(r) for r in batch.requests):
            raise ShardError("shard 0 Prefill failed (INTERNAL): poisoned prompt", code="INTERNAL")
        reqs = [FakeReq(r) for r in batch.requests]
        for r in reqs:
            assert r.id not in self.live(), f"request id {r.id} already cached"
            assert len(r.blocks) * self.block_size >= r.prompt_len, f"request {r.id}: blocks do not cover the prompt"
        self._check_blocks(reqs)
        self.batches[batch.id] = reqs
        return self._step(batch.id, prefill=True)

    async def decode(self, batches, extensions=None) -> StepResult:
        await self._tick()
        n = len(self.decodes)
        if self.on_decode is not None:
            self.on_decode(n)
        ids = [b.id for b in batches]
        self.decodes.append((ids, {k: list(v) for k, v in (extensions or {}).items()}))
        self.calls.append(("decode", ids))
        for b in batches:
            assert b.id in self.batches, f"Decode of unknown batch {b.id}"
            assert list(b.request_ids) == [r.id for r in self.batches[b.id]], "stale CachedBatch handle"
        if self.fail_decode_at == n:
            raise ShardError("shard 0 Decode failed (INTERNAL): injected", code="INTERNAL")
        reqs = [r for bid in ids for r in self.batches[bid]]
        by_id = {r.id: r for r in reqs}
        for rid, blocks in (extensions or {}).items():
            assert rid in by_id, f"extension for request {rid} not in the decoded batches"
        for r in reqs:
            capacity = (len(r.blocks) + len((extensions or {}).get(r.id, ()))) * self.block_size
            assert len(r.tokens) - 1 < capacity, f"request {r.id}: no block for position {len(r.tokens) - 1}"
        for rid, blocks in (extensions or {}).items():
            by_id[rid].blocks.extend(blocks)
        for bid in ids[1:]:
            del self.batches[bid]
        self.batches[ids[0]] = reqs
        self._check_blocks()
        return self._step(ids[0], prefill=False)

    async def filter_batch(self, batch_id: int, request_ids: list[int]):
        await self._tick()
        self.calls.append(("filter", batch_id, list(request_ids)))
        reqs = self.batches[batch_id]
        known = {r.id for r in reqs}
        assert set(request_ids) <= known
        kept = [r for r in reqs if r.id in set(request_ids)]
        if not kept:
            del self.batches[batch_id]
            return None
        self.batches[batch_id] = kept
        return self._cached(batch_id)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        self.calls.append(("clear", batch_id))
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    async def health(self) -> None:
        pass

    # ----- the "model" ----------------------------------------------------------------------------------

    def _cached(self, batch_id: int) -> pb.CachedBatch:
        reqs = self.batches[batch_id]
        return pb.CachedBatch(
            id=batch_id, request_ids=[r.id for r in reqs], current_tokens=sum(len(r.tokens) - 1 for r in reqs)
        )

    def _step(self, batch_id: int, prefill: bool) -> StepResult:
        generations, keep = [], []
        for r in self.batches[batch_id]:
            token = next_token(r.tokens)
            r.tokens.append(token)
            r.generated += 1
            text = f"<{token}>"
            r.text += text
            g = pb.Generation(
                request_id=r.id, tokens=pb.Tokens(ids=[token], logprobs=[-0.5], texts=[text], is_special=[False])
            )
            if prefill and r.prefill_logprobs:
                g.prefill_tokens.CopyFrom(
                    pb.Tokens(ids=r.tokens[: r.prompt_len], logprobs=[float("nan")] + [-1.0] * (r.prompt_len - 1),
                              texts=["x"] * r.prompt_len, is_special=[False] * r.prompt_len)
                )
            finish = None
            if r.generated >= r.max_new:
                finish = pb.FINISH_REASON_LENGTH
            elif any(s in r.text for s in r.stops):
                finish = pb.FINISH_REASON_STOP_SEQUENCE
            if finish is not None:
                g.generated_text.CopyFrom(
                    pb.GeneratedText(text=r.text, generated_tokens=r.generated, finish_reason=finish)
                )
            else:
                keep.append(r)
            generations.append(g)
        if keep:
            self.batches[batch_id] = keep
            batch = self._cached(batch_id)
        else:
            del self.batches[batch_id]
            batch = None
        return StepResult(generations=generations, batch=batch)


# ----- helpers -----------------------------------------------------------------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def request(prompt, max_new_tokens, **kw) -> GenerationRequest:
    return GenerationRequest(input_ids=tuple(prompt), parameters=SamplingParams(), max_new_tokens=max_new_tokens, **kw)


def make(num_blocks=64, block_size=4, max_concurrent=128, **config):
    shard = FakeShard(num_blocks, block_size)
    allocator = BlockAllocator(num_blocks, block_size)
    scheduler = Scheduler(shard, allocator, SchedulerConfig(**config))
    return shard, allocator, scheduler, Infer(scheduler, max_concurrent)


async def collect(infer: Infer, req: GenerationRequest):
    tokens, end = await infer.generate(req)
    return [t.token.id for t in tokens], end


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 37 + i * 11) % (VOCAB - 10) + 10 for i in range(length)]


# ----- tests -------------------------------------------------------------------------------------------


def test_allocator():
    a = BlockAllocator(4, 16)
    x = a.allocate(3)
    assert x == [0, 1, 2] and a.free_blocks == 1
    assert a.allocate(2) is None and a.free_blocks == 1
    a.free(x[:2])
    assert a.free_blocks == 3 and a.used_blocks == 1
    with pytest.raises(ValueError):
        a.free([0])
    assert a.blocks_for(16) == 1 and a.blocks_for(17) == 2 and a.blocks_for(0) == 0


def test_fifo_and_prefill_budget():
    async def main():
        shard, allocator, scheduler, infer = make(max_batch_prefill_tokens=25)
        scheduler.start()
        reqs = [request(prompt(i, 10), 3) for i in range(5)]
        results = await asyncio.gather(*(collect(infer, r) for r in reqs))
        await scheduler.stop()
        return shard, allocator, reqs, results

    shard, allocator, reqs, results = run(main())
    for r, (ids, end) in zip(reqs, results):
        assert ids == reference(r.input_ids, 3)
        assert end.generated_tokens == 3 and end.finish_reason == "length" and end.input_length == 10
        assert end.generated_text == "".join(f"<{t}>" for t in ids)
    order = [r.id for batch in shard.prefills for r in batch]
    assert order == sorted(order), "requests are prefilled in FIFO order"
    assert all(sum(len(r.input_ids) for r in batch) <= 25 for batch in shard.prefills)
    assert [len(b) for b in shard.prefills][0] == 2
    assert allocator.free_blocks == allocator.num_blocks and not shard.batches


def test_waiting_served_ratio_and_max_waiting_tokens():
    """A lone newcomer waits while it is fewer than ratio × running, until max_waiting_tokens steps passed."""

    async def main(newcomers):
        shard, allocator, scheduler, infer = make(
            num_blocks=256, waiting_served_ratio=0.3, max_waiting_tokens=6
        )
        scheduler.start()
        running = [asyncio.ensure_future(collect(infer, request(prompt(i, 4), 30))) for i in range(10)]
        late: list = []

        def on_decode(n):
            if n == 2:  # submitted while decode 2 runs
                late.extend(infer.stream(request(prompt(100 + k, 4), 3)) for k in range(newcomers))

        async def drain(stream):
            return [item async for item in stream]

        shard.on_decode = on_decode
        await asyncio.gather(*running)
        for stream in late:
            assert isinstance((await drain(stream))[-1], StreamEnd)
        await scheduler.stop()
        return shard

    # one newcomer < floor(10 × 0.3) = 3: it joins only once 6 decode steps passed since the last prefill
    shard = run(main(1))
    prefill_positions = [i for i, c in enumerate(shard.calls) if c[0] == "prefill"]
    assert len(prefill_positions) == 2
    decodes_before = sum(1 for c in shard.calls[: prefill_positions[1]] if c[0] == "decode")
    assert decodes_before == 6 - 1  # waiting_tokens is 1 after the prefill, +1 per decode
    # the newcomer was prefilled alone, then decoded together with the running batch
    assert len(shard.prefills[1]) == 1
    next_decode = next(c for c in shard.calls[prefill_positions[1]:] if c[0] == "decode")
    assert len(next_decode[1]) == 2

    # three newcomers >= 3: they join at the very next step
    shard = run(main(3))
    prefill_positions = [i for i, c in enumerate(shard.calls) if c[0] == "prefill"]
    decodes_before = sum(1 for c in shard.calls[: prefill_positions[1]] if c[0] == "decode")
    assert decodes_before == 3  # decodes 0, 1, 2 (the newcomers arrive during decode 2)
    assert len(shard.prefills[1]) == 3


def test_lazy_block_growth_with_extensions():
    async def main():
        shard, allocator, scheduler, infer = make(num_blocks=16, block_size=4)
        scheduler.start()
        ids, end = await collect(infer, request(prompt(1, 5), 10))
        await scheduler.stop()
        return shard, allocator, ids, end

    shard, allocator, ids, end = run(main())
    assert ids == reference(prompt(1, 5), 10)
    assert len(shard.prefills[0][0].blocks) == 2  # ceil(5 / 4): the prompt only
    # the sequence has 6 tokens before the first decode (position 5 is in block 1), a 3rd block is needed at
    # length 9 (position 8), a 4th at length 13 (position 12); the last token (length 15) is never written
    grown_at = [n for n, (_, ext) in enumerate(shard.decodes) if ext]
    assert grown_at == [3, 7], shard.decodes
    assert shard.max_live_blocks == 4
    assert allocator.free_blocks == 16


def test_preemption_when_blocks_are_scarce():
    async def main():
        # 8 blocks of 4 = 32 tokens; each request ends at 4 + 12 - 1 = 15 positions = 4 blocks: 3 cannot share
        shard, allocator, scheduler, infer = make(num_blocks=8, block_size=4)
        scheduler.start()
        before = metrics.request_preempted._value.get()
        reqs = [request(prompt(i, 4), 12) for i in range(3)]
        streamed = {}

        async def consume(k, r):
            tokens = []
            async for item in infer.stream(r):
                if isinstance(item, StreamEnd):
                    streamed[k] = (tokens, item)
                else:
                    tokens.append(item.token.id)

        await asyncio.gather(*(consume(k, r) for k, r in enumerate(reqs)))
        stats = dict(scheduler.stats)
        await scheduler.stop()
        return shard, allocator, reqs, streamed, stats, metrics.request_preempted._value.get() - before

    shard, allocator, reqs, streamed, stats, counted = run(main())
    assert stats["preempted"] >= 1 and counted == stats["preempted"]
    for k, r in enumerate(reqs):
        tokens, end = streamed[k]
        expected = reference(r.input_ids, 12)
        assert tokens == expected, f"request {k}"
        assert end.generated_tokens == 12 and end.finish_reason == "length"
        assert end.input_length == 4
        assert end.generated_text == "".join(f"<{t}>" for t in expected)
    # some prefill re-sent an original prompt + what it had generated, asking only for what remains
    requeued = [r for batch in shard.prefills for r in batch if len(r.input_ids) > 4]
    assert requeued
    for r in requeued:
        original = next(q for q in reqs if tuple(r.input_ids[:4]) == q.input_ids)
        generated = len(r.input_ids) - 4
        assert list(r.input_ids[4:]) == reference(original.input_ids, 12)[:generated]
        assert r.stopping_parameters.max_new_tokens == 12 - generated
        assert not r.prefill_logprobs
    assert shard.max_live_blocks <= 8
    assert allocator.free_blocks == 8 and not shard.batches


def test_preempted_request_keeps_prefill_only_once_and_stop_sequence_across_boundary():
    """Prefill logprobs come with the first token only, even when the request is re-prefilled."""

    async def main():
        shard, allocator, scheduler, infer = make(num_blocks=8, block_size=4)
        scheduler.start()
        reqs = [request(prompt(i, 4), 12, prefill_logprobs=True) for i in range(3)]
        out = []

        async def consume(r):
            items = [item async for item in infer.stream(r)]
            out.append(items)

        await asyncio.gather(*(consume(r) for r in reqs))
        await scheduler.stop()
        return out, scheduler.stats

    out, stats = run(main())
    assert stats["preempted"] >= 1
    for items in out:
        tokens = [i for i in items if isinstance(i, StreamToken)]
        assert tokens[0].prefill is not None and len(tokens[0].prefill) == 4
        assert tokens[0].prefill[0].logprob is None
        assert all(t.prefill is None for t in tokens[1:])
        assert isinstance(items[-1], StreamEnd) and items[-1].generated_tokens == 12


def test_cancellation_frees_blocks_within_one_step():
    async def main():
        shard, allocator, scheduler, infer = make(num_blocks=64, block_size=4)
        scheduler.start()
        other = asyncio.ensure_future(collect(infer, request(prompt(2, 4), 40)))
        stream = infer.stream(request(prompt(1, 4), 200))
        got = 0
        async for item in stream:
            got += 1
            if got == 5:
                break
        await stream.aclose()
        assert infer.active == 1
        cancelled_id = stream._entry.id
        n = len(shard.decodes)
        while len(shard.decodes) < n + 2:
            await asyncio.sleep(0)
        live = shard.live()
        ids, end = await other
        await scheduler.stop()
        return shard, allocator, live, ids, end, cancelled_id

    shard, allocator, live, ids, end, cancelled = run(main())
    assert cancelled not in live, "the cancelled request left the shard within one step"
    assert any(c[0] in ("filter", "clear") for c in shard.calls)
    assert ids == reference(prompt(2, 4), 40) and end.generated_tokens == 40
    assert allocator.free_blocks == 64 and not shard.batches


def test_cancel_while_queued_and_dropped_iterator():
    async def main():
        shard, allocator, scheduler, infer = make(num_blocks=64, block_size=4)
        # not started yet: the request stays queued
        stream = infer.stream(request(prompt(1, 4), 5))
        assert scheduler.queue_size == 1
        await stream.aclose()
        assert scheduler.queue_size == 0 and infer.active == 0
        stream = infer.stream(request(prompt(1, 4), 5))
        del stream  # dropped without closing
        assert scheduler.queue_size == 0 and infer.active == 0
        scheduler.start()
        ids, end = await collect(infer, request(prompt(3, 4), 5))
        await scheduler.stop()
        return shard, ids

    shard, ids = run(main())
    assert ids == reference(prompt(3, 4), 5)
    assert len(shard.prefills) == 1


def test_overloaded_before_anything_is_yielded():
    async def main():
        shard, allocator, scheduler, infer = make(max_concurrent=2)
        a = infer.stream(request(prompt(1, 4), 5))
        b = infer.stream(request(prompt(2, 4), 5))
        with pytest.raises(OverloadedError):
            infer.stream(request(prompt(3, 4), 5))
        await a.aclose()
        c = infer.stream(request(prompt(3, 4), 5))  # a slot is free again
        scheduler.start()
        results = [item async for item in b], [item async for item in c]
        await scheduler.stop()
        return results, infer.active

    (b_items, c_items), active = run(main())
    assert isinstance(b_items[-1], StreamEnd) and isinstance(c_items[-1], StreamEnd)
    assert active == 0


def test_prefill_error_fails_only_that_batch_and_the_loop_goes_on():
    async def main():
        shard, allocator, scheduler, infer = make(num_blocks=64, block_size=4)
        shard.fail_prefill_if = lambda r: 999 in r.input_ids
        scheduler.start()
        running = asyncio.ensure_future(collect(infer, request(prompt(1, 4), 30)))
        while not shard.decodes:
            await asyncio.sleep(0)
        with pytest.raises(GenerationError, match="poisoned prompt"):
            await collect(infer, request([5, 999, 7], 10))
        ids, end = await running
        after = await collect(infer, request(prompt(3, 4), 4))
        await scheduler.stop()
        return shard, allocator, ids, after

    shard, allocator, ids, after = run(main())
    assert ids == reference(prompt(1, 4), 30)
    assert after[0] == reference(prompt(3, 4), 4)
    assert allocator.free_blocks == 64 and not shard.batches
    assert any(c[0] == "clear" for c in shard.calls)


def test_decode_error_fails_affected_requests_and_clears_their_batches():
    async def main():
        shard, allocator, scheduler, infer = make(num_blocks=64, block_size=4)
        shard.fail_decode_at = 3
        scheduler.start()
        failing = [asyncio.ensure_future(collect(infer, request(prompt(i, 4), 20))) for i in range(3)]
        results = await asyncio.gather(*failing, return_exceptions=True)
        after = await collect(infer, request(prompt(7, 4), 6))
        await scheduler.stop()
        return shard, allocator, results, after

    shard, allocator, results, after = run(main())
    assert all(isinstance(r, GenerationError) and "injected" in str(r) for r in results), results
    assert after[0] == reference(prompt(7, 4), 6)
    assert allocator.free_blocks == 64 and not shard.batches
    assert ("clear", 0) in shard.calls


def test_request_that_can_never_fit_fails_clearly():
    async def main():
        shard, allocator, scheduler, infer = make(num_blocks=8, block_size=4)
        scheduler.start()
        with pytest.raises(GenerationError, match="can never run"):
            infer.stream(request(prompt(1, 20), 14))  # 33 positions > 32
        ok = await collect(infer, request(prompt(1, 20), 13))  # 32 positions: fits alone
        await scheduler.stop()
        return ok, infer.active

    (ids, end), active = run(main())
    assert ids == reference(prompt(1, 20), 13) and active == 0


def test_many_concurrent_requests_with_scarce_blocks():
    """Stress: 40 requests of various lengths through 24 blocks; all finish with the reference tokens."""

    async def main():
        shard, allocator, scheduler, infer = make(num_blocks=24, block_size=4, max_batch_prefill_tokens=32)
        scheduler.start()
        reqs = [request(prompt(i, 1 + i % 9), 1 + (i * 7) % 20) for i in range(40)]
        results = await asyncio.gather(*(collect(infer, r) for r in reqs))
        await scheduler.stop()
        return shard, allocator, reqs, results, scheduler.stats

    shard, allocator, reqs, results, stats = run(main())
    for r, (ids, end) in zip(reqs, results):
        assert ids == reference(r.input_ids, r.max_new_tokens)
        assert end.generated_tokens == r.max_new_tokens
    assert stats["preempted"] > 0
    assert allocator.free_blocks == 24 and not shard.batches


def test_router_core_does_not_import_torch():
    import subprocess

    code = (
        "import sys\n"
        "import text_generation_router.scheduler, text_generation_router.allocator, text_generation_router.infer\n"
        "import text_generation_router.client, text_generation_router.cli\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
