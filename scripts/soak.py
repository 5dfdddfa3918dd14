"""Soak: many requests of a mixed load against a server this script starts, and whether it holds up.

    python scripts/soak.py --model-id models/tiny-internlm2 [--requests 10000] [--concurrency 16] [--out FILE]

It starts `text-generation-launcher` on free loopback ports, then keeps `--concurrency` requests in flight
until `--requests` have been sent. Each request is drawn (seeded) from a mixed load:

* the three APIs: TGI (`/generate`, `/generate_stream`), OpenAI (`/v1/completions`, `/v1/chat/completions`,
  streamed or not) and TGIS gRPC (`Generate`, `GenerateStream`);
* random valid parameters (greedy or sampled, temperature, top_k, top_p, seed, stop, max_new_tokens, n);
* clients that disconnect mid-stream (they read a few events, then close);
* invalid requests (bad parameters, empty prompts, unknown fields), which must be refused with a 4xx.

The report: requests sent and answered, errors by kind, requests lost (no final event or status: must be 0),
the RSS of every process after warm-up (the first `--warmup` requests, 2,000 by default: the shard's native
allocations settle over the first thousands) and at the end (growth must stay under
5%), the KV blocks requests still hold at the end (must be 0), and latency p50/p99 per kind. Exit status 1 if
a requirement failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from text_generation_common.pb import generation_pb2 as tgis
from text_generation_common.pb import generation_pb2_grpc as tgis_grpc

PROMPTS = ["Hello", "The weather today is", "Tell me a story about a robot", "1 2 3 4", "你好，世界", "Once upon a time"]
RSS_GROWTH_LIMIT = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    kind: str  # e.g. "tgi stream", "openai chat", "tgis generate", "invalid", "disconnect"
    status: str  # "ok", "refused <code>", "error <type>", "lost <why>", "disconnected"
    seconds: float


@dataclass
class Soak:
    url: str
    grpc_target: str
    rng: random.Random
    outcomes: list[Outcome] = field(default_factory=list)

    def max_new(self) -> int:
        return self.rng.randint(1, 24)

    def sampling(self) -> dict:
        if self.rng.random() < 0.4:
            return {}
        return {"temperature": round(self.rng.uniform(0.2, 1.5), 2), "top_k": self.rng.choice([0, 5, 50]) or None,
                "top_p": self.rng.choice([None, 0.5, 0.9]), "seed": self.rng.randint(0, 2**32)}

    # ------------------------------------------------------------------------------------------ kinds

    async def tgi(self, http: httpx.AsyncClient, stream: bool, disconnect: bool) -> str:
        sampling = self.sampling()
        parameters = {"max_new_tokens": self.max_new(), "details": True, **{k: v for k, v in sampling.items() if v is not None}}
        if sampling:
            parameters["do_sample"] = True
        if self.rng.random() < 0.2:
            parameters["stop"] = [self.rng.choice([".", " the", "\n"])]
        body = {"inputs": self.rng.choice(PROMPTS), "parameters": parameters}
        if not stream:
            r = await http.post("/generate", json=body)
            return "ok" if r.status_code == 200 and "generated_text" in r.json() else f"error {r.status_code} {r.text[:80]}"
        return await self.sse(http, "/generate_stream", body, disconnect, final=lambda e: e.get("generated_text") is not None)

    async def openai(self, http: httpx.AsyncClient, chat: bool, stream: bool, disconnect: bool) -> str:
        sampling = self.sampling()
        body = {"max_tokens": self.max_new(), "stream": stream, "n": self.rng.choice([1, 1, 1, 2]),
                "temperature": sampling.get("temperature", 0), "seed": sampling.get("seed")}
        if chat:
            body["messages"] = [{"role": "user", "content": self.rng.choice(PROMPTS)}]
        else:
            body["prompt"] = self.rng.choice(PROMPTS)
        route = "/v1/chat/completions" if chat else "/v1/completions"
        if not stream:
            r = await http.post(route, json=body)
            return "ok" if r.status_code == 200 and r.json().get("choices") else f"error {r.status_code} {r.text[:80]}"
        return await self.sse(http, route, body, disconnect, final=lambda e: e is None)

    async def sse(self, http: httpx.AsyncClient, route: str, body: dict, disconnect: bool, final) -> str:
        """A stream: "ok" when its final event came, "disconnected" when this client left on purpose."""
        leave_after = self.rng.randint(1, 3) if disconnect else None
        events = 0
        async with http.stream("POST", route, json=body) as r:
            if r.status_code != 200:
                return f"error {r.status_code}"
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line.removeprefix("data:")
                event = None if payload == "[DONE]" else json.loads(payload)
                if event is not None and "error" in event:
                    return f"error event {str(event['error'])[:80]}"
                events += 1
                if final(event):
                    return "ok"
                if leave_after is not None and events >= leave_after:
                    return "disconnected"
        return f"lost: the stream ended after {events} events without its final one"

    async def tgis(self, stub, stream: bool) -> str:
        sampling = self.sampling()
        params = tgis.Parameters(stopping=tgis.StoppingCriteria(max_new_tokens=self.max_new()))
        if sampling:
            params.method = tgis.SAMPLE
            params.sampling.temperature = sampling["temperature"]
            params.sampling.seed = sampling["seed"]
        if not stream:
            request = tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text=self.rng.choice(PROMPTS))], params=params)
            reply = await stub.Generate(request, timeout=120)
            return "ok" if reply.responses and reply.responses[0].stop_reason != tgis.NOT_FINISHED else "lost: no stop reason"
        request = tgis.SingleGenerationRequest(request=tgis.GenerationRequest(text=self.rng.choice(PROMPTS)), params=params)
        last = None
        async for last in stub.GenerateStream(request, timeout=120):
            pass
        return "ok" if last is not None and last.stop_reason != tgis.NOT_FINISHED else "lost: no stop reason"

    async def invalid(self, http: httpx.AsyncClient) -> str:
        route, body = self.rng.choice([
            ("/generate", {"inputs": "Hi", "parameters": {"temperature": -1}}),
            ("/generate", {"inputs": "", "parameters": {}}),
            ("/generate", {"inputs": "Hi", "parameters": {"top_p": 2}}),
            ("/v1/completions", {"prompt": "Hi", "not_a_field": 1}),
            ("/v1/chat/completions", {"messages": []}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
            ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "(("}}}),
        ])
        r = await http.post(route, json=body)
        shaped = r.headers.get("content-type", "").startswith("application/json") and "error_type" in r.json()
        return f"refused {r.status_code}" if 400 <= r.status_code < 500 and shaped else f"error {r.status_code} {r.text[:80]}"

    # ------------------------------------------------------------------------------------------ the loop

    async def one(self, http: httpx.AsyncClient, stub) -> None:
        pick = self.rng.random()
        disconnect = self.rng.random() < 0.1
        started = time.monotonic()
        if pick < 0.1:
            kind, call = "invalid", self.invalid(http)
        elif pick < 0.3:
            stream = self.rng.random() < 0.5
            kind, call = f"tgi {'stream' if stream else 'generate'}", self.tgi(http, stream, disconnect)
        elif pick < 0.55:
            stream = self.rng.random() < 0.5
            kind, call = f"openai completions{' stream' if stream else ''}", self.openai(http, False, stream, disconnect)
        elif pick < 0.85:
            stream = self.rng.random() < 0.5
            kind, call = f"openai chat{' stream' if stream else ''}", self.openai(http, True, stream, disconnect)
        else:
            stream = self.rng.random() < 0.5
            kind, call = f"tgis {'stream' if stream else 'generate'}", self.tgis(stub, stream)
        try:
            status = await call
        except (httpx.HTTPError, grpc.aio.AioRpcError) as error:
            status = f"lost: {type(error).__name__}: {str(error)[:80]}"
        self.outcomes.append(Outcome(kind, status, time.monotonic() - started))

    async def run(self, requests: int, concurrency: int, on_progress) -> None:
        limits = httpx.Limits(max_connections=concurrency * 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as http:
            async with grpc.aio.insecure_channel(self.grpc_target) as channel:
                stub = tgis_grpc.GenerationServiceStub(channel)
                pending: set[asyncio.Task] = set()
                for i in range(requests):
                    if len(pending) >= concurrency:
                        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    pending.add(asyncio.create_task(self.one(http, stub)))
                    on_progress(i + 1)
                await asyncio.gather(*pending)


# ---------------------------------------------------------------------------------------------- the server


def rss_bytes(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def children_of(marker: str) -> dict[str, int]:
    """name -> pid of the processes whose command line contains `marker` (the socket path of this server)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if not any(marker.encode() in a for a in argv):
            continue
        command = " ".join(a.decode(errors="replace") for a in argv)
        if "text-generation-router" in command:
            found["router"] = int(entry.name)
        elif "text-generation-server" in command and " serve " in command:
            rank = re.search(rb"(?:^|\0)RANK=(\d+)", environ)
            found[f"shard-{rank.group(1).decode() if rank else 0}"] = int(entry.name)
        elif "text-generation-launcher" in command:
            found["launcher"] = int(entry.name)
    return found


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def start_server(model_id: str, num_shard: int, log: Path) -> tuple[subprocess.Popen, str, str, str]:
    port, grpc_port = free_port(), free_port()
    uds = f"/tmp/soak-{os.getpid()}"
    argv = [str(Path(sys.executable).with_name("text-generation-launcher")), "--model-id", model_id, "--num-shard",
            str(num_shard), "--hostname", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
            "--shard-uds-path", uds, "--kv-cache-fraction", "0.002"]
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while "ready: HTTP" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return process, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", uds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(soak: Soak, rss_start: dict, rss_end: dict, blocks_in_use: float, sent: int, seconds: float) -> dict:
    by_status = Counter(o.status.split(":")[0] if o.status.startswith("lost") else o.status for o in soak.outcomes)
    lost = [o for o in soak.outcomes if o.status.startswith("lost")]
    errors = Counter(o.status for o in soak.outcomes if o.status.startswith("error"))
    latency = defaultdict(list)
    for o in soak.outcomes:
        latency[o.kind].append(o.seconds)
    growth = {name: (rss_end[name] - rss_start[name]) / rss_start[name] for name in rss_start if name in rss_end}
    return {
        "requests_sent": sent,
        "answered": sum(1 for o in soak.outcomes if not o.status.startswith("lost")),
        "seconds": round(seconds, 1),
        "outcomes": dict(by_status),
        "errors": dict(errors),
        "lost": len(lost),
        "lost_examples": [f"{o.kind}: {o.status}" for o in lost[:10]],
        "rss_after_warmup_mib": {k: round(v / 2**20, 1) for k, v in rss_start.items()},
        "rss_end_mib": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
        "rss_growth": {k: round(v, 4) for k, v in growth.items()},
        "kv_blocks_in_use_at_end": blocks_in_use,
        "latency_ms": {kind: {"n": len(v), "p50": round(1000 * statistics.median(v), 1), "p99": round(1000 * percentile(v, 0.99), 1)}
                       for kind, v in sorted(latency.items())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2000, help="Requests before the first RSS reading (native allocations settle).")
    parser.add_argument("--num-shard", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-results/soak.json"))
    args = parser.parse_args()
    if args.warmup >= args.requests:
        parser.error("--warmup must be smaller than --requests")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_suffix(".log")
    process, url, grpc_target, uds = start_server(args.model_id, args.num_shard, log)
    soak = Soak(url, grpc_target, random.Random(args.seed))
    rss_start: dict[str, int] = {}
    rss_samples: dict[int, dict[str, float]] = {}  # requests sent -> MiB per process

    def on_progress(sent: int) -> None:
        if sent == args.warmup:
            rss_start.update({name: rss_bytes(pid) for name, pid in children_of(uds).items()})
        if sent % 1000 == 0:
            rss_samples[sent] = {name: round(rss_bytes(pid) / 2**20, 1) for name, pid in children_of(uds).items()}
            print(f"[soak] {sent} sent, {len(soak.outcomes)} done, RSS MiB {rss_samples[sent]}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        asyncio.run(soak.run(args.requests, args.concurrency, on_progress))
        seconds = time.monotonic() - started
        time.sleep(1.0)  # the last cancellations reach the scheduler
        rss_end = {name: rss_bytes(pid) for name, pid in children_of(uds).items()}
        blocks_in_use = metric(url, "tgi_kv_blocks_used")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    result = report(soak, rss_start, rss_end, blocks_in_use, args.requests, seconds)
    result["rss_every_1000_requests_mib"] = rss_samples
    result["command"] = " ".join(sys.argv)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    failed = []
    if result["lost"]:
        failed.append(f"{result['lost']} requests lost")
    if blocks_in_use:
        failed.append(f"{blocks_in_use:g} KV blocks still held")
    failed += [f"{k} RSS grew {v:.1%}" for k, v in result["rss_growth"].items() if v > RSS_GROWTH_LIMIT]
    if result["errors"]:
        failed.append(f"{sum(result['errors'].values())} unexpected errors")
    for line in failed:
        print(f"[soak] FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
