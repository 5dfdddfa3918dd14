"""The planner (scheduler + block manager) on its own: plans checked step by step, results written by hand.

`ShardMirror` plays the shard's side of the contract synchronously and strictly: it mirrors each request from
its plans (tokens, block table, released ids), refuses what the real shard refuses, and tracks what every KV
slot holds — the identity of the whole prefix up to that position and the rotary length it was computed with —
so a request that reads a slot it did not fill with the same prefix (a wrong prefix-cache hit, a block reused
while still read, a dynamic-NTK mismatch) fails the test. Its model is deterministic in the whole sequence, so
a request recomputed after a preemption must produce the same tokens as an undisturbed one. A step with a
`step_id` is pipelined (planned before the previous step's results were applied): the mirror skips there the
releases of what it finished in the step before and the plans of what it finished by EOS, nothing else: a
request planned past max_new_tokens fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sys
from collections import deque

import pytest

from text_generation_router import metrics
from text_generation_router.block_manager import BlockManager, block_hash
from text_generation_router.client import StepResult
from text_generation_router.infer import Infer
from text_generation_router.scheduler import Scheduler, SchedulerConfig
from text_generation_router.types import GenerationError, GenerationRequest, OverloadedError, SamplingParams
from text_generation_common.pb import generate_pb2 as pb
from text_generation_common.tokenizer import Tokenizer

VOCAB = 1000
EOS = 2


def next_token(sequence) -> int:
    """The fake model: deterministic in the whole sequence; an ordinary whole-piece token (no byte pieces)."""
    return (sum((i + 1) * t for i, t in enumerate(sequence)) * 7919 + len(sequence)) % 690 + 300


def reference(prompt, max_new_tokens) -> list[int]:
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        sequence.append(next_token(sequence))
    return sequence[len(prompt) :]


class ShardMirror:
    def __init__(self, num_blocks: int, block_size: int, dynamic_limit: int | None = None):
        self.num_blocks, self.block_size, self.dynamic_limit = num_blocks, block_size, dynamic_limit
        self.held: dict[int, dict] = {}
        self.slots: dict[tuple[int, int], tuple] = {}  # (block, offset) -> (prefix identity, rotary length)
        self.steps: list[dict[int, int]] = []  # each step's tokens per request id
        self.finish_at: dict[int, int] = {}  # request id -> token count at which it emits EOS
        self.finished: dict[int, int] = {}  # request id -> finish reason, in the last step
        self.skipped = 0  # plans of requests it had finished, in pipelined steps

    def _identity(self, request: dict, position: int) -> tuple:
        rope = max(request["prompt_length"], position + 1)
        if self.dynamic_limit is None or rope <= self.dynamic_limit:
            rope = 0
        return hash(tuple(request["tokens"][: position + 1])), rope

    def step(self, plan: pb.StepRequest) -> pb.StepResponse:
        ended, self.finished = self.finished, {}
        if plan.step_id:
            eos = {rid for rid, reason in ended.items() if reason == pb.FINISH_REASON_EOS_TOKEN}
            kept = [r for r in plan.requests if r.HasField("new_request") or r.id not in eos]
            self.skipped += len(plan.requests) - len(kept)
            released = [rid for rid in plan.released if rid not in ended]
            plan = pb.StepRequest(requests=kept, released=released)
        for rid in plan.released:
            assert rid in self.held, f"released request {rid} is not held"
            del self.held[rid]
        ids = [r.id for r in plan.requests]
        assert len(set(ids)) == len(ids), "a request twice in one step"
        self.steps.append({r.id: r.num_tokens for r in plan.requests})
        generations = []
        for r in plan.requests:
            if r.HasField("new_request"):
                assert r.id not in self.held, f"request {r.id} is new but held"
                new = r.new_request
                self.held[r.id] = dict(
                    tokens=list(new.token_ids), prompt_length=new.prompt_length, computed=new.num_cached_tokens,
                    table=[], max_new=new.stopping_parameters.max_new_tokens,
                    ignore_eos=new.stopping_parameters.ignore_eos_token, prefill_logprobs=new.prefill_logprobs,
                )
            request = self.held[r.id]
            request["table"].extend(r.new_blocks)
            assert all(0 <= b < self.num_blocks for b in r.new_blocks)
            start, stop = request["computed"], request["computed"] + r.num_tokens
            assert r.num_tokens >= 1 and stop <= len(request["tokens"]), (r.id, start, stop)
            assert len(request["table"]) * self.block_size >= stop, f"request {r.id}: no block for position {stop - 1}"
            for p in range(start):  # what it reads: its own prefix, computed the same way
                slot = (request["table"][p // self.block_size], p % self.block_size)
                assert self.slots.get(slot) == self._identity(request, p), f"request {r.id} reads a wrong slot at {p}"
            for p in range(start, stop):
                self.slots[(request["table"][p // self.block_size], p % self.block_size)] = self._identity(request, p)
            request["computed"] = stop
            generation = pb.Generation(request_id=r.id)
            if request["prefill_logprobs"] and start < request["prompt_length"]:
                positions = range(start, min(stop, request["prompt_length"]))
                ids_ = ([request["tokens"][0]] if start == 0 else []) + [
                    request["tokens"][p + 1] for p in positions if p + 1 < request["prompt_length"]
                ]
                generation.prefill_tokens.CopyFrom(pb.Tokens(ids=ids_, logprobs=[-1.0] * len(ids_)))
            if stop == len(request["tokens"]):
                token = EOS if len(request["tokens"]) + 1 == self.finish_at.get(r.id, -1) else next_token(request["tokens"])
                request["tokens"].append(token)
                generation.token_id, generation.logprob = token, -0.5
                generated = len(request["tokens"]) - request["prompt_length"]
                if generated >= request["max_new"]:
                    generation.finish_reason = pb.FINISH_REASON_LENGTH
                elif token == EOS and not request["ignore_eos"]:
                    generation.finish_reason = pb.FINISH_REASON_EOS_TOKEN
                if generation.HasField("finish_reason"):
                    del self.held[r.id]
                    self.finished[r.id] = generation.finish_reason
            if generation.HasField("token_id") or generation.prefill_tokens.ids:
                generations.append(generation)
        return pb.StepResponse(generations=generations)


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    return Tokenizer.from_pretrained(tiny_internlm2_dir, vocab_size=VOCAB)


def request(prompt, max_new_tokens, **kw) -> GenerationRequest:
    return GenerationRequest(input_ids=tuple(prompt), parameters=SamplingParams(), max_new_tokens=max_new_tokens, **kw)


def prompt(seed: int, length: int) -> list[int]:
    return [10 + (seed * 131 + i * 17) % 900 for i in range(length)]


def make(tokenizer, num_blocks=64, block_size=4, budget=4096, prefix_caching=True, dynamic_limit=None):
    blocks = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
    config = SchedulerConfig(max_batch_tokens=budget, prefix_caching=prefix_caching, dynamic_rope_limit=dynamic_limit)
    return Scheduler(blocks, tokenizer, config), ShardMirror(num_blocks, block_size, dynamic_limit)


def run(scheduler, shard, max_steps=10_000, before_step=None) -> dict:
    """Plan and apply until nothing is left; every request's outputs (StreamTokens or errors) by sequence."""
    outputs: dict = {}
    for step in range(max_steps):
        if before_step is not None:
            before_step(step)
        plan = scheduler.schedule()
        if plan is None:
            return outputs
        assert plan.num_tokens <= scheduler.config.max_batch_tokens
        for seq, item in scheduler.update(plan, shard.step(plan.to_pb())):
            outputs.setdefault(seq, []).append(item)
    raise AssertionError("the scheduler did not finish")


