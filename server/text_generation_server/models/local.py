"""Requests run to completion in this process, without a router: the `generate` command, benchmarks, tests.

A plain planner: every request added runs from the next step on, its KV blocks taken from a free list for its
whole prompt + max_new_tokens when it is added (no admission control, preemption or prefix cache: serving
does those in the router). Each step computes `chunk_size` prompt tokens of every request still prefilling
(its whole prompt when chunk_size is None) and one token of every decoding request.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from text_generation_server.models.flash_causal_lm import FlashCausalLM
from text_generation_server.models.types import FinishReason, Generation, NewRequest, ScheduledRequest, Step, Tokens


@dataclass
class LocalResult:
    """Everything one request produced."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_tokens: list[Tokens] = field(default_factory=list)
    prefill: Tokens = field(default_factory=lambda: Tokens([], []))
    finish_reason: FinishReason | None = None


@dataclass(eq=False)
class _Pending:
    new: NewRequest
    blocks: list[int]
    computed: int
    sent: bool = False
    result: LocalResult = field(default_factory=LocalResult)


class LocalRunner:
    def __init__(self, model: FlashCausalLM, chunk_size: int | None = None):
        if model.kv_cache is None:
            raise ValueError("allocate the model's KV cache before running requests")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.free_blocks = list(range(model.kv_cache.num_blocks))
        self.running: dict[int, _Pending] = {}
        self.results: dict[int, LocalResult] = {}
        self._ids = itertools.count()

    def add(self, new: NewRequest) -> int:
        """Queue a request for the next step; its id."""
        block_size = self.model.kv_cache.block_size
        needed = math.ceil((new.prompt_length + new.stopping.max_new_tokens - 1) / block_size)
        needed = max(needed, math.ceil(len(new.token_ids) / block_size))
        if needed > len(self.free_blocks):
            raise ValueError(f"the KV cache has {len(self.free_blocks)} free blocks, the request needs {needed}")
        # taken from the end and reversed: a request's blocks are neither contiguous nor ascending
        blocks = list(reversed([self.free_blocks.pop() for _ in range(needed)]))
        request_id = next(self._ids)
        self.running[request_id] = _Pending(new, blocks, computed=new.num_cached_tokens)
        self.results[request_id] = self.running[request_id].result
        return request_id

    def step(self) -> list[Generation]:
        """One step over every unfinished request; its generations."""
        scheduled = []
        for request_id, pending in self.running.items():
            known = len(pending.new.token_ids) + len(pending.result.token_ids)
            remaining = known - pending.computed
            n = remaining if self.chunk_size is None or remaining == 1 else min(remaining, self.chunk_size)
            scheduled.append(
                ScheduledRequest(
                    id=request_id,
                    num_tokens=n,
                    new_blocks=() if pending.sent else tuple(pending.blocks),
                    new=None if pending.sent else pending.new,
                )
            )
            pending.sent = True
            pending.computed += n
        generations = self.model.step(Step(requests=tuple(scheduled)))
        for generation in generations:
            pending = self.running[generation.request_id]
            result = pending.result
            if generation.prefill is not None:
                result.prefill.ids.extend(generation.prefill.ids)
                result.prefill.logprobs.extend(generation.prefill.logprobs)
            if generation.token_id is None:
                continue
            result.token_ids.append(generation.token_id)
            result.logprobs.append(generation.logprob)
            if generation.top_tokens is not None:
                result.top_tokens.append(generation.top_tokens)
            if generation.finish_reason is not None:
                result.finish_reason = generation.finish_reason
                self.free_blocks.extend(self.running.pop(generation.request_id).blocks)
        return generations

    def run(self) -> dict[int, LocalResult]:
        """Step until every request finished; the results by request id."""
        while self.running:
            self.step()
        return self.results


def generate(model: FlashCausalLM, requests: list[NewRequest], chunk_size: int | None = None) -> list[LocalResult]:
    """Run `requests` together to completion; their results in order."""
    runner = LocalRunner(model, chunk_size)
    ids = [runner.add(new) for new in requests]
    results = runner.run()
    return [results[i] for i in ids]
