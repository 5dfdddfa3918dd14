"""One shard (`text-generation-server serve`) driven over its gRPC socket by a bare client: no router, no HTTP.

It sits between the in-process engine and the served stack, so the served stack's extra time per step splits in
two: what the shard's gRPC service costs (its call handling, the next call arriving while a step computes) and
what the router, HTTP and the clients cost. The client plans like the router: the same Step messages, one request
per stream with its own KV blocks, `STEPS_IN_FLIGHT` steps at the shard, token logprobs asked (as
`/generate_stream` does), greedy, no EOS.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

from text_generation_common.pb import generate_pb2 as pb
from text_generation_router.infer import STEPS_IN_FLIGHT

from .served import ServerProcess, new_socket_dir
from .stats import median, prefill_figures
from .workloads import Prompt, PromptSet, Workloads


class _Sequence:
    """A request the client planned: its tokens so far (prompt + planned steps) and its KV blocks."""

    def __init__(self, request_id: int, prompt: Prompt, first_block: int, block_size: int):
        self.id = request_id
        self.prompt = prompt
        self.length = len(prompt.ids)  # its tokens once the planned steps have run
        last_block = first_block + math.ceil((len(prompt.ids) + prompt.max_new_tokens) / block_size)
        self.blocks = list(range(first_block, last_block))
        self.block_size = block_size
        self.table = 0  # blocks already sent to the shard

    def new_blocks(self, up_to_length: int) -> list[int]:
        """The blocks the shard's table gains so that it holds positions [0, up_to_length)."""
        needed = math.ceil(up_to_length / self.block_size)
        added, self.table = self.blocks[self.table : needed], max(self.table, needed)
        return added

    def prefill(self) -> pb.ScheduledRequest:
        new = pb.NewRequest(
            token_ids=self.prompt.ids, prompt_length=len(self.prompt.ids),
            parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
            stopping_parameters=pb.StoppingCriteriaParameters(
                max_new_tokens=self.prompt.max_new_tokens, ignore_eos_token=True
            ),
        )
        self.length += 1
        return pb.ScheduledRequest(id=self.id, new_request=new, num_tokens=len(self.prompt.ids),
                                   new_blocks=self.new_blocks(len(self.prompt.ids)))

    def decode(self) -> pb.ScheduledRequest:
        """One decode token: the last known (or pending) token, at position length - 1."""
        self.length += 1
        return pb.ScheduledRequest(id=self.id, num_tokens=1, new_blocks=self.new_blocks(self.length - 1))

    @property
    def done(self) -> bool:
        return self.length - len(self.prompt.ids) >= self.prompt.max_new_tokens