def run_pipelined(scheduler, shard, max_steps=10_000, before_step=None) -> dict:
    """`run` with two steps in flight, as Infer runs them: each plan is made before the last one's results are
    applied; the mirror runs it at once (a shard runs the steps in order), its results are applied a step later."""
    outputs: dict = {}
    in_flight: deque = deque()
    step_ids = itertools.count(1)
    for step in range(max_steps):
        if before_step is not None:
            before_step(step)
        while len(in_flight) < 2 and (plan := scheduler.schedule()) is not None:
            assert plan.num_tokens <= scheduler.config.max_batch_tokens
            request_pb = plan.to_pb()
            request_pb.step_id = next(step_ids)
            in_flight.append((plan, shard.step(request_pb)))
        if not in_flight:
            return outputs
        plan, response = in_flight.popleft()
        for seq, item in scheduler.update(plan, response):
            outputs.setdefault(seq, []).append(item)
    raise AssertionError("the scheduler did not finish")


def tokens_of(items) -> list[int]:
    assert all(not isinstance(i, Exception) for i in items), items
    return [i.token.id for i in items]


# ----- the block manager ---------------------------------------------------------------------------------------


def test_block_manager_counts_shares_and_evicts_least_recently_used_first():
    blocks = BlockManager(4, 2)
    a = blocks.allocate(2)
    assert a == [0, 1] and blocks.free_blocks == 2 and blocks.allocate(3) is None and blocks.free_blocks == 2
    h0 = block_hash(None, [5, 6], 0)
    h1 = block_hash(h0, [7, 8], 0)
    blocks.register(a[0], h0)
    blocks.register(a[1], h1)
    assert blocks.lookup([h0, h1, block_hash(h1, [9, 9], 0)]) == a  # the longest cached run, now held twice
    assert blocks.ref_count(0) == 2
    blocks.release(a)
    assert blocks.ref_count(0) == 1 and blocks.free_blocks == 2  # still held by the second holder
    blocks.release(a)
    assert blocks.free_blocks == 4 and blocks.cached_blocks == 2  # free, but still findable
    # empty blocks are handed out before cached ones; then the deepest, least recently used cached block goes
    assert blocks.allocate(2) == [2, 3]
    assert blocks.allocate(1) == [1] and blocks.cached_blocks == 1
    assert blocks.lookup([h0, h1]) == [0]  # h1's block was evicted, h0's survives
    with pytest.raises(ValueError, match="block 3 is not held"):
        blocks.release([3, 3])
    assert block_hash(None, [5, 6], 0) != block_hash(None, [5, 6], 7)  # the extra key is part of the identity


