"""The engine: one forward per step over a ragged batch of decode tokens and prompt chunks, on a paged KV cache.

The router plans every step (`Step`): which requests run, how many tokens each computes and which blocks are
appended to each block table. The engine holds one `RequestState` per request between steps (its tokens, the
block table it mirrors from the plans, its sampler) and decides nothing about blocks or scheduling. A request
computes `num_tokens` tokens from its first uncomputed position; once it has computed every token it knows,
the step chooses its next token. It leaves when it finishes (max_new_tokens or an EOS id, decided here) or when
the router releases it. A request's tokens never depend on its neighbours in a step.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from text_generation_server import device as device_layer
from text_generation_server.layers.rotary import RotaryEmbedding
from text_generation_server.models.config import ModelConfig, read_eos_token_ids, read_json
from text_generation_server.models.types import (
    FinishReason,
    Generation,
    NewRequest,
    SamplingParameters,
    ScheduledRequest,
    Step,
    StoppingParameters,
    Tokens,
)
from text_generation_server.ops import AttentionMetadata, KVCache, select_ops
from text_generation_server.utils.dist import SINGLE_RANK, TensorParallelGroup
from text_generation_server.utils.constraint import GrammarConstraint
from text_generation_server.utils.sampling import TokenSampler, choose_tokens, chosen_logprobs
from text_generation_common.grammar import GrammarCompiler, GrammarError
from text_generation_common.tokenizer import Tokenizer
from text_generation_server.utils.weights import Weights, weight_files


@dataclass(eq=False)
class RequestState:
    """One request the shard holds, from its first step until it finishes or the router releases it."""

    id: int
    token_ids: list[int]  # the prompt, then every generated token (those from before a preemption too)
    prompt_length: int
    num_computed: int  # tokens whose keys/values are in the cache; the next position this request computes
    block_table: list[int]  # block i holds positions [i·block_size, (i+1)·block_size); mirrors the router's
    sampler: TokenSampler
    stopping: StoppingParameters
    prefill_logprobs: bool
    top_n_tokens: int
    token_logprobs: bool

    @property
    def wants_logprobs(self) -> bool:
        """Whether its chosen tokens' logprobs are computed (asked for, or needed for its top tokens)."""
        return self.token_logprobs or self.top_n_tokens > 0

    @property
    def generated(self) -> int:
        return len(self.token_ids) - self.prompt_length


@dataclass
class _Row:
    """Where one scheduled request's tokens and logits sit in the step's forward."""

    state: RequestState
    num_tokens: int
    first_row: int  # its first token among the T tokens of the forward
    samples: bool  # this step computes its last known token, so it chooses the next one
    logprob_positions: range = field(default_factory=lambda: range(0))  # prompt positions whose logits it returns


