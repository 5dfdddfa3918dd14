"""The scheduler: a synchronous, torch-free planner that decides every step.

    plan = scheduler.schedule()              # who computes how many tokens, with which new KV blocks
    response = await client.step(plan.to_pb())   # the shards run it as one forward (Infer's loop does the I/O)
    outputs = scheduler.update(plan, response)   # tokens and ends, for the requests' streams

Every request is one `Sequence`: its tokens (prompt, then generated), how many of them are computed (their
keys/values are in the cache), its blocks and its text. A step fills one token budget (`max_batch_tokens`,
TGI's --max-batch-prefill-tokens) in this order:

  1. one token for every decoding request (oldest first);
  2. the next prompt chunk of every running request still computing its prompt (oldest first);
  3. waiting requests, in arrival order, each with as much of its prompt as the budget and the blocks allow.

So a prompt longer than the budget is prefilled over several steps while the running streams keep decoding,
and new requests join the very next step: the old "prefill new requests, then decode" alternation, and with it
TGI's --waiting-served-ratio and --max-waiting-tokens, has no role left. A request is only admitted while the
running ones leave budget for it, so every running request can always decode.

KV blocks come from the `BlockManager` as a request's tokens need them. With prefix caching a new request first
takes the cached blocks its tokens start with and computes only the rest (at least its last token, whose logits
it needs); a request that asks for prompt logprobs computes its whole prompt. Blocks a request fills are
registered in the cache when its step is done. Under dynamic NTK (`dynamic_rope_limit`), keys of positions in
a sequence longer than max_position_embeddings depend on the prompt's length, so that length is part of such a
block's identity (blocks holding generated tokens past the limit are not cached at all).

When a decoding request needs a block and none is free, the most recently admitted running requests are
preempted: they let go of their blocks (blocks another request reads stay held), go back to the front of the
queue with nothing computed, and are computed again later (prompt and generated tokens, finding whatever is
still cached). Their streams just continue: tokens and text live in the Sequence, nothing is decoded again.

The shard holds each request from its first step (the plan then carries it whole) until it reports a finish
(length, EOS) or the router releases it (`StepPlan.released`: a stop sequence, a cancellation, a preemption).

Steps are planned one ahead: `schedule()` may be called again before the last plan's `update()`, so that the
shard starts the next step as soon as it has run one, while the router applies that one's results. A plan
therefore applies what the shard will hold once it has run it (computed positions, blocks, the request held)
when it is made, and `update()` applies only what the step produced (tokens, ends, filled blocks for the prefix
cache). A request whose next token is still to come counts it as `pending` and decodes again at once: the shard
knows the token it chose. A request that ends in a step (EOS, a stop sequence) may already be planned in the
next one: the shard skips it there, and that step's output for it is dropped.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from text_generation_router import metrics
from text_generation_router.block_manager import BlockHash, BlockManager, block_hash
from text_generation_router.text import TextStream
from text_generation_router.types import (
    GenerationError,
    GenerationRequest,
    StreamEnd,
    StreamToken,
    Token,
)
from text_generation_common.pb import generate_pb2 as pb

SHARD_FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS_TOKEN: "eos_token"}


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 4096  # tokens one step computes at most (decode tokens and prompt chunks)
    prefix_caching: bool = True
    dynamic_rope_limit: int | None = None  # max_position_embeddings when the rope is dynamic NTK


@dataclass(eq=False)
class Sequence:
    """One request's life in the router: waiting, running (maybe preempted and waiting again), finished."""

    id: int  # the shard's request id, kept across preemptions
    request: GenerationRequest
    text: TextStream
    queued_at: float
    token_ids: list[int]  # the prompt, then the generated tokens
    num_computed: int = 0  # positions computed by the steps planned so far (their keys/values in the cache)
    num_done: int = 0  # of them, those computed by steps whose results have been applied
    pending: int = 0  # tokens that planned steps will choose, whose results have not come yet (one per step)
    lease: int = 0  # counts the times it let go of its blocks: a chunk planned under an older lease is stale
    blocks: list[int] = field(default_factory=list)  # block i holds positions [i·block_size, (i+1)·block_size)
    block_hashes: list[BlockHash] = field(default_factory=list)  # of blocks[: len(block_hashes)], full ones
    prefix_hashes: list[BlockHash] = field(default_factory=list)  # its full blocks before its last token, at admission
    hashes_stopped: bool = False  # a block could not be cached, so neither can any after it
    blocks_on_shard: int = 0  # how many of `blocks` the shard's copy of the table holds
    on_shard: bool = False  # the shard holds this request
    admitted_seq: int = 0  # larger: admitted more recently (preempted first)
    started_at: float | None = None  # first step
    preemptions: int = 0
    prefill: list[Token] = field(default_factory=list)  # prompt logprobs gathered over the prompt's chunks
    prefill_sent: bool = False
    cancelled: bool = False
    finished: bool = False
    stream: Any = None  # where Infer delivers this request's outputs

    @property
    def prompt_length(self) -> int:
        return len(self.request.input_ids)

    @property
    def generated(self) -> int:
        return len(self.token_ids) - self.prompt_length

    @property
    def length(self) -> int:
        """Its tokens once the planned steps have run: the known ones and the pending ones."""
        return len(self.token_ids) + self.pending

    @property
    def uncomputed(self) -> int:
        return self.length - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.uncomputed == 1 and self.length > self.prompt_length

    @property
    def has_all_tokens(self) -> bool:
        """Its last token (max_new_tokens) is known or pending: no step is planned for it any more."""
        return self.length - self.prompt_length >= self.request.max_new_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.request.prefill_logprobs and not self.prefill_sent