# ----- one step ------------------------------------------------------------------------------------------------


def test_a_step_decodes_everyone_then_fills_the_budget_with_prompt_chunks(tokenizer):
    """Budget 16: the running requests decode one token each in every step while a 50-token prompt is prefilled
    in chunks of what is left; a request arriving meanwhile joins as soon as there is budget."""
    scheduler, shard = make(tokenizer, num_blocks=128, budget=16)
    short = [scheduler.submit(request(prompt(i, 5), 30)) for i in range(3)]
    run_steps = 2
    for _ in range(run_steps):
        plan = scheduler.schedule()
        scheduler.update(plan, shard.step(plan.to_pb()))
    long = scheduler.submit(request(prompt(9, 50), 4))
    plan = scheduler.schedule()
    counts = {c.seq: c.num_tokens for c in plan.chunks}
    assert [counts[s] for s in short] == [1, 1, 1] and counts[long] == 13  # 16 - 3 decodes
    scheduler.update(plan, shard.step(plan.to_pb()))
    late = scheduler.submit(request(prompt(10, 3), 4))
    plan = scheduler.schedule()
    counts = {c.seq: c.num_tokens for c in plan.chunks}
    assert [counts[s] for s in short] == [1, 1, 1] and counts[long] == 13 and late not in counts
    scheduler.update(plan, shard.step(plan.to_pb()))
    plan = scheduler.schedule()  # 24 prompt tokens left: 13 now, and the late request waits for the budget
    counts = {c.seq: c.num_tokens for c in plan.chunks}
    assert counts[long] == 13 and late not in counts
    scheduler.update(plan, shard.step(plan.to_pb()))
    plan = scheduler.schedule()  # the last 11 prompt tokens, and the late request's prompt in what is left
    counts = {c.seq: c.num_tokens for c in plan.chunks}
    assert counts[long] == 11 and counts[late] == 2 and plan.kind == "prefill"
    scheduler.update(plan, shard.step(plan.to_pb()))
    outputs = run(scheduler, shard)
    done = {**{s: reference(s.request.input_ids, s.request.max_new_tokens) for s in [*short, long, late]}}
    for seq, expected in done.items():
        assert seq.token_ids[seq.prompt_length :] == expected
    assert all(items[-1].end is not None for items in outputs.values())


def test_no_decoding_request_ever_waits_for_a_long_prompt(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=256, budget=8)
    streams = [scheduler.submit(request(prompt(i, 3), 40)) for i in range(4)]
    longs = []

    def arrive(step):
        if step in (5, 6):
            longs.append(scheduler.submit(request(prompt(20 + step, 100), 2)))

    outputs = run(scheduler, shard, before_step=arrive)
    # from its first token on, every stream got one token in every step until it finished
    for seq in streams:
        present = [seq.id in step for step in shard.steps]
        first, last = present.index(True), len(present) - present[::-1].index(True)
        assert all(present[first:last]), f"stream {seq.id} skipped a step"
        assert tokens_of(outputs[seq]) == reference(seq.request.input_ids, 40)
    for seq in longs:
        assert tokens_of(outputs[seq]) == reference(seq.request.input_ids, 2)


def test_waiting_requests_start_in_arrival_order(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=64, budget=10)
    seqs = [scheduler.submit(request(prompt(i, n), 2)) for i, n in enumerate([4, 4, 9, 1])]
    plan = scheduler.schedule()
    # 4 + 4 fit, then the 9-token prompt takes the 2 tokens left (a chunk); the last one waits its turn
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(seqs[0], 4), (seqs[1], 4), (seqs[2], 2)]
    assert scheduler.queue_size == 1


# ----- prefix caching ------------------------------------------------------------------------------------------


def step_once(scheduler, shard) -> list:
    plan = scheduler.schedule()
    return scheduler.update(plan, shard.step(plan.to_pb()))


