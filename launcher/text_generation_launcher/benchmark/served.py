"""Our whole stack: `text-generation-launcher` (HTTP -> router -> gRPC -> shard) as a subprocess, driven by
asynchronous streaming clients (aiohttp) against `/generate_stream`.

Each request records `time.perf_counter()` at send and at the arrival of every token event: TTFT = first token
- send, ITL = gaps between a request's token arrivals. A level of concurrency c is a closed loop: c clients each
send their next request as soon as their previous one ended, over the same seeded list of requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from text_generation_common.sockets import free_port

from .stats import latency_summary, median, prefill_figures
from .workloads import Prompt, PromptSet, Workloads


def client_session():
    """An aiohttp session without a connection limit, that waits as long as a stream takes."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None, sock_read=1800)
    )


class Stream(NamedTuple):
    sent: float  # time.perf_counter() at the request's send
    arrivals: list[float]  # arrival time of every event that carried a token
    usage: dict | None  # the last `usage` an OpenAI stream sent (with stream_options.include_usage)


async def sse_arrivals(session, url: str, body: dict) -> Stream:
    """POST `body` and read the event stream: the arrival of every event carrying a token (a TGI event's
    `token` or an OpenAI chunk's `choices`) and the last usage reported."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            now = time.perf_counter()
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("token") is not None or event.get("choices"):
                arrivals.append(now)
            usage = event.get("usage") or usage
    return Stream(sent, arrivals, usage)


def _launcher_argv() -> list[str]:
    script = Path(sys.executable).with_name("text-generation-launcher")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from text_generation_launcher.cli import app; app()"]


def new_socket_dir() -> Path:
    """A new temporary directory for unix sockets, at a short path: a socket's path is limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="tgi-bench-"))