@dataclass(frozen=True)
class Chunk:
    """One request's share of a step."""

    seq: Sequence
    start: int  # its first uncomputed position when planned
    num_tokens: int
    new_blocks: tuple[int, ...]  # blocks the shard's table gains before the step
    new: bool  # the shard does not hold the request: the plan carries it whole
    chooses: bool  # it reaches the end of the request's tokens: the step chooses the next one
    lease: int  # the sequence's lease when planned

    @property
    def decodes(self) -> bool:
        """One generated token computed (a decode), not a chunk of a prompt or of re-computed tokens."""
        return self.num_tokens == 1 and self.start >= self.seq.prompt_length


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[Chunk, ...]
    released: tuple[int, ...]  # requests the shard forgets before the step
    kind: str  # TGI's metric label: "prefill" when the step computes prompt tokens, else "decode"

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def to_pb(self) -> pb.StepRequest:
        return pb.StepRequest(released=self.released, requests=[_scheduled_pb(c) for c in self.chunks])


def _scheduled_pb(chunk: Chunk) -> pb.ScheduledRequest:
    scheduled = pb.ScheduledRequest(id=chunk.seq.id, num_tokens=chunk.num_tokens, new_blocks=chunk.new_blocks)
    if chunk.new:
        seq = chunk.seq
        r, p = seq.request, seq.request.parameters
        scheduled.new_request.CopyFrom(
            pb.NewRequest(
                token_ids=seq.token_ids,
                prompt_length=seq.prompt_length,
                num_cached_tokens=chunk.start,
                parameters=pb.NextTokenChooserParameters(
                    temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
                    do_sample=p.do_sample, seed=p.seed, repetition_penalty=p.repetition_penalty,
                    frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
                    output_frequency_penalty=p.output_frequency_penalty, logit_bias=dict(p.logit_bias),
                ),
                stopping_parameters=pb.StoppingCriteriaParameters(
                    max_new_tokens=r.max_new_tokens, ignore_eos_token=r.ignore_eos_token,
                    stop_token_ids=r.stop_token_ids,
                ),
                prefill_logprobs=seq.wants_prompt_logprobs,
                top_n_tokens=r.top_n_tokens,
                omit_token_logprobs=not r.token_logprobs,
                grammar=r.grammar,
            )
        )
    return scheduled