def test_a_prefix_cache_hit_gives_the_same_tokens_and_computes_only_the_rest(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=64, block_size=4)
    system = prompt(1, 12)  # three full blocks
    first = scheduler.submit(request(system + [11, 12], 5))
    step_once(scheduler, shard)
    first_blocks = first.blocks[:3]
    run(scheduler, shard)
    hits_before = metrics.prefix_cache_hits._value.get()
    second = scheduler.submit(request(system + [13], 5))
    plan = scheduler.schedule()
    (chunk,) = plan.chunks
    assert chunk.start == 12 and chunk.num_tokens == 1  # the three cached blocks are not computed again
    assert list(chunk.new_blocks[:3]) == first_blocks
    outputs = {seq: [item] for seq, item in scheduler.update(plan, shard.step(plan.to_pb()))}
    for seq, items in run(scheduler, shard).items():
        outputs[seq] += items
    assert tokens_of(outputs[second]) == reference(system + [13], 5)
    assert metrics.prefix_cache_hits._value.get() - hits_before == 12
    # a whole prompt that is cached still computes its last token (its logits are needed)
    third = scheduler.submit(request(system, 3))
    plan = scheduler.schedule()
    assert (plan.chunks[0].start, plan.chunks[0].num_tokens) == (8, 4)
    outputs = {seq: [item] for seq, item in scheduler.update(plan, shard.step(plan.to_pb()))}
    outputs[third] += run(scheduler, shard)[third]
    assert tokens_of(outputs[third]) == reference(system, 3)


def test_a_burst_sharing_a_prefix_computes_it_once(tokenizer):
    """Five requests with the same 3-block system prompt arrive together: the first computes it, the others wait
    one step for it instead of computing it again, then find it cached."""
    scheduler, shard = make(tokenizer, num_blocks=64, block_size=4)
    system = prompt(4, 12)
    seqs = [scheduler.submit(request(system + [30 + i], 4)) for i in range(5)]
    lone = scheduler.submit(request(prompt(5, 6), 4))  # behind them in the queue
    plan = scheduler.schedule()
    assert [c.seq for c in plan.chunks] == [seqs[0]]  # the rest wait: their first block is being computed
    scheduler.update(plan, shard.step(plan.to_pb()))
    plan = scheduler.schedule()
    chunks = {c.seq: c for c in plan.chunks}
    assert all((chunks[s].start, chunks[s].num_tokens) == (12, 1) for s in seqs[1:]) and lone in chunks
    scheduler.update(plan, shard.step(plan.to_pb()))
    for seq, items in run(scheduler, shard).items():
        assert seq.token_ids[seq.prompt_length :] == reference(seq.request.input_ids, 4)


def test_prompt_logprobs_requests_compute_their_whole_prompt(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=64, block_size=4, budget=5)
    system = prompt(2, 12)
    scheduler.submit(request(system + [1], 2))
    run(scheduler, shard)
    seq = scheduler.submit(request(system + [7], 2, prefill_logprobs=True))
    plan = scheduler.schedule()
    assert plan.chunks[0].start == 0  # not a cache hit: every prompt position's logprob is computed
    assert not dict(scheduler.update(plan, shard.step(plan.to_pb())))
    items = run(scheduler, shard)[seq]
    assert [t.id for t in items[0].prefill] == system + [7]  # gathered over the chunks, delivered once
    assert all(i.prefill is None for i in items[1:])


def test_a_plan_carries_whether_each_new_request_wants_its_token_logprobs(tokenizer):
    scheduler, _ = make(tokenizer)
    scheduler.submit(request(prompt(1, 5), 2))
    scheduler.submit(request(prompt(2, 5), 2, token_logprobs=False))
    new = [r.new_request for r in scheduler.schedule().to_pb().requests]
    assert [n.omit_token_logprobs for n in new] == [False, True]


def test_shared_blocks_survive_the_end_cancellation_and_preemption_of_one_holder(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=64, block_size=4)
    system = prompt(3, 8)
    outputs: dict = {}

    def step():
        plan = scheduler.schedule()
        for seq, item in scheduler.update(plan, shard.step(plan.to_pb())):
            outputs.setdefault(seq, []).append(item)
        return plan

    a = scheduler.submit(request(system + [21], 30))
    step()
    b = scheduler.submit(request(system + [22], 30))
    c = scheduler.submit(request(system + [23], 2))
    step()
    shared = a.blocks[:2]
    assert b.blocks[:2] == shared and c.blocks[:2] == shared
    assert [scheduler.blocks.ref_count(x) for x in shared] == [3, 3]
    step()  # c's second token: it finishes (max_new_tokens 2)
    assert c.finished and [scheduler.blocks.ref_count(x) for x in shared] == [2, 2]
    scheduler.cancel(a)  # a's client goes away: its blocks go with the next plan, the shared ones stay held by b
    plan = step()
    assert a.id in plan.released and [scheduler.blocks.ref_count(x) for x in shared] == [1, 1]
    scheduler._preempt(b)  # what a full cache does: b lets go, the blocks stay cached and are found again
    assert [scheduler.blocks.ref_count(x) for x in shared] == [0, 0] and scheduler.blocks.cached_blocks >= 2
    plan = step()
    assert b.id in plan.released and plan.chunks[0].seq is b and plan.chunks[0].new_blocks[:2] == tuple(shared)
    for seq, items in run(scheduler, shard).items():
        outputs.setdefault(seq, []).extend(items)
    assert tokens_of(outputs[b]) == reference(system + [22], 30)
    assert tokens_of(outputs[c]) == reference(system + [23], 2)
    assert scheduler.blocks.used_blocks == 0 and not shard.held


