"""The router core against a real shard process: ShardedClient + Scheduler + Infer, in this process.

Greedy tokens are compared with the in-process engine running each request alone, with whole prompts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import greedy_tokens
from router_stack import SERVER_CLI
from text_generation_server.models import get_model

from text_generation_router import metrics
from text_generation_router.block_manager import BlockManager
from text_generation_router.client import ShardedClient
from text_generation_router.infer import Infer
from text_generation_router.scheduler import Scheduler, SchedulerConfig
from text_generation_router.types import GenerationError, GenerationRequest, SamplingParams
from text_generation_common.tokenizer import Tokenizer

WARMUP = dict(max_input_tokens=64, max_prefill_tokens=512, max_total_tokens=128)


@pytest.fixture(scope="module")
def shard_socket(tiny_internlm2_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("core")
    uds = directory / "shard"
    log = directory / "shard.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*SERVER_CLI, "serve", str(tiny_internlm2_dir), "--uds-path", str(uds), "--dtype", "float32",
             "--device", "cpu", "--kv-cache-fraction", "0.002"],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
    socket = Path(f"{uds}-0")
    deadline = time.monotonic() + 60
    while not socket.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    yield socket
    assert process.poll() is None, f"the shard died:\n{log.read_text()}"
    process.terminate()
    process.wait(15)


@pytest.fixture(scope="module")
def engine(tiny_internlm2_dir):
    model = get_model(tiny_internlm2_dir, dtype="float32", device="cpu")
    model.allocate_kv_cache(256, 16)
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir):
    return Tokenizer.from_pretrained(tiny_internlm2_dir, vocab_size=1000)


def engine_tokens(engine, prompt, max_new_tokens) -> list[int]:
    return greedy_tokens(engine, [prompt], max_new_tokens)[0]


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(2, 30, (1,), generator=g))
        out.append(torch.randint(3, 990, (length,), generator=g).tolist())
    return out


def greedy(prompt, max_new_tokens) -> GenerationRequest:
    return GenerationRequest(
        input_ids=tuple(prompt), parameters=SamplingParams(), max_new_tokens=max_new_tokens, ignore_eos_token=True
    )


async def open_core(socket: Path, tokenizer, max_blocks: int | None = None, **config):
    client = await ShardedClient.connect(str(socket))
    await client.clear_cache()
    warm = await client.warmup(**WARMUP)
    num_blocks = warm.num_blocks if max_blocks is None else min(max_blocks, warm.num_blocks)
    scheduler = Scheduler(BlockManager(num_blocks, warm.block_size), tokenizer, SchedulerConfig(**config))
    infer = Infer(scheduler, client, 128)
    infer.start()
    return client, scheduler, infer


async def close_core(client, infer):
    await infer.stop()
    await client.close()


def run(coro, timeout=50):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_greedy_tokens_equal_the_engine(shard_socket, engine, tokenizer):
    cases = [(p, 6 + i) for i, p in enumerate(prompts(6, seed=1))]

    async def main():
        client, scheduler, infer = await open_core(shard_socket, tokenizer)
        info = await client.info()
        results = await asyncio.gather(*(infer.generate(greedy(p, n)) for p, n in cases))
        await close_core(client, infer)
        return info, results, scheduler

    info, results, scheduler = run(main())
    assert info.architecture == "InternLM2ForCausalLM" and info.kernels == "reference"
    for (prompt, n), (tokens, end) in zip(cases, results):
        assert [t.token.id for t in tokens] == engine_tokens(engine, prompt, n)
        assert end.generated_tokens == n and end.finish_reason == "length" and end.input_length == len(prompt)
        assert end.generated_text == "".join(t.token.text for t in tokens)
        assert end.queue_s >= 0 and end.inference_s > 0
    assert scheduler.blocks.used_blocks == 0


def test_64_concurrent_streams_complete(shard_socket, tokenizer):
    cases = [(p, 4 + i % 9) for i, p in enumerate(prompts(64, seed=2))]

    async def main():
        client, scheduler, infer = await open_core(shard_socket, tokenizer)

        async def consume(request):
            count, end = 0, None
            async for item in infer.stream(request):
                count += 1
                end = item.end
            return count, end

        results = await asyncio.gather(*(consume(greedy(p, n)) for p, n in cases))
        stats = dict(scheduler.stats)
        free = scheduler.blocks.used_blocks == 0
        await close_core(client, infer)
        return results, stats, free

    results, stats, free = run(main())
    for (prompt, n), (count, end) in zip(cases, results):
        assert count == n and end.generated_tokens == n
    assert stats["max_running"] > 8, stats  # they really ran batched
    assert free


def test_closed_stream_frees_blocks_and_does_not_stall_others(shard_socket, tokenizer, engine):
    others = [(p, 24) for p in prompts(4, seed=3)]

    async def main():
        client, scheduler, infer = await open_core(shard_socket, tokenizer)
        tasks = [asyncio.ensure_future(infer.generate(greedy(p, n))) for p, n in others]
        stream = infer.stream(greedy([5, 6, 7, 8, 9], 100))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        seq = stream._seq
        steps = scheduler.stats["steps"]
        while scheduler.stats["steps"] < steps + 2:
            await asyncio.sleep(0.001)
        still_running = seq in scheduler._running
        results = await asyncio.gather(*tasks)
        state = (scheduler.blocks.used_blocks, scheduler.running_size)
        await close_core(client, infer)
        return still_running, results, state, infer.active

    still_running, results, (used, running), active = run(main())
    assert not still_running, "the closed stream's request left the batch within one step"
    for (prompt, n), (tokens, end) in zip(others, results):
        assert [t.token.id for t in tokens] == engine_tokens(engine, prompt, n)
    assert used == 0 and running == 0 and active == 0


def test_preemption_with_a_tiny_kv_budget_keeps_greedy_results(shard_socket, tokenizer, engine):
    # 6 blocks of 16 = 96 tokens; each request ends near 3 blocks, so 5 of them must take turns
    cases = [(p[:12], 30) for p in prompts(5, seed=4) if len(p) >= 2]

    async def main():
        client, scheduler, infer = await open_core(shard_socket, tokenizer, max_blocks=6)
        before = metrics.request_preempted._value.get()
        results = await asyncio.gather(*(infer.generate(greedy(p, n)) for p, n in cases))
        preempted = metrics.request_preempted._value.get() - before
        stats = dict(scheduler.stats)
        free = scheduler.blocks.used_blocks == 0
        await close_core(client, infer)
        return results, preempted, stats, free

    results, preempted, stats, free = run(main())
    assert preempted >= 1 and stats["preempted"] == preempted
    for (prompt, n), (tokens, end) in zip(cases, results):
        assert [t.token.id for t in tokens] == engine_tokens(engine, prompt, n)
        assert end.generated_tokens == n
        assert end.generated_text == "".join(t.token.text for t in tokens)
    assert free


def test_chunked_prefill_and_prefix_hits_keep_greedy_results(shard_socket, tokenizer, engine):
    """A step budget of 8 tokens (every prompt is chunked) and prompts sharing a 40-token prefix: the hits are
    real (cached tokens are not computed again) and every request gets the engine's tokens."""
    system = (prompts(1, seed=9)[0] * 40)[:40]
    cases = [(system + p[:5], 6) for p in prompts(6, seed=5)] + [(p, 5) for p in prompts(3, seed=6)]

    async def main():
        client, scheduler, infer = await open_core(shard_socket, tokenizer, max_batch_tokens=8)
        first = await infer.generate(greedy(*cases[0]))
        before = metrics.prefix_cache_hits._value.get()
        rest = await asyncio.gather(*(infer.generate(greedy(p, n)) for p, n in cases[1:]))
        hits = metrics.prefix_cache_hits._value.get() - before
        used = scheduler.blocks.used_blocks
        await close_core(client, infer)
        return [first, *rest], hits, used

    results, hits, used = run(main())
    assert hits >= 5 * 32  # the other five requests each found two full blocks of 16 cached
    for (prompt, n), (tokens, end) in zip(cases, results):
        assert [t.token.id for t in tokens] == engine_tokens(engine, prompt, n)
    assert used == 0


