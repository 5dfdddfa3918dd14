"""The engine: batches of requests on a paged KV cache, one token per request per step.

A batch is prefilled once (every prompt in one forward), then decoded step by step (one token per request,
the whole batch in one forward). Between steps, finished or cancelled requests leave (`filter`) and
prefilled batches join (`concatenate`); a request's tokens never depend on its neighbours.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from text_generation_server import device as device_layer
from text_generation_server.layers.attention import AttentionMetadata, KVCache
from text_generation_server.layers.rotary import RotaryEmbedding
from text_generation_server.models.config import ModelConfig, read_eos_token_ids, read_json
from text_generation_server.models.types import (
    FinishReason,
    GeneratedText,
    Generation,
    Request,
    SamplingParameters,
    StoppingParameters,
    Tokens,
)
from text_generation_server.utils.sampling import NextTokenChooser, top_n_tokens
from text_generation_server.utils.stopping import StoppingCriteria
from text_generation_server.utils.tokenizer import Tokenizer
from text_generation_server.utils.dist import SINGLE_RANK, TensorParallelGroup
from text_generation_server.utils.weights import Weights, weight_files

DEFAULT_BLOCK_SIZE = 16


@dataclass
class FlashCausalLMBatch:
    """Requests that step together. Every list is indexed by the request's position in the batch."""

    batch_id: int
    requests: list[Request]
    all_input_ids: list[list[int]]  # prompt + generated tokens so far
    prompt_lengths: list[int]
    cache_lengths: list[int]  # tokens whose key/value are in the cache: 0 until prefilled, then len - 1
    prefix_offsets: list[int]  # incremental detokenizer windows (see Tokenizer.decode_incremental)
    read_offsets: list[int]
    stopping_criterias: list[StoppingCriteria]
    next_token_chooser: NextTokenChooser
    # KV blocks of each request in position order; the router appends blocks as a request grows
    block_tables: list[list[int]]

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def request_ids(self) -> list[int]:
        return [request.id for request in self.requests]

    @property
    def is_prefill(self) -> bool:
        return self.cache_lengths[0] == 0

    @classmethod
    def from_requests(cls, batch_id: int, requests: Sequence[Request], model: FlashCausalLM) -> FlashCausalLMBatch:
        if not requests:
            raise ValueError("a batch needs at least one request")
        ids = [request.id for request in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids in a batch must be unique, got {ids}")
        for request in requests:
            model.validate_request(request)
        prompts = [list(request.input_ids) for request in requests]
        return cls(
            batch_id=batch_id,
            requests=list(requests),
            all_input_ids=prompts,
            prompt_lengths=[len(prompt) for prompt in prompts],
            cache_lengths=[0] * len(requests),
            prefix_offsets=[max(len(prompt) - 5, 0) for prompt in prompts],
            read_offsets=[len(prompt) for prompt in prompts],
            stopping_criterias=[StoppingCriteria(model.eos_token_ids, r.stopping) for r in requests],
            next_token_chooser=NextTokenChooser.from_params(
                [r.parameters for r in requests], prompts, model.config.vocab_size, model.device
            ),
            block_tables=[list(request.blocks) for request in requests],
        )

    def filter(self, request_ids: Sequence[int]) -> FlashCausalLMBatch | None:
        """Keep only `request_ids` (in batch order); None when none is left."""
        position = {request.id: i for i, request in enumerate(self.requests)}
        unknown = [rid for rid in request_ids if rid not in position]
        if unknown:
            raise ValueError(f"batch {self.batch_id} has no request {unknown[0]}")
        keep = sorted(position[rid] for rid in set(request_ids))
        if not keep:
            return None
        if len(keep) == len(self.requests):
            return self
        return FlashCausalLMBatch(
            batch_id=self.batch_id,
            requests=[self.requests[i] for i in keep],
            all_input_ids=[self.all_input_ids[i] for i in keep],
            prompt_lengths=[self.prompt_lengths[i] for i in keep],
            cache_lengths=[self.cache_lengths[i] for i in keep],
            prefix_offsets=[self.prefix_offsets[i] for i in keep],
            read_offsets=[self.read_offsets[i] for i in keep],
            stopping_criterias=[self.stopping_criterias[i] for i in keep],
            next_token_chooser=self.next_token_chooser.filter(keep),
            block_tables=[self.block_tables[i] for i in keep],
        )

    @classmethod
    def concatenate(cls, batches: Sequence[FlashCausalLMBatch]) -> FlashCausalLMBatch:
        """One batch running the requests of all `batches`, which must all have been prefilled."""
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        if any(batch.is_prefill for batch in batches):
            raise ValueError("only prefilled batches can be concatenated")
        ids = [rid for batch in batches for rid in batch.request_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a request id appears in two of the concatenated batches: {ids}")

        def joined(field: str) -> list:
            return [item for batch in batches for item in getattr(batch, field)]

        return cls(
            batch_id=batches[0].batch_id,
            requests=joined("requests"),
            all_input_ids=joined("all_input_ids"),
            prompt_lengths=joined("prompt_lengths"),
            cache_lengths=joined("cache_lengths"),
            prefix_offsets=joined("prefix_offsets"),
            read_offsets=joined("read_offsets"),
            stopping_criterias=joined("stopping_criterias"),
            next_token_chooser=NextTokenChooser.concatenate([b.next_token_chooser for b in batches]),
            block_tables=joined("block_tables"),
        )


class FlashCausalLM:
    """A decoder-only model with its tokenizer, its paged KV cache and the step function."""

    model_class: type[torch.nn.Module]  # set by each architecture's subclass

    def __init__(
        self,
        model_dir: Path,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        tp: TensorParallelGroup = SINGLE_RANK,
    ):
        config.check_world_size(tp.world_size)
        self.model_dir = model_dir
        self.config = config
        self.dtype = dtype
        self.device = device
        self.tp = tp
        # KV heads held by this rank: the cache is split over the ranks like the attention
        self.num_kv_heads = config.num_key_value_heads // tp.world_size
        self.tokenizer = Tokenizer.from_pretrained(model_dir, vocab_size=config.vocab_size)
        weights = Weights(weight_files(model_dir), dtype, device, tp)
        self.model = self.model_class(config, weights).eval()
        weights.check_all_used()
        weights.close()
        self.eos_token_ids = self._eos_token_ids()
        self.rotary = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_scaling
        )
        self.kv_cache: KVCache | None = None
        self.last_forward_ns = 0  # time of the model forward in the last generate_token (device-synchronised)

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
        return KVCache.bytes_per_token(c.num_hidden_layers, self.num_kv_heads, c.head_dim, self.dtype)

    def allocate_kv_cache(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> KVCache:
        self.kv_cache = None  # drop the old cache before allocating the new one
        c = self.config
        self.kv_cache = KVCache(
            c.num_hidden_layers, num_blocks, block_size, self.num_kv_heads, c.head_dim, self.dtype, self.device
        )
        return self.kv_cache

    def warmup(
        self, max_input_tokens: int, max_prefill_tokens: int, max_total_tokens: int, memory_fraction: float
    ) -> KVCache:
        """Run the largest prefill the limits allow, then size the KV cache from the memory left.

        The warmup batch packs `max_prefill_tokens` prompt tokens into requests of at most `max_input_tokens`,
        each sampling with every processor on, so a forward of that size is known to fit. The cache then takes
        `memory_fraction` of the device memory available afterwards (on CPU: of the host's available RAM).
        """
        if not 1 <= max_input_tokens < max_total_tokens:
            raise ValueError(
                f"need 1 <= max_input_tokens ({max_input_tokens}) < max_total_tokens ({max_total_tokens})"
            )
        if max_prefill_tokens < max_input_tokens:
            raise ValueError(
                f"max_prefill_tokens ({max_prefill_tokens}) must be >= max_input_tokens ({max_input_tokens})"
            )
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        block_size = DEFAULT_BLOCK_SIZE
        lengths = [max_input_tokens] * (max_prefill_tokens // max_input_tokens)
        if max_prefill_tokens % max_input_tokens:
            lengths.append(max_prefill_tokens % max_input_tokens)
        per_request = [math.ceil((length + 1) / block_size) for length in lengths]
        self.allocate_kv_cache(sum(per_request), block_size)
        sampling = SamplingParameters(
            temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=True, repetition_penalty=1.2,
            frequency_penalty=0.1,
        )
        filler = self.tokenizer.encode("_test ", add_special_tokens=False) or [0]
        requests, first_block = [], 0
        for i, (length, blocks) in enumerate(zip(lengths, per_request)):
            block_ids = tuple(range(first_block, first_block + blocks))
            first_block += blocks
            requests.append(
                Request(
                    id=i,
                    input_ids=tuple(itertools.islice(itertools.cycle(filler), length)),
                    blocks=block_ids,
                    slots=tuple(block_ids[p // block_size] * block_size + p % block_size for p in range(length + 1)),
                    parameters=sampling,
                    stopping=StoppingParameters(max_new_tokens=2, ignore_eos_token=True),
                    top_n_tokens=5,
                )
            )
        batch: FlashCausalLMBatch | None = FlashCausalLMBatch.from_requests(0, requests, self)
        while batch is not None:
            _, batch = self.generate_token(batch)
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

    def validate_request(self, request: Request) -> None:
        """Refuse, with a message naming the bad value, what the engine cannot run."""
        if self.kv_cache is None:
            raise ValueError("the KV cache is not allocated yet")
        if not request.input_ids:
            raise ValueError(f"request {request.id}: input_ids is empty")
        bad = [t for t in request.input_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"request {request.id}: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        if request.stopping.max_new_tokens < 1:
            raise ValueError(f"request {request.id}: max_new_tokens must be >= 1, got {request.stopping.max_new_tokens}")
        block_size = self.kv_cache.block_size
        if len(request.blocks) * block_size < len(request.input_ids):
            raise ValueError(
                f"request {request.id}: {len(request.blocks)} blocks of {block_size} tokens cannot hold its "
                f"{len(request.input_ids)} prompt tokens"
            )
        self._check_blocks(request.id, request.blocks)
        for position, slot in enumerate(request.slots):
            expected = request.blocks[position // block_size] * block_size + position % block_size
            if slot != expected:
                raise ValueError(
                    f"request {request.id}: slot {slot} for position {position} is not in its block table "
                    f"(expected {expected})"
                )
        if request.top_n_tokens < 0:
            raise ValueError(f"request {request.id}: top_n_tokens must be >= 0, got {request.top_n_tokens}")

    def _check_blocks(self, request_id: int, blocks: Sequence[int]) -> None:
        num_blocks = self.kv_cache.num_blocks
        bad = [b for b in blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"request {request_id}: block {bad[0]} is outside [0, {num_blocks})")

    def extend_block_tables(self, batch: FlashCausalLMBatch, extensions: dict[int, Sequence[int]]) -> None:
        """Append blocks to running requests' block tables (request id -> new blocks, in position order).

        Checks first, changes nothing on error: every block is in the cache, and after the extension every
        request has a block for the position its next decode step writes.
        """
        position = {rid: i for i, rid in enumerate(batch.request_ids)}
        for request_id, blocks in extensions.items():
            if request_id not in position:
                raise ValueError(f"batch {batch.batch_id} has no request {request_id} to extend")
            self._check_blocks(request_id, blocks)
        if not batch.is_prefill:
            block_size = self.kv_cache.block_size
            for request_id, ids, table in zip(batch.request_ids, batch.all_input_ids, batch.block_tables):
                next_position = len(ids) - 1
                capacity = (len(table) + len(extensions.get(request_id, ()))) * block_size
                if next_position >= capacity:
                    raise ValueError(
                        f"request {request_id} has no KV block for position {next_position}: its blocks hold "
                        f"{capacity} positions; extend its block table"
                    )
        for request_id, blocks in extensions.items():
            batch.block_tables[position[request_id]].extend(blocks)

    # ----- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: FlashCausalLMBatch, every_position: bool = False) -> torch.Tensor:
        """Run the model over the batch's next tokens (whole prompts when prefilling, else the last tokens).

        Returns float32 logits: [T, V] for every token of the forward when `every_position`, else [B, V] for each
        request's last token. Writes the tokens' keys/values to their slots; the batch itself is not advanced.
        """
        assert self.kv_cache is not None, "allocate_kv_cache must run before a forward"
        input_ids, meta = self._prepare(batch)
        hidden = self.model(input_ids, self.kv_cache, meta)
        if not every_position:
            hidden = hidden[self._last_rows(batch)]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def generate_token(self, batch: FlashCausalLMBatch) -> tuple[list[Generation], FlashCausalLMBatch | None]:
        """Run one forward for `batch` and choose one token per request.

        Returns the generations of this step and the batch to decode next (None once every request finished).
        """
        prefill = batch.is_prefill
        logits_for_prompt = [r.prefill_logprobs for r in batch.requests] if prefill else [False] * len(batch)
        forward_start = time.perf_counter_ns()
        if any(logits_for_prompt):
            all_logits = self.forward(batch, every_position=True)  # [T, V]
            last_logits = all_logits[self._last_rows(batch)]
        else:
            all_logits = None
            last_logits = self.forward(batch)  # [B, V]
        device_layer.synchronize(self.device)
        self.last_forward_ns = time.perf_counter_ns() - forward_start

        next_ids, logprobs = batch.next_token_chooser(last_logits)
        next_ids_list = next_ids.tolist()
        chosen_logprobs = logprobs.gather(1, next_ids[:, None]).squeeze(1).tolist()
        top_tokens = top_n_tokens(logprobs, [r.top_n_tokens for r in batch.requests])

        generations, still_running = [], []
        row_start = 0
        for i, request in enumerate(batch.requests):
            prefill_tokens = None
            if logits_for_prompt[i]:
                rows = all_logits[row_start : row_start + batch.prompt_lengths[i]]
                prefill_tokens = self._prefill_tokens(batch.all_input_ids[i], rows)
            if prefill:
                row_start += batch.prompt_lengths[i]
            generation, finished = self._advance(batch, i, next_ids_list[i], chosen_logprobs[i], top_tokens[i])
            generation.prefill_tokens = prefill_tokens
            generations.append(generation)
            if not finished:
                still_running.append(request.id)
        return generations, batch.filter(still_running)

    def _prepare(self, batch: FlashCausalLMBatch) -> tuple[torch.Tensor, AttentionMetadata]:
        """Input ids [T] and the attention metadata of the batch's next forward."""
        prefill = batch.is_prefill
        if prefill:
            tokens = [t for ids in batch.all_input_ids for t in ids]
            positions = [p for length in batch.prompt_lengths for p in range(length)]
            slots = [
                self._slot(table, p) for table, length in zip(batch.block_tables, batch.prompt_lengths)
                for p in range(length)
            ]
            lengths = [length for length in batch.prompt_lengths for _ in range(length)]
        else:
            tokens = [ids[-1] for ids in batch.all_input_ids]
            positions = list(batch.cache_lengths)
            for request, table, p in zip(batch.requests, batch.block_tables, positions):
                if p >= len(table) * self.kv_cache.block_size:
                    raise ValueError(
                        f"request {request.id} has no KV block for position {p}: its {len(table)} blocks are "
                        f"full; extend its block table"
                    )
            slots = [self._slot(table, p) for table, p in zip(batch.block_tables, positions)]
            lengths = [p + 1 for p in positions]
        device = self.device
        positions_t = torch.tensor(positions, dtype=torch.int64, device=device)
        lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
        cos, sin = self.rotary.cos_sin(positions_t, lengths_t, self.dtype)
        meta = AttentionMetadata(
            positions=positions_t,
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            cos=cos,
            sin=sin,
            prefill_lengths=list(batch.prompt_lengths) if prefill else None,
            block_tables=None if prefill else self._block_tables(batch, lengths),
            context_lengths=None if prefill else lengths_t,
        )
        return torch.tensor(tokens, dtype=torch.int64, device=device), meta

    def _slot(self, block_table: list[int], position: int) -> int:
        block_size = self.kv_cache.block_size
        return block_table[position // block_size] * block_size + position % block_size

    def _last_rows(self, batch: FlashCausalLMBatch) -> torch.Tensor:
        """Row of each request's last token among the forward's T tokens."""
        if not batch.is_prefill:
            return torch.arange(len(batch), device=self.device)
        ends = torch.tensor(batch.prompt_lengths, device=self.device).cumsum(0)
        return ends - 1

    def _block_tables(self, batch: FlashCausalLMBatch, context_lengths: list[int]) -> torch.Tensor:
        """[B, max_blocks] block ids covering each request's context, padded with block 0 (masked out)."""
        block_size = self.kv_cache.block_size
        needed = [math.ceil(length / block_size) for length in context_lengths]
        width = max(needed)
        rows = [table[:n] + [0] * (width - n) for table, n in zip(batch.block_tables, needed)]
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def _prefill_tokens(self, prompt: list[int], logits: torch.Tensor) -> Tokens:
        """Logprob of each prompt token given the ones before it; the first has none (NaN)."""
        logprobs = torch.log_softmax(logits[:-1], dim=-1)  # row p predicts token p + 1
        targets = torch.tensor(prompt[1:], dtype=torch.int64, device=logits.device)
        values = [math.nan] + logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
        return Tokens(
            ids=list(prompt),
            logprobs=values,
            texts=[self.tokenizer.decode([t]) for t in prompt],
            is_special=[t in self.tokenizer.special_token_ids for t in prompt],
        )

    def _advance(
        self, batch: FlashCausalLMBatch, i: int, token: int, logprob: float, top: tuple[list[int], list[float]]
    ) -> tuple[Generation, bool]:
        """Append `token` to request i, detokenize it and check whether the request is done."""
        request = batch.requests[i]
        ids = batch.all_input_ids[i]
        ids.append(token)
        batch.cache_lengths[i] = len(ids) - 1
        text, batch.prefix_offsets[i], batch.read_offsets[i] = self.tokenizer.decode_incremental(
            ids, batch.prefix_offsets[i], batch.read_offsets[i]
        )
        finish_reason = batch.stopping_criterias[i](token, text)
        generated_text = None
        if finish_reason is not None:
            generated = ids[batch.prompt_lengths[i] :]
            generated_text = GeneratedText(
                text=self.tokenizer.decode(generated, skip_special_tokens=True),
                generated_tokens=len(generated),
                finish_reason=FinishReason(finish_reason),
                seed=None if request.parameters.is_greedy else request.parameters.seed,
            )
        top_ids, top_logprobs = top
        generation = Generation(
            request_id=request.id,
            prefill_tokens=None,
            tokens=Tokens([token], [logprob], [text], [token in self.tokenizer.special_token_ids]),
            generated_text=generated_text,
            top_tokens=Tokens(
                top_ids,
                top_logprobs,
                [self.tokenizer.decode([t]) for t in top_ids],
                [t in self.tokenizer.special_token_ids for t in top_ids],
            )
            if request.top_n_tokens
            else None,
        )
        return generation, finish_reason is not None