def test_under_kv_pressure_cached_blocks_are_evicted_never_a_running_requests(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=12, block_size=4)
    finished = [prompt(30 + i, 9) for i in range(3)]
    for tokens in finished:  # three finished requests leave 3 × 2 cached blocks
        scheduler.submit(request(tokens, 1))
    run(scheduler, shard)
    assert scheduler.blocks.cached_blocks == 6 and scheduler.blocks.used_blocks == 0
    running = scheduler.submit(request(prompt(40, 8), 16))  # grows to 6 blocks
    newcomer = scheduler.submit(request(prompt(41, 20), 2))  # 6 blocks: together they need all 12
    outputs = run(scheduler, shard)  # the mirror fails any read of a slot that another request overwrote
    assert tokens_of(outputs[running]) == reference(prompt(40, 8), 16)
    assert tokens_of(outputs[newcomer]) == reference(prompt(41, 20), 2)
    assert scheduler.stats["preempted"] == 0
    before = metrics.prefix_cache_hits._value.get()
    again = scheduler.submit(request(finished[0], 1))
    assert tokens_of(run(scheduler, shard)[again]) == reference(finished[0], 1)
    assert metrics.prefix_cache_hits._value.get() == before  # its cached blocks were evicted for the others


def test_dynamic_ntk_blocks_are_shared_only_where_their_keys_agree(tokenizer):
    """Past max_position_embeddings (24 here) a prompt's keys depend on its length: a 30-token prompt shares
    nothing with a 31-token one that starts the same (nor with a short one), while the same 30-token prompt again,
    or two prompts under the limit, share their full blocks."""
    scheduler, shard = make(tokenizer, num_blocks=64, block_size=4, dynamic_limit=24)
    base = prompt(5, 30)
    hits = []
    for tokens in (base, base + [7], base, base[:16] + [1, 2], base[:16] + [3]):
        scheduler.submit(request(tokens, 3))
        before = metrics.prefix_cache_hits._value.get()
        ((_, items),) = run(scheduler, shard).items()  # the mirror checks each slot's rotary length too
        hits.append(metrics.prefix_cache_hits._value.get() - before)
        assert tokens_of(items) == reference(tokens, 3)
    assert hits == [0, 0, 28, 0, 16]


# ----- preemption, cancellation, errors ----------------------------------------------------------------------


def test_preemption_recomputes_the_newest_and_keeps_every_stream_intact(tokenizer):
    """12 blocks of 4 tokens for 4 requests that grow to 5 blocks each: the newest are preempted, released on
    the shard, queued at the front and recomputed; every stream gets exactly the undisturbed tokens, in order,
    each once, and its text is the text of those tokens."""
    scheduler, shard = make(tokenizer, num_blocks=12, block_size=4, prefix_caching=False)
    seqs = [scheduler.submit(request(prompt(50 + i, 6), 14, stop_sequences=("never",))) for i in range(4)]
    outputs = run(scheduler, shard)
    assert scheduler.stats["preempted"] > 0
    for seq in seqs:
        items = outputs[seq]
        assert tokens_of(items) == reference(seq.request.input_ids, 14)
        assert items[-1].end.generated_text == "".join(i.token.text for i in items)
        assert items[-1].end.finish_reason == "length" and items[-1].end.generated_tokens == 14
    assert scheduler.blocks.used_blocks == 0 and not shard.held


def test_cancellation_releases_within_one_step(tokenizer):
    scheduler, shard = make(tokenizer)
    running = scheduler.submit(request(prompt(60, 5), 50))
    plan = scheduler.schedule()
    scheduler.update(plan, shard.step(plan.to_pb()))
    waiting_one = scheduler.submit(request(prompt(61, 5), 50))
    scheduler.cancel(waiting_one)
    assert waiting_one.finished and scheduler.queue_size == 0
    scheduler.cancel(running)
    plan = scheduler.schedule()
    assert plan.released == (running.id,) and not plan.chunks and scheduler.blocks.used_blocks == 0
    scheduler.update(plan, shard.step(plan.to_pb()))
    assert not shard.held and scheduler.schedule() is None