def test_stack_end_to_end_and_graceful_sigterm(tiny_internlm2_dir, tmp_path):
    """start_stack + a plain POST /generate; SIGTERM lets an in-flight request finish and the router exits 0."""
    import signal
    import threading

    import httpx
    from router_stack import start_stack

    stack = start_stack(tiny_internlm2_dir, tmp_path, router_args=["--max-batch-total-tokens", "256"], grpc=False)
    try:
        body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 8, "ignore_eos_token": True}}
        answer = httpx.post(f"{stack.http_url}/generate", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()["generated_text"], str)
        assert "ready" in stack.router_log()

        result = {}
        long_body = {"inputs": "Hi", "parameters": {"max_new_tokens": 150, "ignore_eos_token": True}}
        thread = threading.Thread(
            target=lambda: result.setdefault("r", httpx.post(f"{stack.http_url}/generate", json=long_body, timeout=60))
        )
        thread.start()
        time.sleep(0.3)
        stack.router.send_signal(signal.SIGTERM)
        thread.join(60)
        assert result["r"].status_code == 200, result["r"].text
        assert stack.router.wait(30) == 0, stack.logs()
    finally:
        stack.close()


def router_options(shard_socket, **given) -> dict:
    """The options `connect_and_warm` reads, as the router's command line would give them."""
    options = dict(
        master_shard_uds_path=str(shard_socket), max_input_tokens=64, max_total_tokens=128,
        max_batch_prefill_tokens=None, max_batch_total_tokens=None, max_concurrent_requests=8, max_best_of=2,
        max_stop_sequences=4, max_top_n_tokens=5, prefix_caching=True, waiting_served_ratio=0.3,
        max_waiting_tokens=20, max_client_batch_size=4, disable_grammar_support=False,
    )
    return {**options, **given}