class ServerProcess:
    """A server started in a process group of its own, logging to a file; `close` stops the whole group and
    removes its `socket_dir`, if it has one."""

    name = "server"
    socket_dir: Path | None = None

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    def wait_ready(self, is_ready, timeout: float) -> None:
        """Poll `is_ready()` until it is true; raise with the log's tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if is_ready():
                return
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # what the group's leader left behind (a peer's engine process, say)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self._log.close()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


class ServedStack(ServerProcess):
    name = "text-generation-launcher"

    def __init__(self, model_dir: Path, dtype: str, log_path: Path, *, max_input_tokens: int, max_total_tokens: int,
                 max_concurrent_requests: int = 128, extra_args=(), startup_timeout: float = 900):
        self.socket_dir = new_socket_dir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            *_launcher_argv(), "--model-id", str(model_dir), "--dtype", dtype, "--port", str(self.port),
            "--grpc-port", "0", "--hostname", "127.0.0.1", "--shard-uds-path", str(self.socket_dir / "shard"),
            "--master-port", str(free_port()), "--max-input-tokens", str(max_input_tokens),
            "--max-total-tokens", str(max_total_tokens), "--max-concurrent-requests", str(max_concurrent_requests),
            *extra_args,
        ]
        super().__init__(argv, log_path)
        self.info = {"engine": "ours: text-generation-launcher, HTTP /generate_stream", "dtype": dtype,
                     "argv": argv[1:]}
        self.wait_ready(lambda: "ready: HTTP" in self.log_path.read_text(errors="replace"), startup_timeout)

    @classmethod
    def for_workloads(cls, model_dir: Path, dtype: str, workloads: Workloads, log_path: Path) -> ServedStack:
        """The stack for the core workloads (decode, prefill, mixed, decode step), without prefix caching: their
        runs repeat prompts, and a cache hit would measure no prefill at all (the prefix-cache workload measures
        caching)."""
        max_input = max(workloads.decode_prompt, workloads.prefill_prompt, workloads.mixed_prompt[1],
                        workloads.step_prompt) + 4
        concurrent = max(128, 2 * max(workloads.concurrency), 2 * workloads.step_streams)
        return cls(model_dir, dtype, log_path, max_input_tokens=max_input, max_total_tokens=workloads.max_total_tokens + 8,
                   max_concurrent_requests=concurrent, extra_args=["--no-prefix-caching"])

    def processes(self) -> dict[str, int]:
        """pid of each process of the stack: the launcher, its router and its shards (shard-0, ...).

        The launcher starts each child in a session of its own, so they are found as its children (PPid)."""
        found = {"launcher": self.process.pid}
        for entry in sorted(Path("/proc").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0):
            if not entry.name.isdigit():
                continue
            try:
                status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            if int(status["PPid"].strip()) != self.process.pid:
                continue
            text = b" ".join(argv).decode(errors="replace")
            if "text-generation-router" in text:
                found["router"] = int(entry.name)
            elif " serve " in text:
                found[f"shard-{sum(name.startswith('shard') for name in found)}"] = int(entry.name)
        return found

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system, all threads) so far of the router and of this process, whose event loop
        runs the benchmark's clients. /proc's clock ticks are 10 ms: read over runs of seconds."""
        pids = {"router": self.processes()["router"], "clients": os.getpid()}
        return {name: process_cpu_seconds(pid) for name, pid in pids.items()}

    # ------------------------------------------------------------------------------------------- client

    async def _stream(self, session, prompt: Prompt) -> dict:
        body = {"inputs": prompt.text, "parameters": {"max_new_tokens": prompt.max_new_tokens, "details": False,
                                                       "decoder_input_details": False}}
        sent, arrivals, _ = await sse_arrivals(session, f"{self.url}/generate_stream", body)
        return {"sent": sent, "arrivals": arrivals, "asked": prompt.max_new_tokens}

    async def _closed_loop(self, prompts: list[Prompt], concurrency: int) -> tuple[float, float, list[dict]]:
        queue: asyncio.Queue = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)
        results: list[dict] = []

        async def client(session):
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await self._stream(session, p))

        async with client_session() as session:
            start = time.perf_counter()
            await asyncio.gather(*(client(session) for _ in range(concurrency)))
            end = time.perf_counter()
        return start, end, results

    def drive(self, prompts: list[Prompt], concurrency: int) -> tuple[float, float, list[dict]]:
        return asyncio.run(self._closed_loop(prompts, concurrency))

    def memory(self) -> dict[str, dict[str, int]]:
        """Resident memory of each process now and at its peak (VmRSS, VmHWM), in bytes."""
        out = {}
        for name, pid in self.processes().items():
            fields = {}
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
            out[name] = fields
        return out

    def metrics_text(self) -> str:
        """The router's /metrics page."""
        import urllib.request

        return urllib.request.urlopen(f"{self.url}/metrics", timeout=30).read().decode()

    def metrics(self) -> dict[str, float]:
        """The router's Prometheus counters of the shard calls (sums and counts by method)."""
        text = self.metrics_text()
        out = {}
        pattern = re.compile(r'^(tgi_batch_(?:inference|forward|decode)_duration_(?:sum|count))\{method="(\w+)"\} (\S+)$')
        for line in text.splitlines():
            m = pattern.match(line)
            if m:
                out[f"{m.group(1)}:{m.group(2)}"] = float(m.group(3))
        return out

    # ----------------------------------------------------------------------------------------- workloads

    def warmup(self, prompts: PromptSet, workloads: Workloads) -> None:
        short = Prompt(prompts.decode.text, prompts.decode.ids, 4)
        self.drive([short], 1)
        burst = max(max(workloads.concurrency), workloads.step_streams)
        self.drive([Prompt(p.text, p.ids, 3) for p in (prompts.mixed * burst)[:burst]], burst)

    def decode(self, prompt: Prompt, repeats: int) -> dict:
        runs = []
        cpu_before = self.cpu_seconds()
        for _ in range(repeats):
            _, end, (r,) = self.drive([prompt], 1)
            t = r["arrivals"]
            runs.append({"decode_tok_s": (len(t) - 1) / (t[-1] - t[0]), "e2e_tok_s": len(t) / (end - r["sent"]),
                         "ttft_ms": (t[0] - r["sent"]) * 1000})
        cpu_after = self.cpu_seconds()
        _check_counts([r], [prompt])
        out = {key: median(x[key] for x in runs) for key in runs[0]}
        out.update(prompt_tokens=len(prompt.ids), new_tokens=prompt.max_new_tokens, repeats=repeats)
        tokens = repeats * prompt.max_new_tokens
        out["cpu_ms_per_token"] = {name: 1000 * (cpu_after[name] - cpu_before[name]) / tokens for name in cpu_after}
        return out

    def prefill(self, prompt: Prompt, repeats: int) -> dict:
        seconds = []
        for _ in range(repeats):
            _, _, (r,) = self.drive([Prompt(prompt.text, prompt.ids, 1)], 1)
            seconds.append(r["arrivals"][0] - r["sent"])
        return prefill_figures(len(prompt.ids), seconds)

    def mixed(self, prompts: list[Prompt], concurrency: int) -> dict:
        start, end, results = self.drive(prompts, concurrency)
        _check_counts(results, prompts)
        ttfts = [r["arrivals"][0] - r["sent"] for r in results]
        gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
        tokens = sum(len(r["arrivals"]) for r in results)
        out = latency_summary(ttfts, gaps, tokens, end - start)
        out.update(concurrency=concurrency, mode=f"{concurrency} streaming clients, closed loop")
        return out

    def decode_step(self, prompts: list[Prompt]) -> dict:
        """The decode step of `len(prompts)` streams all started at once, seen by the clients.

        Window: from the last stream's first token (every stream has joined the running batch) to the first
        stream's last token. Per stream, step time = window / tokens that arrived inside it; the median over
        the streams. The router's counters of the shard calls over the whole run give the shard-side split.
        """
        before, cpu_before = self.metrics(), self.cpu_seconds()
        _, _, results = self.drive(prompts, len(prompts))
        cpu_after, after = self.cpu_seconds(), self.metrics()
        _check_counts(results, prompts)
        joined = max(r["arrivals"][0] for r in results)
        leaving = min(r["arrivals"][-1] for r in results)
        per_stream = []
        for r in results:
            inside = [t for t in r["arrivals"] if joined < t <= leaving]
            if inside:
                per_stream.append((leaving - joined) / len(inside))
        out = {"streams": len(prompts), "window_ms": (leaving - joined) * 1000,
               "step_ms": median(per_stream) * 1000 if per_stream else None}
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        calls = delta.get("tgi_batch_inference_duration_count:decode", 0.0)
        if calls:
            out["shard_decode_calls"] = calls
            # what the router and the clients took of the cores the shard computes on, per decode call (their
            # work is per token; the shard's own CPU time would count the run's prefill too)
            out["cpu_ms_per_step"] = {name: 1000 * (cpu_after[name] - cpu_before[name]) / calls for name in cpu_after}
            out["shard_call_ms"] = 1000 * delta["tgi_batch_inference_duration_sum:decode"] / calls
            for kind in ("forward", "decode"):
                key = f"tgi_batch_{kind}_duration_sum:decode"
                if key in delta:
                    out[f"shard_{kind}_ms"] = 1000 * delta[key] / calls
        return out


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of process `pid` so far, from /proc (in 10 ms clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14 and 15)


def _check_counts(results: list[dict], prompts: list[Prompt]) -> None:
    short = [r for r in results if len(r["arrivals"]) != r["asked"]]
    if short:
        r = short[0]
        raise RuntimeError(f"{len(short)} stream(s) ended early, e.g. {len(r['arrivals'])} of {r['asked']} tokens")