def test_stop_sequences_and_eos(tokenizer):
    scheduler, shard = make(tokenizer)
    probe = scheduler.submit(request(prompt(70, 4), 12))
    text = "".join(i.token.text for i in run(scheduler, shard)[probe])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    seq = scheduler.submit(request(prompt(70, 4), 12, stop_sequences=(stop,)))
    plan = scheduler.schedule()
    items = []
    while plan is not None and not seq.finished:
        items += [item for _, item in scheduler.update(plan, shard.step(plan.to_pb()))]
        plan = scheduler.schedule()
    end = items[-1].end
    assert end.finish_reason == "stop_sequence" and stop in end.generated_text and len(items) < 12
    assert plan is not None and plan.released == (seq.id,)  # the router ended it: the shard must forget it
    scheduler.update(plan, shard.step(plan.to_pb()))
    assert not shard.held
    eos = scheduler.submit(request(prompt(71, 4), 12))
    shard.finish_at[eos.id] = 4 + 3  # the shard's model emits EOS as the 3rd token
    items = run(scheduler, shard)[eos]
    assert items[-1].end.finish_reason == "eos_token" and len(items) == 3 and items[-1].token.text == ""
    assert not shard.held and scheduler.schedule() is None  # the shard forgot it itself: nothing to release


def test_a_failed_step_fails_its_requests_and_the_next_plan_cleans_up(tokenizer):
    scheduler, shard = make(tokenizer)
    old = scheduler.submit(request(prompt(80, 5), 20))
    plan = scheduler.schedule()
    scheduler.update(plan, shard.step(plan.to_pb()))
    new = scheduler.submit(request(prompt(81, 5), 20))
    plan = scheduler.schedule()
    outputs = scheduler.fail(plan, GenerationError("the shard refused the step"))
    assert {seq for seq, _ in outputs} == {old, new} and all(isinstance(e, GenerationError) for _, e in outputs)
    plan = scheduler.schedule()
    assert plan.released == (old.id,) and not plan.chunks  # new was never held by the shard
    scheduler.update(plan, shard.step(plan.to_pb()))
    assert not shard.held and scheduler.blocks.used_blocks == 0


def test_a_request_that_can_never_fit_is_refused_at_once(tokenizer):
    scheduler, _ = make(tokenizer, num_blocks=4, block_size=4)
    with pytest.raises(GenerationError, match="needs 5 KV blocks .* only has 4 blocks"):
        scheduler.submit(request(prompt(90, 10), 10))


def test_many_requests_with_scarce_blocks_and_a_small_budget(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=20, block_size=4, budget=9)
    seqs = [scheduler.submit(request(prompt(100 + i, 3 + i % 11), 4 + i % 7)) for i in range(24)]
    outputs = run(scheduler, shard)
    for seq in seqs:
        assert tokens_of(outputs[seq]) == reference(seq.request.input_ids, seq.request.max_new_tokens)
    assert scheduler.blocks.used_blocks == 0 and not shard.held and scheduler.stats["max_running"] > 3


# ----- two steps in flight --------------------------------------------------------------------------------------


def test_two_steps_in_flight_give_every_stream_its_undisturbed_tokens(tokenizer):
    """Chunked prompts, scarce blocks (preemptions) and a shared prefix, with each plan made before the last
    one's results are in: the same tokens as one step at a time, and every request decodes in every step."""
    for prefix_caching in (True, False):
        scheduler, shard = make(tokenizer, num_blocks=16, block_size=4, budget=9, prefix_caching=prefix_caching)
        system = prompt(7, 8)
        seqs = [scheduler.submit(request(system + prompt(100 + i, 1 + i % 9), 6 + i % 9)) for i in range(24)]
        outputs = run_pipelined(scheduler, shard)
        for seq in seqs:
            assert tokens_of(outputs[seq]) == reference(seq.request.input_ids, seq.request.max_new_tokens)
            items = outputs[seq]
            assert items[-1].end.generated_text == "".join(i.token.text for i in items)
        assert scheduler.stats["preempted"] > 0 and scheduler.stats["max_running"] > 3
        assert scheduler.blocks.used_blocks == 0 and not shard.held and shard.skipped == 0
        assert all(s.pending == 0 for s in seqs)


def test_two_steps_in_flight_plan_a_decoding_request_in_every_step(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=256, budget=8)
    streams = [scheduler.submit(request(prompt(i, 3), 40)) for i in range(4)]
    outputs = run_pipelined(
        scheduler, shard, before_step=lambda step: step == 5 and scheduler.submit(request(prompt(30, 100), 2))
    )
    for seq in streams:
        present = [seq.id in step for step in shard.steps]
        first, last = present.index(True), len(present) - present[::-1].index(True)
        assert all(present[first:last]), f"stream {seq.id} skipped a step"
        assert sum(step.get(seq.id, 0) for step in shard.steps) == 3 + 39  # each position once, none past the end
        assert tokens_of(outputs[seq]) == reference(seq.request.input_ids, 40)