Output = tuple[Sequence, "StreamToken | Exception"]


class Scheduler:
    def __init__(self, blocks: BlockManager, tokenizer: Any, config: SchedulerConfig = SchedulerConfig()):
        if config.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {config.max_batch_tokens}")
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.tokenizer = tokenizer
        self.config = config
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # in admission order
        self._released: list[int] = []  # request ids the next step tells the shard to forget
        self._ids = itertools.count()
        self._admissions = itertools.count(1)
        self.stats = {"steps": 0, "preempted": 0, "max_running": 0}
        metrics.batch_max_total_tokens.set(blocks.capacity_tokens)
        metrics.kv_blocks_capacity.set(blocks.num_blocks)

    # ----- requests -------------------------------------------------------------------------------------

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    def running_size(self) -> int:
        return len(self._running)

    def blocks_needed(self, request: GenerationRequest) -> int:
        """Blocks a request holds at its longest: every position a step writes (the last token is not fed back)."""
        return self.blocks.blocks_for(len(request.input_ids) + request.max_new_tokens - 1)

    def submit(self, request: GenerationRequest) -> Sequence:
        """Queue a request; raises GenerationError for one that could never run."""
        if not request.input_ids:
            raise GenerationError("the prompt is empty")
        if request.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        need = self.blocks_needed(request)
        if need > self.blocks.num_blocks:
            raise GenerationError(
                f"the request needs {need} KV blocks of {self.block_size} tokens "
                f"({len(request.input_ids)} prompt + {request.max_new_tokens} new tokens) but the KV cache only "
                f"has {self.blocks.num_blocks} blocks ({self.blocks.capacity_tokens} tokens): it can never run"
            )
        seq = Sequence(
            id=next(self._ids),
            request=request,
            text=TextStream(self.tokenizer, request.input_ids, request.stop_sequences, request.shown_special_ids),
            queued_at=time.monotonic(),
            token_ids=list(request.input_ids),
        )
        self._waiting.append(seq)
        metrics.queue_size.set(len(self._waiting))
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The client went away: a waiting request leaves now, a running one with the next plan."""
        if seq.finished or seq.cancelled:
            return
        seq.cancelled = True
        if seq in self._waiting:
            self._waiting.remove(seq)
            seq.finished = True
            metrics.queue_size.set(len(self._waiting))

    # ----- planning -------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step, or None when there is nothing to do."""
        for seq in [s for s in self._running if s.cancelled]:
            self._retire(seq)
        budget = self.config.max_batch_tokens
        chunks: list[Chunk] = []
        planned: set[int] = set()

        for seq in list(self._running):  # 1. decoding requests: one token each
            if seq in self._running and seq.is_decoding and not seq.has_all_tokens:
                if self._make_room(seq, 1, planned):
                    chunks.append(self._chunk(seq, 1))
                    planned.add(seq.id)
                    budget -= 1
                else:
                    self._preempt(seq)

        for seq in list(self._running):  # 2. running requests still computing their prompt
            if budget == 0:
                break
            if seq in self._running and seq.id not in planned and not seq.is_decoding:
                count = self._chunk_size(seq, budget, planned)
                if count:
                    chunks.append(self._chunk(seq, count))
                    planned.add(seq.id)
                    budget -= count

        admitted = 0
        while budget > 0 and self._waiting:  # 3. waiting requests, in order; the first that does not fit waits
            seq = self._waiting[0]
            count = self._admit(seq, budget)
            if count == 0:
                break
            self._waiting.popleft()
            chunks.append(self._chunk(seq, count))
            budget -= count
            admitted += 1
        if admitted:
            metrics.batch_next_size.observe(admitted)

        released, self._released = tuple(self._released), []
        self._update_gauges()
        if not chunks and not released:
            return None
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(self._running))
        kind = "decode" if all(c.decodes for c in chunks) else "prefill"
        return StepPlan(tuple(chunks), released, kind)

    def _chunk(self, seq: Sequence, count: int) -> Chunk:
        """`count` tokens of `seq` in this step; what the shard holds after it is applied now (see the top)."""
        assert len(seq.blocks) * self.block_size >= seq.num_computed + count, "blocks were made room for"
        chooses = seq.num_computed + count == seq.length
        chunk = Chunk(
            seq, seq.num_computed, count, tuple(seq.blocks[seq.blocks_on_shard :]), not seq.on_shard, chooses,
            seq.lease,
        )
        seq.num_computed += count
        seq.blocks_on_shard = len(seq.blocks)
        seq.on_shard = True
        seq.pending += chooses
        return chunk

    def _blocks_short(self, seq: Sequence, count: int) -> int:
        """Blocks `seq` still needs to compute `count` more tokens."""
        return self.blocks.blocks_for(seq.num_computed + count) - len(seq.blocks)

    def _make_room(self, seq: Sequence, count: int, planned: set[int]) -> bool:
        """Give `seq` the blocks for `count` more tokens, preempting running requests admitted after it (the
        newest first) that this step has not planned; False when even that is not enough."""
        short = self._blocks_short(seq, count)
        while short > self.blocks.free_blocks:
            victims = [
                s for s in self._running if s.admitted_seq > seq.admitted_seq and s.id not in planned
            ]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda s: s.admitted_seq))
        if short > 0:
            seq.blocks.extend(self.blocks.allocate(short))
        return True

    def _chunk_size(self, seq: Sequence, budget: int, planned: set[int]) -> int:
        """How much of its prompt a running request computes this step (its blocks allocated); 0: none."""
        count = min(seq.uncomputed, budget)
        if not self._make_room(seq, count, planned):
            # as much as the free blocks hold; then making room preempts nobody
            count = min(count, (len(seq.blocks) + self.blocks.free_blocks) * self.block_size - seq.num_computed)
            if count <= 0 or not self._make_room(seq, count, planned):
                return 0
        return count

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Start a waiting request with as many tokens as fit (its cached prefix taken); 0 when none fit now."""
        assert not seq.cancelled, "cancel() removes waiting requests"
        assert not seq.blocks and seq.num_computed == 0
        if seq.pending:  # preempted while its next token was computed: it comes back with that token
            return 0
        looked_up = self.blocks.prefix_caching and not seq.wants_prompt_logprobs
        if looked_up:
            if not seq.prefix_hashes:  # kept while it waits: its tokens only change once it runs
                seq.prefix_hashes = list(self._prefix_hashes(seq))
            seq.blocks = self.blocks.lookup(seq.prefix_hashes)
            seq.block_hashes = seq.prefix_hashes[: len(seq.blocks)]
            seq.num_computed = len(seq.blocks) * self.block_size
            missing = seq.prefix_hashes[len(seq.blocks) : len(seq.blocks) + 1]
            if missing and missing[0] in self._blocks_being_computed():
                # a running request is computing this very block: wait for it instead of computing it twice
                self._undo_admission(seq)
                return 0
        cached_tokens = seq.num_computed
        # keep one free block per running request: each may need one to decode its next token
        spare = self.blocks.free_blocks - len(self._running)
        count = min(seq.uncomputed, budget, (len(seq.blocks) + spare) * self.block_size - seq.num_computed)
        if count <= 0:
            self._undo_admission(seq)
            return 0
        seq.blocks.extend(self.blocks.allocate(self._blocks_short(seq, count)))
        if looked_up:
            metrics.prefix_cache_queries.inc(len(seq.token_ids))
            metrics.prefix_cache_hits.inc(cached_tokens)
        seq.admitted_seq = next(self._admissions)
        if seq.started_at is None:
            seq.started_at = time.monotonic()
        self._running.append(seq)
        return count

    def _undo_admission(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.block_hashes, seq.num_computed = [], [], 0

    def _blocks_being_computed(self) -> set[BlockHash]:
        """Hashes of the full prompt blocks that running requests have yet to compute or whose steps have not
        answered (this step's included): they are registered in the cache once done."""
        return {digest for s in self._running for digest in s.prefix_hashes[s.num_done // self.block_size :]}

    def _prefix_hashes(self, seq: Sequence) -> Iterator[BlockHash]:
        """Hashes of the full blocks a new request could find cached: every full block before its last token."""
        parent = None
        for index in range((len(seq.token_ids) - 1) // self.block_size):
            extra = self._extra_key(seq, index)
            if extra is None:
                return
            parent = block_hash(parent, seq.token_ids[index * self.block_size : (index + 1) * self.block_size], extra)
            yield parent

    def _extra_key(self, seq: Sequence, index: int) -> int | None:
        """What, besides its tokens, block `index`'s keys depend on; None: the block is not to be shared.

        Under dynamic NTK a token at position p of a request with an L-token prompt is rotated for a sequence of
        max(L, p + 1) tokens, and the base changes only past the limit M. A block of prompt tokens therefore
        depends on L when L > M, and a block holding generated tokens past M depends on each token's own
        length, which no other request's prompt shares.
        """
        limit = self.config.dynamic_rope_limit
        end = (index + 1) * self.block_size  # the block holds positions < end
        if limit is None or max(seq.prompt_length, end) <= limit:
            return 0
        if end <= seq.prompt_length:
            return seq.prompt_length
        return None

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks `seq`'s answered steps have filled since the last one."""
        if not self.blocks.prefix_caching:
            return
        full = seq.num_done // self.block_size
        while not seq.hashes_stopped and len(seq.block_hashes) < full:
            index = len(seq.block_hashes)
            extra = self._extra_key(seq, index)
            if extra is None:
                seq.hashes_stopped = True
                return
            if index < len(seq.prefix_hashes):  # hashed already at admission
                seq.block_hashes.append(seq.prefix_hashes[index])
            else:
                parent = seq.block_hashes[-1] if seq.block_hashes else None
                tokens = seq.token_ids[index * self.block_size : (index + 1) * self.block_size]
                seq.block_hashes.append(block_hash(parent, tokens, extra))
            self.blocks.register(seq.blocks[index], seq.block_hashes[-1])

    # ----- leaving ----------------------------------------------------------------------------------------

    def _retire(self, seq: Sequence) -> None:
        """`seq` ends for good (finished, failed or cancelled): its blocks are let go. It is running, or waiting
        after a preemption that came while its last token was being chosen."""
        seq.finished = True
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._let_go(seq)

    def _let_go(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.block_hashes, seq.prefix_hashes, seq.hashes_stopped = [], [], [], False
        seq.num_computed = seq.num_done = seq.blocks_on_shard = 0
        seq.lease += 1
        if seq.on_shard:
            self._released.append(seq.id)
            seq.on_shard = False

    def _preempt(self, seq: Sequence) -> None:
        metrics.request_preempted.inc()
        self.stats["preempted"] += 1
        seq.preemptions += 1
        self._running.remove(seq)
        self._let_go(seq)
        # the most recently admitted goes first, so the oldest ends up at the very front
        self._waiting.appendleft(seq)

    # ----- results ----------------------------------------------------------------------------------------

    def update(self, plan: StepPlan, response: Any) -> list[Output]:
        """Apply a step's results (`response.generations`, rank 0's); the outputs for the requests' streams.

        Plans are applied in the order they were made. A request that ended since its chunk was planned gets
        nothing from it; one preempted since (a stale chunk) still takes the token the step chose."""
        by_id = {g.request_id: g for g in response.generations}
        outputs: list[Output] = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.finished:
                continue  # a stop sequence, a cancellation or a failure since it was planned
            generation = by_id.get(seq.id)
            current = chunk.lease == seq.lease
            if current:
                if generation is not None and generation.HasField("finish_reason"):
                    seq.on_shard = False  # the shard forgot it
                seq.num_done = chunk.start + chunk.num_tokens
                self._cache_full_blocks(seq)
            seq.pending -= chunk.chooses
            if seq.cancelled:
                continue  # released with the next plan
            if generation is not None and generation.prefill_tokens.ids:
                # a chunk from position s reports prompt positions s + 1 on (0 on for s = 0): what a chunk from
                # before a preemption had reported is replaced as the prompt is computed again
                del seq.prefill[chunk.start + 1 if chunk.start else 0 :]
                seq.prefill.extend(self._tokens(generation.prefill_tokens))
            if generation is not None and generation.HasField("token_id"):
                outputs.append((seq, self._next_token(seq, generation)))
            elif chunk.chooses:
                error = GenerationError(f"the shard computed request {seq.id}'s last token but chose no next one")
                outputs.append(self._fail(seq, error))
        self._update_gauges()
        return outputs

    def _next_token(self, seq: Sequence, generation: Any) -> StreamToken:
        token_id = generation.token_id
        seq.token_ids.append(token_id)
        assert seq.generated <= seq.request.max_new_tokens, "the shard stops at max_new_tokens"
        reason = None
        if generation.HasField("finish_reason"):
            reason = SHARD_FINISH_REASONS[generation.finish_reason]
        piece = seq.text.push(token_id, ends_by_eos=reason == "eos_token")
        if reason is None and seq.text.stopped:
            reason = "stop_sequence"
        end = None
        if reason is not None:
            piece += seq.text.flush()
            end = self._end(seq, reason)
            self._retire(seq)
        prefill = None
        if seq.request.prefill_logprobs and not seq.prefill_sent:
            prefill, seq.prefill_sent = tuple(seq.prefill), True
        special = token_id in self.tokenizer.special_token_ids
        token = Token(id=token_id, text=piece, logprob=_logprob(generation.logprob), special=special)
        return StreamToken(token=token, top_tokens=tuple(self._tokens(generation.top_tokens)), prefill=prefill, end=end)

    def _end(self, seq: Sequence, reason: str) -> StreamEnd:
        now = time.monotonic()
        started = seq.started_at if seq.started_at is not None else now
        params = seq.request.parameters
        return StreamEnd(
            generated_text=seq.text.text,
            finish_reason=reason,
            generated_tokens=seq.generated,
            seed=params.seed if params.do_sample else None,
            input_length=seq.prompt_length,
            queue_s=started - seq.queued_at,
            inference_s=now - started,
        )

    def _tokens(self, tokens: Any) -> list[Token]:
        """pb.Tokens -> Tokens, each decoded alone."""
        special = self.tokenizer.special_token_ids
        return [
            Token(id=i, text=self.tokenizer.decode([i]), logprob=_logprob(logprob), special=i in special)
            for i, logprob in zip(tokens.ids, tokens.logprobs)
        ]

    def fail(self, plan: StepPlan, error: Exception) -> list[Output]:
        """The step failed: the shards changed nothing, so its releases are due again and its requests fail."""
        self._released.extend(plan.released)
        for chunk in plan.chunks:
            if chunk.new and chunk.lease == chunk.seq.lease:
                chunk.seq.on_shard = False  # its first step never ran: there is nothing to release
        outputs = [self._fail(chunk.seq, error) for chunk in plan.chunks if not chunk.seq.finished]
        self._update_gauges()
        return outputs

    def shutdown(self, error: Exception) -> list[Output]:
        """Fail every request, waiting or running."""
        outputs = [self._fail(seq, error) for seq in [*self._running, *self._waiting]]
        self._waiting.clear()
        self._update_gauges()
        return outputs

    def _fail(self, seq: Sequence, error: Exception) -> Output:
        if seq in self._running or seq in self._waiting:
            self._retire(seq)
        seq.finished = True
        return seq, error

    def _update_gauges(self) -> None:
        metrics.queue_size.set(len(self._waiting))
        metrics.batch_current_size.set(len(self._running))
        metrics.batch_current_max_tokens.set(sum(len(s.token_ids) for s in self._running))
        metrics.kv_blocks_used.set(self.blocks.used_blocks)
        metrics.kv_blocks_cached.set(self.blocks.cached_blocks)


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