def test_the_step_budget_defaults_to_2048_on_a_cpu_shard(shard_socket):
    """Without --max-batch-prefill-tokens a CPU shard gets steps of at most 2048 tokens (capped at the KV
    capacity); a value given is kept."""
    from text_generation_router.cli import connect_and_warm, default_max_batch_prefill_tokens

    assert default_max_batch_prefill_tokens("cpu") == 2048
    assert default_max_batch_prefill_tokens("cuda") == default_max_batch_prefill_tokens("npu") == 4096

    async def budget(given):
        client, _, limits, shard = await connect_and_warm(router_options(shard_socket, max_batch_prefill_tokens=given))
        await client.close()
        assert shard.device_type == "cpu"
        return limits.max_batch_prefill_tokens, limits.max_batch_total_tokens

    default, capacity = run(budget(None))
    assert default == min(2048, capacity)
    assert run(budget(300))[0] == 300


def test_health_after_a_failed_step_runs_a_generation_through_the_shard(shard_socket, tokenizer):
    """TGI's GET /health, served by uvicorn over the router core: Health alone while all is well; after a failed
    step, a one-token generation goes through the shard before /health answers 200 again."""
    import httpx
    import uvicorn
    from router_stack import free_port
    from text_generation_router.api import create_app
    from text_generation_router.cli import build_state, connect_and_warm

    async def main():
        client, _, limits, shard = await connect_and_warm(router_options(shard_socket))
        state = build_state(client, limits, shard, tokenizer, "tiny")
        real_step, steps = client.step, []

        async def step_failing_once(request):
            steps.append([r.num_tokens for r in request.requests])
            if len(steps) == 1:
                raise ConnectionError("the shard went away")
            return await real_step(request)

        client.step = step_failing_once
        state.infer.start()
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 3}}
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                assert (await http.get("/health")).status_code == 200 and steps == []  # Health alone
                failed = await http.post("/generate", json=body)
                assert failed.status_code == 424 and "the shard went away" in failed.json()["error"]
                assert state.infer.step_failed
                assert (await http.get("/health")).status_code == 200
                # the failed request's next token was planned with the failed step still out: the shard refused
                # it (the request never ran there); then the one-token probe
                assert steps[1:] == [[1], [1]] and not state.infer.step_failed
                assert (await http.get("/health")).status_code == 200 and len(steps) == 3  # Health alone again
                answered = await http.post("/generate", json={**body, "parameters": {"max_new_tokens": 3, "details": True}})
                assert answered.json()["details"]["generated_tokens"] == 3
        finally:
            server.should_exit = True
            await serving
            await close_core(client, state.infer)
        assert state.infer.scheduler.blocks.used_blocks == 0

    run(main())


def test_with_the_shards_failing_every_step_the_loop_pauses_and_recovers(shard_socket, tokenizer, engine):
    """A shard that fails every step (gone, until the launcher stops the router) is not sent steps in a busy
    loop: a failed step's releases are due again, so the loop re-sends them only after a pause that grows with
    each failure. Once steps answer again, the releases go through and requests run as before."""
    from text_generation_router import infer as infer_module

    async def main():
        client, scheduler, infer = await open_core(shard_socket, tokenizer)
        real_step, calls = client.step, {"answered": 0, "failed": 0}
        shard_gone = asyncio.Event()

        async def step_until_gone(request):
            if shard_gone.is_set():
                calls["failed"] += 1
                raise ConnectionError("the shard went away")
            calls["answered"] += 1
            if calls["answered"] == 3:  # the request is on the shard, with blocks to release there
                shard_gone.set()
            return await real_step(request)

        client.step = step_until_gone
        prompt = prompts(1, seed=7)[0]
        try:
            with pytest.raises(GenerationError, match="the shard went away"):
                await infer.generate(greedy(prompt, 16))
            await asyncio.sleep(1.0)
            # pauses of 0.05, 0.1, 0.2, 0.4 and 0.8 s: a handful of failures in a second, not thousands
            assert 2 <= calls["failed"] <= 8, calls
            assert infer._pause_s() > infer_module.FIRST_PAUSE_AFTER_FAILURE_S
            shard_gone.clear()
            tokens, _ = await asyncio.wait_for(infer.generate(greedy(prompt, 4)), 10)
            assert [t.token.id for t in tokens] == engine_tokens(engine, prompt, 4)
            assert infer._pause_s() == 0.0
        finally:
            await close_core(client, infer)
        assert scheduler.blocks.used_blocks == 0

    run(main())