def test_two_steps_in_flight_end_by_eos_stop_sequence_and_cancellation(tokenizer):
    """A request ended by EOS was already planned in the next step: the shard skips it there. One ended by a
    stop sequence had a token computed in the next step, dropped, and is released in the one after. A request
    cancelled with two of its steps out is released once they have run. Nothing is left on either side."""
    scheduler, shard = make(tokenizer)
    probe = scheduler.submit(request(prompt(70, 4), 12))
    text = "".join(i.token.text for i in run(scheduler, shard)[probe])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = scheduler.submit(request(prompt(70, 4), 12, stop_sequences=(stop,)))
    eos = scheduler.submit(request(prompt(71, 4), 12))
    shard.finish_at[eos.id] = 4 + 3  # the shard's model emits EOS as the 3rd token
    cancelled = scheduler.submit(request(prompt(72, 4), 12))
    kept = scheduler.submit(request(prompt(73, 4), 12))
    outputs = run_pipelined(scheduler, shard, before_step=lambda step: step == 3 and scheduler.cancel(cancelled))
    end = outputs[stopped][-1].end
    assert end.finish_reason == "stop_sequence" and stop in end.generated_text
    assert end.generated_text == "".join(i.token.text for i in outputs[stopped])
    assert outputs[eos][-1].end.finish_reason == "eos_token" and len(outputs[eos]) == 3
    assert cancelled.finished and all(i.end is None for i in outputs.get(cancelled, []))
    assert tokens_of(outputs[kept]) == reference(prompt(73, 4), 12)
    assert shard.skipped == 1  # eos's next token, planned before its end was known
    assert not shard.held and scheduler.blocks.used_blocks == 0 and scheduler.schedule() is None


def test_two_steps_in_flight_with_prompt_logprobs_and_a_prefix_hit(tokenizer):
    scheduler, shard = make(tokenizer, num_blocks=64, block_size=4, budget=5)
    system = prompt(1, 12)
    first = scheduler.submit(request(system + [11, 12], 5))
    logprobs = scheduler.submit(request(system + [7], 3, prefill_logprobs=True))
    outputs = run_pipelined(scheduler, shard)
    assert [t.id for t in outputs[logprobs][0].prefill] == system + [7]  # gathered over 3 chunks, once
    assert all(i.prefill is None for i in outputs[logprobs][1:])
    hits = metrics.prefix_cache_hits._value.get()
    second = scheduler.submit(request(system + [13], 5))
    outputs = run_pipelined(scheduler, shard)
    assert metrics.prefix_cache_hits._value.get() - hits == 12  # registered once their steps had answered
    for seq in (first, second):
        assert seq.token_ids[seq.prompt_length :] == reference(seq.request.input_ids, 5)


def test_random_workloads_with_two_steps_in_flight(tokenizer):
    """200 seeded mixes of prompt lengths, budgets, KV sizes, shared prefixes, prompt logprobs, EOS and
    cancellations, every other one with two steps in flight: each stream is its undisturbed tokens (a cancelled
    one a prefix of them), prompt logprobs cover the prompt once, and nothing is left held on either side."""
    for seed in range(200):
        rng = random.Random(seed)
        scheduler, shard = make(
            tokenizer, num_blocks=rng.randint(8, 30), budget=rng.randint(3, 16), prefix_caching=rng.random() < 0.6
        )
        system = prompt(seed, rng.randint(0, 10))
        expected, cancel_at = {}, {}
        for i in range(rng.randint(1, 12)):
            tokens, max_new = system + prompt(seed * 31 + i, rng.randint(1, 9)), rng.randint(1, 9)
            seq = scheduler.submit(request(tokens, max_new, prefill_logprobs=rng.random() < 0.4))
            expected[seq] = reference(tokens, max_new)
            if max_new > 1 and rng.random() < 0.25:  # EOS as its k-th token
                k = rng.randint(1, max_new - 1)
                shard.finish_at[seq.id] = len(tokens) + k
                expected[seq] = expected[seq][: k - 1] + [EOS]
            if rng.random() < 0.15:
                cancel_at[seq] = rng.randint(0, 10)

        def cancel(step):
            for seq in [s for s, at in cancel_at.items() if at == step]:
                scheduler.cancel(seq)

        outputs = (run_pipelined if seed % 2 else run)(scheduler, shard, before_step=cancel)
        for seq, tokens in expected.items():
            items = outputs.get(seq, [])
            got = tokens_of(items)
            assert got == (tokens[: len(got)] if seq in cancel_at else tokens), f"seed {seed}, request {seq.id}"
            if items and items[0].prefill is not None:
                assert [t.id for t in items[0].prefill] == list(seq.request.input_ids), f"seed {seed}"
        assert scheduler.blocks.used_blocks == 0 and not shard.held, f"seed {seed}"