class ShardAlone(ServerProcess):
    name = "text-generation-server"

    def __init__(self, model_dir: Path, dtype: str, log_path: Path, workloads: Workloads, startup_timeout: float = 900):
        self.socket_dir = new_socket_dir()
        uds = self.socket_dir / "shard"
        server = Path(sys.executable).with_name("text-generation-server")
        argv = [str(server), "serve", str(model_dir), "--uds-path", str(uds), "--dtype", dtype, "--device", "cpu"]
        super().__init__(argv, log_path)
        self.info = {"engine": "ours: one shard over gRPC, no router", "dtype": dtype, "argv": argv[1:]}
        self.wait_ready(lambda: "ready on" in self.log_path.read_text(errors="replace"), startup_timeout)
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)  # grpc.aio looks the loop up
        # every stream's prompt in one step, as the engine prefills them
        self.max_prefill_tokens = max(workloads.step_streams * workloads.step_prompt, workloads.prefill_prompt)
        try:
            self._stub = self._call(self._connect(f"unix://{uds}-0"))
            warm = self._call(self._stub.Warmup(pb.WarmupRequest(
                max_input_tokens=workloads.max_total_tokens - 1, max_prefill_tokens=self.max_prefill_tokens,
                max_total_tokens=workloads.max_total_tokens)))
        except BaseException:
            self.close()
            raise
        self.block_size, self.num_blocks = warm.block_size, warm.num_blocks

    async def _connect(self, url: str):
        import grpc

        from text_generation_common.pb import generate_pb2_grpc

        self._channel = grpc.aio.insecure_channel(url)
        await asyncio.wait_for(self._channel.channel_ready(), 60)
        return generate_pb2_grpc.TextGenerationServiceStub(self._channel)

    def _call(self, coroutine):
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        if hasattr(self, "_channel"):
            self._call(self._channel.close())
        if hasattr(self, "_loop"):
            self._loop.close()
            asyncio.set_event_loop(None)
        super().close()

    # ------------------------------------------------------------------------------------------- client

    async def _run(self, prompts: list[Prompt]) -> tuple[float, list[tuple[int, float, pb.StepResponse]]]:
        """Prefill `prompts` (as many whole prompts a step as `max_prefill_tokens` allows; the requests already
        started decode in those steps too, as the router plans them), then decode every one to its
        max_new_tokens. Returns (start, [(requests in the step, answer time, answer)] of every step in order)."""
        await self._stub.ClearCache(pb.ClearCacheRequest())
        sequences, first_block = [], 0
        for i, prompt in enumerate(prompts):
            sequences.append(_Sequence(i + 1, prompt, first_block, self.block_size))
            first_block += len(sequences[-1].blocks)
        if first_block > self.num_blocks:
            raise RuntimeError(
                f"the shard holds {self.num_blocks} KV blocks, {len(prompts)} streams need {first_block}"
            )
        batches, tokens = [[]], 0
        for seq in sequences:
            if batches[-1] and tokens + len(seq.prompt.ids) > self.max_prefill_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append(seq)
            tokens += len(seq.prompt.ids)
        start, answers, out = time.perf_counter(), [], []

        async def answer(size: int, call) -> None:
            response = await call
            answers.append((size, time.perf_counter(), response))

        async def send(scheduled: list[pb.ScheduledRequest]) -> None:
            request = pb.StepRequest(requests=scheduled, step_id=len(answers) + len(out) + 1)
            out.append((len(scheduled), asyncio.ensure_future(self._stub.Step(request))))
            if len(out) >= STEPS_IN_FLIGHT:
                await answer(*out.pop(0))

        started: list[_Sequence] = []
        for batch in batches:
            await send([s.decode() for s in started if not s.done] + [s.prefill() for s in batch])
            started += batch
        while any(not s.done for s in started):
            await send([s.decode() for s in started if not s.done])
        while out:
            await answer(*out.pop(0))
        _check_tokens(sequences, [response for _, _, response in answers])
        return start, answers

    def _steps(self, prompts: list[Prompt]) -> tuple[float, list[int], list[float], list[pb.StepResponse]]:
        """`_run`, as parallel lists: (start, requests per step, answer times, answers)."""
        start, answers = self._call(self._run(prompts))
        sizes, times, responses = (list(column) for column in zip(*answers))
        return start, sizes, times, responses

    # ----------------------------------------------------------------------------------------- workloads

    def warmup(self, prompts: PromptSet, workloads: Workloads) -> None:
        self._steps([Prompt(prompts.decode.text, prompts.decode.ids[:16], 4)])
        self._steps([Prompt(p.text, p.ids, 3) for p in prompts.step])

    def decode(self, prompt: Prompt, repeats: int) -> dict:
        """Batch-1 decode, as the engine's and the served stack's: tokens/s after the first, and the shard's own
        forward time a step."""
        runs = []
        for _ in range(repeats):
            start, _, times, responses = self._steps([prompt])
            runs.append({"decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
                         "ttft_ms": (times[0] - start) * 1000,
                         "forward_ms": median(r.forward_ns for r in responses[1:]) / 1e6})
        out = {key: median(r[key] for r in runs) for key in runs[0]}
        out.update(prompt_tokens=len(prompt.ids), new_tokens=prompt.max_new_tokens, repeats=repeats)
        return out

    def prefill(self, prompt: Prompt, repeats: int) -> dict:
        seconds = []
        for _ in range(repeats):
            start, _, times, _ = self._steps([Prompt(prompt.text, prompt.ids, 1)])
            seconds.append(times[0] - start)
        return prefill_figures(len(prompt.ids), seconds)

    def decode_step(self, prompts: list[Prompt]) -> dict:
        """The decode step of `len(prompts)` streams: the median gap between the answers of consecutive steps that
        schedule every stream, leaving out the first two (the last prefill, the first decode), as the engine's
        figure does; and the shard's own forward time in those steps."""
        _, sizes, times, responses = self._steps(prompts)
        full = [i for i, size in enumerate(sizes) if size == len(prompts)]
        measured = [i for i in full[2:] if i - 1 in full]  # the first full step (a prefill) and the next excluded
        steps = [times[i] - times[i - 1] for i in measured]
        forward_ms = [responses[i].forward_ns / 1e6 for i in measured]
        return {"streams": len(prompts), "steps": len(steps), "step_ms": median(steps) * 1000,
                "forward_ms": median(forward_ms),
                "outside_forward_ms": median(1000 * step - forward for step, forward in zip(steps, forward_ms))}


def _check_tokens(sequences: list[_Sequence], responses: list[pb.StepResponse]) -> None:
    """Every request got exactly its max_new_tokens tokens, the last one ending it (a run that measured steps
    without the tokens they should produce would measure nothing)."""
    counts, finished = {s.id: 0 for s in sequences}, set()
    for response in responses:
        for generation in response.generations:
            if generation.HasField("token_id"):
                counts[generation.request_id] += 1
            if generation.HasField("finish_reason"):
                finished.add(generation.request_id)
    for seq in sequences:
        if counts[seq.id] != seq.prompt.max_new_tokens or seq.id not in finished:
            raise RuntimeError(f"request {seq.id} got {counts[seq.id]} of {seq.prompt.max_new_tokens} tokens"
                               + ("" if seq.id in finished else ", without a finish reason"))
