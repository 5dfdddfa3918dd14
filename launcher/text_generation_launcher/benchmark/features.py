"""The engine's features, each measured with the feature on and off in the same run, through the served stack.

* prefix caching: `chat_requests` streamed chat requests (POST /v1/chat/completions) that share a
  `system_prompt`-token system prompt and differ in a short user message, sent together; TTFT p50/p90 with
  prefix caching and with --no-prefix-caching, and the router's prefix-cache counters.
* chunked prefill: `streams` streams decode (POST /generate_stream) while prompts of `long_prompts` tokens
  arrive one after another (each sent once the previous one has its first token); --max-batch-prefill-tokens
  `chunk_budget` against a budget that holds the longest prompt whole (chunking off). ITL p50/p90 of the
  streams and their longest gap while the prompts are prefilled.
* a long context: one `long_context`-token prompt on a tiny model with dynamic NTK, prefilled in chunks of the
  default budget and then decoded; its time to first token, its decode speed, and the peak resident memory of
  the shard and the router against the size of the KV cache.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .served import ServedStack, Stream, client_session, sse_arrivals
from .stats import ms, percentile
from .workloads import PromptMaker


@dataclass(frozen=True)
class FeatureWorkloads:
    chat_requests: int = 32
    system_prompt: int = 1000
    chat_new: int = 16
    streams: int = 8
    stream_prompt: int = 64
    stream_new: int = 1000  # long enough to span the prefills; the streams are closed when they are done
    long_prompts: tuple[int, ...] = (2000, 4000, 6000, 8000)
    chunk_budget: int = 512
    long_context: int = 200_000
    long_context_new: int = 16
    long_context_preset: str = "long"


SMOKE_FEATURES = FeatureWorkloads(
    chat_requests=4, system_prompt=48, chat_new=2, streams=2, stream_prompt=8, stream_new=400,
    long_prompts=(60, 90), chunk_budget=16, long_context=1500, long_context_new=3, long_context_preset="smoke-long",
)


# ----- prefix caching ------------------------------------------------------------------------------------------


def prefix_cache(model_dir: Path, dtype: str, w: FeatureWorkloads, out: Path, log) -> dict:
    maker = PromptMaker(model_dir)
    rng = random.Random(1)
    system = maker.make(rng, w.system_prompt, 0).text
    questions = [maker.make(rng, rng.randint(8, 16), 0).text for _ in range(w.chat_requests)]
    warm_system = maker.make(rng, w.system_prompt, 0).text  # another system prompt: warms up, primes nothing
    results = {"workload": {"requests": w.chat_requests, "system_prompt_tokens": w.system_prompt, "new": w.chat_new}}
    for mode, args in (("on", []), ("off", ["--no-prefix-caching"])):
        log(f"prefix caching {mode}: {w.chat_requests} chats sharing a {w.system_prompt}-token system prompt")
        stack = ServedStack(
            model_dir, dtype, out / f"launcher-prefix-{mode}.log", max_input_tokens=w.system_prompt + 256,
            max_total_tokens=w.system_prompt + 256 + w.chat_new, extra_args=args,
        )
        try:
            chat = f"{stack.url}/v1/chat/completions"

            def body(system_text: str, question: str) -> dict:
                messages = [{"role": "system", "content": system_text}, {"role": "user", "content": question}]
                return {"model": "tgi", "messages": messages, "max_tokens": w.chat_new, "stream": True,
                        "temperature": 0}

            async def burst() -> tuple[list[Stream], str]:
                async with client_session() as session:
                    await sse_arrivals(session, chat, body(warm_system, questions[0]))
                    before = stack.metrics_text()
                    answers = await asyncio.gather(*(sse_arrivals(session, chat, body(system, q)) for q in questions))
                    return answers, before

            answers, before = asyncio.run(burst())
            after = stack.metrics_text()
        finally:
            stack.close()
        ttfts = [arrivals[0] - sent for sent, arrivals, _ in answers]
        results[mode] = {
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p90_ms": ms(percentile(ttfts, 90)),
            "prefix_cache_queries": _counter(after, "tgi_prefix_cache_queries") - _counter(before, "tgi_prefix_cache_queries"),
            "prefix_cache_hits": _counter(after, "tgi_prefix_cache_hits") - _counter(before, "tgi_prefix_cache_hits"),
        }
        log(f"  TTFT p50 {results[mode]['ttft_p50_ms']:.0f} ms, prefix-cache hits {results[mode]['prefix_cache_hits']:.0f} tokens")
    results["ttft_p50_ratio_off_to_on"] = results["off"]["ttft_p50_ms"] / results["on"]["ttft_p50_ms"]
    return results


def _counter(text: str, name: str) -> float:
    """An unlabelled counter's value in the router's Prometheus text (TGI's names: no _total suffix)."""
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    return 0.0


# ----- chunked prefill -----------------------------------------------------------------------------------------


def chunked_prefill(model_dir: Path, dtype: str, w: FeatureWorkloads, out: Path, log) -> dict:
    maker = PromptMaker(model_dir)
    rng = random.Random(2)
    streams = [maker.make(rng, w.stream_prompt, w.stream_new) for _ in range(w.streams)]
    longs = [maker.make(rng, n, 1) for n in w.long_prompts]
    longest = max(w.long_prompts)
    results = {"workload": {"streams": w.streams, "long_prompts": list(w.long_prompts), "chunk_budget": w.chunk_budget}}
    for mode, budget in (("chunked", w.chunk_budget), ("unchunked", longest + w.streams)):
        log(f"chunked prefill {mode} (budget {budget}): {w.streams} streams while prompts of {list(w.long_prompts)} arrive")
        stack = ServedStack(  # no prefix caching: the warm-up prompt must not make the measured ones cheaper
            model_dir, dtype, out / f"launcher-chunking-{mode}.log", max_input_tokens=longest + 8,
            max_total_tokens=longest + 16 + w.stream_new,
            extra_args=["--max-batch-prefill-tokens", str(budget), "--no-prefix-caching"],
        )
        try:
            results[mode] = asyncio.run(_streams_while_prompts_arrive(stack, streams, longs, w))
        finally:
            stack.close()
        r = results[mode]
        log(f"  ITL p50/p90 {r['itl_p50_ms']:.0f}/{r['itl_p90_ms']:.0f} ms, longest gap {r['longest_gap_ms']:.0f} ms")
    results["longest_gap_ratio_chunked_to_unchunked"] = (
        results["chunked"]["longest_gap_ms"] / results["unchunked"]["longest_gap_ms"]
    )
    return results


async def _streams_while_prompts_arrive(stack: ServedStack, streams, longs, w: FeatureWorkloads) -> dict:
    url = f"{stack.url}/generate_stream"

    def body(prompt) -> dict:
        return {"inputs": prompt.text, "parameters": {"max_new_tokens": prompt.max_new_tokens}}

    async with client_session() as session:
        await sse_arrivals(session, url, body(longs[-1]))  # warm up with the longest prompt's size
        arrivals: list[list[float]] = [[] for _ in streams]

        async def stream(i: int) -> None:
            async with session.post(url, json=body(streams[i])) as response:
                async for line in response.content:
                    if line.startswith(b"data:") and b'"token"' in line:
                        arrivals[i].append(time.perf_counter())

        tasks = [asyncio.create_task(stream(i)) for i in range(len(streams))]
        while not all(arrivals) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        start = time.perf_counter()
        ttfts = []
        for prompt in longs:  # one after another: each arrives while the streams decode
            sent, tokens, _ = await sse_arrivals(session, url, body(prompt))
            ttfts.append(tokens[0] - sent)
        end = time.perf_counter()
        ended_early = sum(t.done() for t in tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps, longest = [], 0.0
    for times in arrivals:
        inside = [t for t in times if start <= t <= end]
        # the gap that spans the window's start counts too: it is a pause the stream saw
        before = [t for t in times if t < start][-1:]
        series = before + inside
        stream_gaps = [b - a for a, b in zip(series, series[1:])]
        gaps += stream_gaps
        longest = max([longest, *stream_gaps])
    if ended_early:
        raise RuntimeError(f"{ended_early} stream(s) ended before the long prompts were prefilled: raise stream_new")
    return {
        "window_ms": ms(end - start), "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p90_ms": ms(percentile(gaps, 90)),
        "longest_gap_ms": ms(longest), "gaps": len(gaps), "long_prompt_ttft_ms": [ms(t) for t in ttfts],
    }


# ----- a long context ------------------------------------------------------------------------------------------


def long_context(model_dir: Path, dtype: str, w: FeatureWorkloads, out: Path, log) -> dict:
    maker = PromptMaker(model_dir)
    prompt = maker.make(random.Random(3), w.long_context, w.long_context_new)
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * (
        4 if dtype == "float32" else 2
    )
    wanted = (w.long_context + w.long_context_new + 4096) * bytes_per_token  # the request, and some room
    fraction = min(1.0, 1.25 * wanted / _available_memory())
    log(f"long context: {len(prompt.ids)} tokens ({len(prompt.text.encode()) / 1e6:.2f} MB of text), "
        f"KV cache fraction {fraction:.5f}")
    stack = ServedStack(
        model_dir, dtype, out / "launcher-long-context.log", max_input_tokens=w.long_context + 8,
        max_total_tokens=w.long_context + 8 + w.long_context_new, extra_args=["--kv-cache-fraction", f"{fraction:.6f}"],
    )
    try:
        idle = stack.memory()
        capacity_tokens = _counter(stack.metrics_text(), "tgi_batch_max_total_tokens")

        async def one() -> Stream:
            async with client_session() as session:
                body = {"inputs": prompt.text, "parameters": {"max_new_tokens": w.long_context_new}}
                return await sse_arrivals(session, f"{stack.url}/generate_stream", body)

        sent, arrivals, _ = asyncio.run(one())
        peak = stack.memory()
    finally:
        stack.close()
    decode_s = arrivals[-1] - arrivals[0]
    result = {
        "prompt_tokens": len(prompt.ids), "prompt_bytes": len(prompt.text.encode()), "new_tokens": len(arrivals),
        "ttft_s": arrivals[0] - sent,
        "decode_tok_s": (len(arrivals) - 1) / decode_s if decode_s > 0 else None,
        "kv_cache_tokens": capacity_tokens, "kv_cache_bytes": capacity_tokens * bytes_per_token,
        "memory_idle": idle, "memory_peak": peak,
    }
    shard_peak = peak.get("shard-0", {}).get("VmHWM", 0)
    log(f"  TTFT {result['ttft_s']:.1f} s, decode {result['decode_tok_s'] or 0:.1f} tok/s, shard peak RSS "
        f"{shard_peak / 2**20:.0f} MiB, KV cache {result['kv_cache_bytes'] / 2**20:.0f} MiB")
    return result


def _available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")