def test_a_failed_step_with_the_next_one_out(tokenizer):
    """Step k fails while step k + 1, planned with it, is out: k's requests fail, and k + 1's answer (the shard
    refused what referred to k's new request) changes nothing; the plan after cleans up."""
    scheduler, shard = make(tokenizer)
    old = scheduler.submit(request(prompt(80, 5), 20))
    plan = scheduler.schedule()
    scheduler.update(plan, shard.step(plan.to_pb()))
    new = scheduler.submit(request(prompt(81, 5), 20))
    failed, after = scheduler.schedule(), scheduler.schedule()
    assert {c.seq for c in after.chunks} == {old, new}
    outputs = scheduler.fail(failed, GenerationError("the shard went away"))
    assert {seq for seq, _ in outputs} == {old, new}
    assert scheduler.fail(after, GenerationError("request not held")) == []
    plan = scheduler.schedule()
    assert plan.released == (old.id,) and not plan.chunks  # new was never held by the shard
    scheduler.update(plan, shard.step(plan.to_pb()))
    assert not shard.held and scheduler.blocks.used_blocks == 0 and scheduler.schedule() is None


# ----- Infer: the loop around the planner --------------------------------------------------------------------


class MirrorClient:
    """The mirror behind an async `step`, as the router's ShardedClient offers it."""

    def __init__(self, shard: ShardMirror, delay: float = 0.0, fail: bool = False):
        self.shard, self.delay, self.fail = shard, delay, fail

    async def step(self, request_pb):
        await asyncio.sleep(self.delay)
        if self.fail:
            raise GenerationError("shard 0 Step failed (INVALID_ARGUMENT): bad plan")
        return StepResult(generations=list(self.shard.step(request_pb).generations), forward_ns=1, decode_ns=1)

    async def health(self):
        return None


def arun(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_infer_streams_tokens_and_ends_on_the_last(tokenizer):
    async def main():
        scheduler, shard = make(tokenizer)
        infer = Infer(scheduler, MirrorClient(shard), max_concurrent_requests=8)
        infer.start()
        try:
            results = await asyncio.gather(*(infer.generate(request(prompt(i, 6), 9)) for i in range(6)))
        finally:
            await infer.stop()
        for i, (tokens, end) in enumerate(results):
            assert [t.token.id for t in tokens] == reference(prompt(i, 6), 9)
            assert all(t.end is None for t in tokens[:-1]) and tokens[-1].end is end
            assert end.generated_text == "".join(t.token.text for t in tokens)

    arun(main())


def test_overloaded_before_anything_is_yielded_and_closed_streams_cancel(tokenizer):
    async def main():
        scheduler, shard = make(tokenizer)
        infer = Infer(scheduler, MirrorClient(shard, delay=0.01), max_concurrent_requests=2)
        infer.start()
        try:
            first = infer.stream(request(prompt(1, 4), 200))
            second = infer.stream(request(prompt(2, 4), 200))
            with pytest.raises(OverloadedError):
                infer.stream(request(prompt(3, 4), 5))
            async with contextlib.aclosing(first) as stream:
                async for _ in stream:
                    break  # the client disconnects after one token
            await second.aclose()
            assert await infer.wait_idle(5)
            for _ in range(50):
                if not shard.held and scheduler.blocks.used_blocks == 0:
                    break
                await asyncio.sleep(0.02)
            assert not shard.held and scheduler.blocks.used_blocks == 0
        finally:
            await infer.stop()

    arun(main())


def test_a_failing_step_fails_its_streams_and_the_loop_goes_on(tokenizer):
    async def main():
        scheduler, shard = make(tokenizer)
        client = MirrorClient(shard, fail=True)
        infer = Infer(scheduler, client, max_concurrent_requests=8)
        infer.start()
        try:
            with pytest.raises(GenerationError, match="bad plan"):
                await infer.generate(request(prompt(1, 4), 5))
            client.fail = False
            tokens, end = await infer.generate(request(prompt(2, 4), 5))
            assert [t.token.id for t in tokens] == reference(prompt(2, 4), 5) and end.finish_reason == "length"
        finally:
            await infer.stop()

    arun(main())


def test_router_core_does_not_import_torch():
    import subprocess

    code = (
        "import sys\n"
        "import text_generation_router.scheduler, text_generation_router.block_manager, text_generation_router.infer\n"
        "import text_generation_router.client, text_generation_router.cli, text_generation_router.text\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