class FlashCausalLM:
    """A decoder-only model with its tokenizer, its paged KV cache, the requests it holds and the step."""

    model_class: type[torch.nn.Module]  # set by each architecture's subclass

    def __init__(
        self,
        model_dir: Path,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        tp: TensorParallelGroup = SINGLE_RANK,
        kernels: str = "auto",
        block_size: int | None = None,
    ):
        """kernels: the ops backend (`text_generation_server.ops.select_ops`); block_size: tokens per KV block
        (default: the backend's). Both are checked against the backend's rules before any weight loads."""
        config.check_world_size(tp.world_size)
        self.model_dir = model_dir
        self.config = config
        self.dtype = dtype
        self.device = device
        self.tp = tp
        self.ops = select_ops(device, kernels, config.head_dim, dtype)
        # KV heads held by this rank: the cache is split over the ranks like the attention
        self.num_kv_heads = config.num_key_value_heads // tp.world_size
        self.block_size = block_size or self.ops.default_block_size
        self.ops.check_kv_layout(self.block_size, config.head_dim, dtype)
        self.ops.check_attention_shape(config.num_attention_heads // tp.world_size, self.num_kv_heads, config.head_dim)
        self.tokenizer = Tokenizer.from_pretrained(model_dir, vocab_size=config.vocab_size)
        weights = Weights(weight_files(model_dir), dtype, device, tp, ops=self.ops)
        self.model = self.model_class(config, weights, self.ops).eval()
        weights.check_all_used()
        weights.close()
        self.eos_token_ids = self._eos_token_ids()
        self.grammars = GrammarCompiler(self.tokenizer, self.eos_token_ids)
        scaling = config.rope_scaling
        self.rotary = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings,
            scaling.type if scaling is not None else None, scaling.factor if scaling is not None else 1.0,
        )
        self.kv_cache: KVCache | None = None
        self.requests: dict[int, RequestState] = {}
        self.finished_last_step: frozenset[int] = frozenset()  # requests the last step finished (and forgot)
        self.last_forward_ns = 0  # time of the model forward in the last step (device-synchronised)

    def _eos_token_ids(self) -> frozenset[int]:
        """generation_config's EOS ids (every one of a list) and the tokenizer's EOS."""
        ids = set(read_eos_token_ids(self.model_dir, read_json(self.model_dir / "config.json")))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # ----- KV cache -------------------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes on this rank."""
        c = self.config
        return self.ops.kv_bytes_per_token(c.num_hidden_layers, self.num_kv_heads, c.head_dim, self.dtype)

    def allocate_kv_cache(self, num_blocks: int, block_size: int | None = None) -> KVCache:
        """A new cache of `num_blocks` blocks (of `self.block_size` tokens unless given); every request held so
        far is forgotten."""
        self.clear()
        self.kv_cache = None  # drop the old cache before allocating the new one
        c = self.config
        self.kv_cache = self.ops.allocate_kv_cache(
            c.num_hidden_layers, num_blocks, block_size or self.block_size, self.num_kv_heads,
            c.head_dim, self.dtype, self.device,
        )
        return self.kv_cache

    def clear(self) -> None:
        """Forget every request (the cache's contents stay; the router decides what its blocks hold)."""
        self.requests.clear()
        self.finished_last_step = frozenset()

    def warmup(
        self, max_input_tokens: int, max_prefill_tokens: int, max_total_tokens: int, memory_fraction: float
    ) -> KVCache:
        """Run the largest step the limits allow, then size the KV cache from the memory left.

        The warmup step computes `max_prefill_tokens` prompt tokens (the step's token budget) in requests of at
        most `max_input_tokens`, each sampling with every processor on, so a forward of that size is known to
        fit; a decode step follows. The cache then takes `memory_fraction` of the device memory available
        afterwards (on CPU: of the host's available RAM).
        """
        if not 1 <= max_input_tokens < max_total_tokens:
            raise ValueError(
                f"need 1 <= max_input_tokens ({max_input_tokens}) < max_total_tokens ({max_total_tokens})"
            )
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        block_size = self.block_size
        longest = min(max_input_tokens, max_prefill_tokens)
        lengths = [longest] * (max_prefill_tokens // longest)
        if max_prefill_tokens % longest:
            lengths.append(max_prefill_tokens % longest)
        per_request = [math.ceil((length + 1) / block_size) for length in lengths]
        self.allocate_kv_cache(sum(per_request), block_size)
        sampling = SamplingParameters(
            temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=True, repetition_penalty=1.2,
            frequency_penalty=0.1,
        )
        filler = self.tokenizer.encode("_test ", add_special_tokens=False) or [0]
        first_blocks = itertools.accumulate([0, *per_request])
        new = [
            ScheduledRequest(
                id=i,
                num_tokens=length,
                new_blocks=tuple(range(first, first + blocks)),
                new=NewRequest(
                    token_ids=tuple(itertools.islice(itertools.cycle(filler), length)),
                    prompt_length=length,
                    parameters=sampling,
                    stopping=StoppingParameters(max_new_tokens=2, ignore_eos_token=True),
                    top_n_tokens=5,
                ),
            )
            for i, (length, blocks, first) in enumerate(zip(lengths, per_request, first_blocks))
        ]
        self.step(Step(requests=tuple(new)))
        self.step(Step(requests=tuple(ScheduledRequest(id=r.id, num_tokens=1) for r in new)))
        assert not self.requests, "every warmup request generates 2 tokens and finishes"
        self.kv_cache = None
        device_layer.empty_cache(self.device)

        budget = int(device_layer.available_memory_bytes(self.device) * memory_fraction)
        num_blocks = budget // (self.kv_bytes_per_token * block_size)
        needed = math.ceil(max_total_tokens / block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache gets {budget} bytes ({num_blocks} blocks of {block_size} tokens), less than one "
                f"request of max_total_tokens {max_total_tokens} needs; lower max_total_tokens or raise the "
                f"memory fraction"
            )
        return self.allocate_kv_cache(num_blocks, block_size)

    # ----- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, step: Step) -> list[Generation]:
        """Run one planned step; the generations of the requests that chose a token or computed prompt logprobs.

        The whole plan is checked before anything changes: a bad plan raises ValueError naming the problem and
        leaves the held requests as they were.
        """
        if step.pipelined:
            step = self._without(step, self.finished_last_step)
        new_states = self._check(step)
        for request_id in step.released:
            del self.requests[request_id]
        self.requests.update(new_states)
        rows, first_row = [], 0
        for scheduled in step.requests:
            state = self.requests[scheduled.id]
            state.block_table.extend(scheduled.new_blocks)
            rows.append(self._row(state, scheduled.num_tokens, first_row))
            first_row += scheduled.num_tokens
        self.finished_last_step = frozenset()
        if not rows:
            return []

        forward_start = time.perf_counter_ns()
        logits, logits_rows = self._forward(rows)
        device_layer.synchronize(self.device)
        self.last_forward_ns = time.perf_counter_ns() - forward_start
        generations = self._advance(rows, logits, logits_rows)
        self.finished_last_step = frozenset(g.request_id for g in generations if g.finish_reason is not None)
        return generations

    @staticmethod
    def _without(step: Step, finished: frozenset[int]) -> Step:
        """`step` less the requests in `finished`, scheduled (not as new ones) or released."""
        if not finished:
            return step
        return Step(
            requests=tuple(r for r in step.requests if r.new is not None or r.id not in finished),
            released=tuple(r for r in step.released if r not in finished),
        )

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), V] at every position of one sequence computed from an empty cache, for
        offline checks (the converters' --verify). It writes blocks 0, 1, …: no request may be held."""
        if self.requests:
            raise ValueError("prompt_logits overwrites the KV cache: use it only while no request is held")
        state = self._new_state(-1, NewRequest(token_ids=tuple(token_ids), prompt_length=len(token_ids)))
        blocks = tuple(range(math.ceil(len(token_ids) / self.kv_cache.block_size)))
        self._check_scheduled(ScheduledRequest(state.id, len(token_ids), blocks), state)
        state.block_table.extend(blocks)
        logits, _ = self._forward([_Row(state, len(token_ids), 0, False, range(len(token_ids)))])
        return logits

    def _check(self, step: Step) -> dict[int, RequestState]:
        """Validate `step` against the held requests; the states of its new requests (nothing is changed)."""
        if self.kv_cache is None:
            raise ValueError("the KV cache is not allocated yet")
        released = set(step.released)
        if len(released) != len(step.released):
            raise ValueError(f"a request is released twice: {list(step.released)}")
        unknown = released - self.requests.keys()
        if unknown:
            raise ValueError(f"cannot release request {min(unknown)}: the shard does not hold it")
        held = self.requests.keys() - released
        ids = [r.id for r in step.requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a request is scheduled twice in one step: {ids}")
        new_states = {}
        for scheduled in step.requests:
            if scheduled.new is not None:
                if scheduled.id in held:
                    raise ValueError(f"request {scheduled.id} is new but the shard already holds it")
                new_states[scheduled.id] = self._new_state(scheduled.id, scheduled.new)
            elif scheduled.id not in held:
                raise ValueError(f"request {scheduled.id} is not held by the shard; its first step must carry it whole")
            state = new_states[scheduled.id] if scheduled.new is not None else self.requests[scheduled.id]
            self._check_scheduled(scheduled, state)
        return new_states

    def _new_state(self, request_id: int, new: NewRequest) -> RequestState:
        ids, vocab = new.token_ids, self.config.vocab_size
        if not ids:
            raise ValueError(f"request {request_id}: token_ids is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not 1 <= new.prompt_length <= len(ids):
            raise ValueError(
                f"request {request_id}: prompt_length {new.prompt_length} is not in [1, {len(ids)}] (its tokens)"
            )
        if not 0 <= new.num_cached_tokens < len(ids):
            raise ValueError(
                f"request {request_id}: num_cached_tokens {new.num_cached_tokens} must leave at least one of its "
                f"{len(ids)} tokens to compute"
            )
        if new.prefill_logprobs and new.num_cached_tokens:
            raise ValueError(
                f"request {request_id}: prefill_logprobs needs its whole prompt computed, but num_cached_tokens is "
                f"{new.num_cached_tokens}"
            )
        generated = len(ids) - new.prompt_length
        if new.stopping.max_new_tokens <= generated:
            raise ValueError(
                f"request {request_id}: max_new_tokens must be > the {generated} tokens generated already, got "
                f"{new.stopping.max_new_tokens}"
            )
        if new.top_n_tokens < 0:
            raise ValueError(f"request {request_id}: top_n_tokens must be >= 0, got {new.top_n_tokens}")
        sampler = TokenSampler(
            new.parameters, ids, vocab, self.device, draws_made=generated,
            grammar=self._grammar(request_id, new.grammar, ids[new.prompt_length :]) if new.grammar else None,
        )
        return RequestState(
            id=request_id, token_ids=list(ids), prompt_length=new.prompt_length, num_computed=new.num_cached_tokens,
            block_table=[], sampler=sampler, stopping=new.stopping, prefill_logprobs=new.prefill_logprobs,
            top_n_tokens=new.top_n_tokens, token_logprobs=new.token_logprobs,
        )

    def _grammar(self, request_id: int, grammar: str, generated: tuple[int, ...]) -> GrammarConstraint:
        try:
            matcher = self.grammars.matcher(grammar)
        except GrammarError as error:
            raise ValueError(f"request {request_id}: its grammar does not compile: {error}") from None
        return GrammarConstraint(matcher, sorted(self.eos_token_ids), generated)

    def _check_scheduled(self, scheduled: ScheduledRequest, state: RequestState) -> None:
        rid, n = scheduled.id, scheduled.num_tokens
        remaining = len(state.token_ids) - state.num_computed
        if not 1 <= n <= remaining:
            raise ValueError(f"request {rid}: num_tokens {n} is not in [1, {remaining}] (its uncomputed tokens)")
        num_blocks, block_size = self.kv_cache.num_blocks, self.kv_cache.block_size
        bad = [b for b in scheduled.new_blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"request {rid}: block {bad[0]} is outside [0, {num_blocks})")
        capacity = (len(state.block_table) + len(scheduled.new_blocks)) * block_size
        if state.num_computed + n > capacity:
            raise ValueError(
                f"request {rid}: its blocks hold {capacity} positions but this step writes up to position "
                f"{state.num_computed + n - 1}; append blocks first"
            )

    def _row(self, state: RequestState, num_tokens: int, first_row: int) -> _Row:
        stop = state.num_computed + num_tokens
        samples = stop == len(state.token_ids)
        logprob_positions = range(0)
        if state.prefill_logprobs and state.num_computed < state.prompt_length:
            logprob_positions = range(state.num_computed, min(stop, state.prompt_length))
        return _Row(state, num_tokens, first_row, samples, logprob_positions)

    def _forward(self, rows: list[_Row]) -> tuple[torch.Tensor, list[int]]:
        """Run the model over every row's new tokens; float32 logits [N, V] only where they are needed (the
        sampled positions and the asked prompt positions), and the forward row of each."""
        input_ids, meta = self._prepare(rows)
        hidden = self.model(input_ids, self.kv_cache, meta)  # [T, hidden]
        logits_rows = []
        for row in rows:
            offset = row.first_row - row.state.num_computed  # forward row of position p: offset + p
            wanted = [offset + p for p in row.logprob_positions]
            last = row.first_row + row.num_tokens - 1  # its last new token: where it samples
            if row.samples and last not in wanted[-1:]:
                wanted.append(last)
            logits_rows.extend(wanted)
        if not logits_rows:  # every request is in the middle of its prompt
            return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32), logits_rows
        index = torch.tensor(logits_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, index)), logits_rows

    def _prepare(self, rows: list[_Row]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Input ids [T] and the attention metadata of the step's forward."""
        block_size = self.kv_cache.block_size
        tokens, positions, slots, rope_lengths = [], [], [], []
        for row in rows:
            state, start = row.state, row.state.num_computed
            stop = start + row.num_tokens
            table, prompt_length = state.block_table, state.prompt_length
            tokens.extend(state.token_ids[start:stop])
            positions.extend(range(start, stop))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, stop))
            # dynamic NTK: a prompt token is rotated for the whole prompt, a generated one for its own length
            rope_lengths.extend(max(prompt_length, p + 1) for p in range(start, stop))
        context_lens = [row.state.num_computed + row.num_tokens for row in rows]
        widths = [math.ceil(length / block_size) for length in context_lens]
        width = max(widths)
        tables = [row.state.block_table[:w] + [0] * (width - w) for row, w in zip(rows, widths)]
        device = self.device
        positions_t = torch.tensor(positions, dtype=torch.int64, device=device)
        lengths_t = torch.tensor(rope_lengths, dtype=torch.int64, device=device)
        cos, sin = self.rotary.cos_sin(positions_t, lengths_t, self.dtype)
        meta = AttentionMetadata(
            query_lens=[row.num_tokens for row in rows],
            context_lens=context_lens,
            block_tables=torch.tensor(tables, dtype=torch.int64, device=device),
            positions=positions_t,
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            cos=cos,
            sin=sin,
        )
        return torch.tensor(tokens, dtype=torch.int64, device=device), meta

    def _advance(self, rows: list[_Row], logits: torch.Tensor, logits_rows: list[int]) -> list[Generation]:
        """Choose the next token of every row that samples, advance every row, and say what each produced."""
        where = {forward_row: i for i, forward_row in enumerate(logits_rows)}
        sampling = [row for row in rows if row.samples]
        chosen: dict[int, tuple[int, float, tuple[list[int], list[float]]]] = {}
        if sampling:
            sample_rows = [where[r.first_row + r.num_tokens - 1] for r in sampling]
            # a decode step samples every logits row in order: no copy of the [N, V] scores then
            sample_logits = logits if sample_rows == list(range(logits.shape[0])) else logits[sample_rows]
            wanted = [r.state.wants_logprobs for r in sampling]
            next_ids, logprobs = choose_tokens(sample_logits, [r.state.sampler for r in sampling], wanted)
            chosen_rows = chosen_logprobs(logprobs, next_ids, wanted, [r.state.top_n_tokens for r in sampling])
            for row, token, (logprob, top) in zip(sampling, next_ids.tolist(), chosen_rows):
                chosen[row.state.id] = (token, logprob, top)

        generations = []
        for row in rows:
            state = row.state
            prefill = self._prompt_logprobs(row, logits, where) if row.logprob_positions else None
            state.num_computed += row.num_tokens
            if state.id not in chosen:
                if prefill is not None:
                    generations.append(Generation(request_id=state.id, prefill=prefill))
                continue
            token, logprob, (top_ids, top_logprobs) = chosen[state.id]
            state.token_ids.append(token)
            finish = self._finish_reason(state, token)
            if finish is not None:
                del self.requests[state.id]
            generations.append(
                Generation(
                    request_id=state.id,
                    prefill=prefill,
                    token_id=token,
                    logprob=logprob,
                    top_tokens=Tokens(top_ids, top_logprobs) if state.top_n_tokens else None,
                    finish_reason=finish,
                )
            )
        return generations

    def _prompt_logprobs(self, row: _Row, logits: torch.Tensor, where: dict[int, int]) -> Tokens:
        """Logprobs of the prompt tokens this chunk's logits predict: the logits at position p give the token at
        p + 1, so a chunk over positions [s, e) reports the tokens s + 1 … min(e, prompt_length - 1), and the
        first chunk also reports token 0, which has no logprob (NaN)."""
        state = row.state
        offset = row.first_row - state.num_computed
        predicting = [p for p in row.logprob_positions if p + 1 < state.prompt_length]
        targets = [state.token_ids[p + 1] for p in predicting]
        values: list[float] = []
        if predicting:
            rows = logits[[where[offset + p] for p in predicting]]
            index = torch.tensor(targets, dtype=torch.int64, device=logits.device)[:, None]
            values = torch.log_softmax(rows, dim=-1).gather(1, index).squeeze(1).tolist()
        if row.logprob_positions.start == 0:
            return Tokens([state.token_ids[0], *targets], [math.nan, *values])
        return Tokens(targets, values)

    def _finish_reason(self, state: RequestState, token: int) -> FinishReason | None:
        """max_new_tokens first (an EOS that is the last allowed token reports LENGTH, as in TGI), then EOS."""
        if state.generated >= state.stopping.max_new_tokens:
            return FinishReason.LENGTH
        if not state.stopping.ignore_eos_token and (
            token in self.eos_token_ids or token in state.stopping.stop_token_ids
        ):
            return FinishReason.EOS_TOKEN
        return None
