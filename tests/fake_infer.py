"""A deterministic stand-in for the router's `Infer`, for front-end tests that need no shard.

It keeps `Infer`'s contract: `stream(request)` refuses with OverloadedError above `max_concurrent` before any
iteration, then yields StreamTokens whose last one carries the StreamEnd; an error is raised from the iterator;
the end, an error or closing the iterator releases the slot, and closing it before the end counts as a
cancellation. Text follows the router's rule (`TextStream`: special tokens carry no text unless the request
shows them, the final text is the streamed texts joined), and a request ends as the shard and the scheduler end it: max_new_tokens (`length`)
first, then an EOS id or one of its `stop_token_ids` (`eos_token`, unless ignore_eos_token), then a stop
sequence in its text. Subclasses choose the tokens (`token_ids`) and what comes with them (`details`).
"""

from __future__ import annotations

import asyncio

from text_generation_router.infer import Infer
from text_generation_router.text import TextStream
from text_generation_router.types import (
    GenerationError,
    GenerationRequest,
    OverloadedError,
    RouterLimits,
    RouterState,
    ShardInfo,
    StreamEnd,
    StreamToken,
    Token,
)
from text_generation_router.validation import Validation


def fake_state(infer: FakeInfer, limits: RouterLimits, model_id: str = "tiny") -> RouterState:
    """What the router's front ends get, with `infer` instead of the scheduler and a tiny InternLM2's shard."""
    shard = ShardInfo(
        model_id=model_id, architecture="InternLM2ForCausalLM", dtype="float32", device_type="cpu", block_size=16,
        world_size=1, vocab_size=1000, max_position_embeddings=512, eos_token_ids=tuple(infer.eos_ids), num_blocks=64,
    )
    return RouterState(
        infer=infer, validation=Validation(infer.tokenizer, limits, tuple(infer.eos_ids)), tokenizer=infer.tokenizer, limits=limits,  # type: ignore[arg-type]
        shard=shard, model_id=model_id,
    )


class FakeInfer:
    def __init__(self, tokenizer, eos_ids: tuple[int, ...] = (), max_concurrent: int = 8):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_concurrent = max_concurrent
        self.delay = 0.0  # seconds per token
        self.fail_at: int | None = None  # raise GenerationError at this token index
        self.active = 0
        self.cancelled = 0
        self.completed = 0
        self.requests: list[GenerationRequest] = []
        self.healthy = True  # what health() answers

    # ----- what subclasses choose -------------------------------------------------------------------------

    def token_ids(self, request: GenerationRequest) -> list[int]:
        raise NotImplementedError

    def details(self, request: GenerationRequest, index: int, token_id: int) -> dict:
        """The logprob, top_tokens and prefill of the index-th token (StreamToken/Token fields)."""
        return {"logprob": -1.0}

    # ----- Infer's interface --------------------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> FakeStream:
        if self.active >= self.max_concurrent:
            raise OverloadedError()
        self.active += 1
        self.requests.append(request)
        return FakeStream(self, self._run(request))

    async def health(self) -> bool:
        return self.healthy

    generate = Infer.generate  # the real one: it only drives `self.stream`

    async def _run(self, request: GenerationRequest):
        text = TextStream(self.tokenizer, request.input_ids, request.stop_sequences, request.shown_special_ids)
        sampled = request.parameters.do_sample or request.parameters.temperature != 1.0
        for i, token_id in enumerate(self.token_ids(request)):
            await asyncio.sleep(self.delay)
            if self.fail_at == i:
                raise GenerationError("the shard failed")
            generated = i + 1
            if generated >= request.max_new_tokens:
                reason = "length"
            elif not request.ignore_eos_token and (token_id in self.eos_ids or token_id in request.stop_token_ids):
                reason = "eos_token"
            else:
                reason = None
            piece = text.push(token_id, ends_by_eos=reason == "eos_token")
            if reason is None and text.stopped:
                reason = "stop_sequence"
            end = None
            if reason is not None:
                piece += text.flush()
                end = StreamEnd(
                    generated_text=text.text,
                    finish_reason=reason,
                    generated_tokens=generated,
                    seed=request.parameters.seed if sampled else None,
                    input_length=len(request.input_ids),
                    queue_s=0.001,
                    inference_s=0.002 * generated,
                )
            details = self.details(request, i, token_id)
            special = token_id in self.tokenizer.special_token_ids
            token = Token(token_id, piece, details.pop("logprob"), special)
            yield StreamToken(token, end=end, **details)
            if end is not None:
                return


class FakeStream:
    def __init__(self, infer: FakeInfer, items):
        self.infer, self.items, self.done = infer, items, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamToken:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self.items.__anext__()
        except asyncio.CancelledError:
            self._finish(cancelled=True)
            raise
        except BaseException:
            self._finish(cancelled=False)
            raise
        assert isinstance(item, StreamToken), item  # the contract: StreamTokens only
        if item.end is not None:
            self._finish(cancelled=False)
        return item

    async def aclose(self) -> None:
        self._finish(cancelled=True)
        await self.items.aclose()

    def _finish(self, cancelled: bool) -> None:
        if not self.done:
            self.done = True
            self.infer.active -= 1
            if cancelled:
                self.infer.cancelled += 1
            else:
                self.infer.completed += 1
