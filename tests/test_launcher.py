"""End to end: `text-generation-launcher` with real shard and router processes and real clients."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from conftest import make_tiny
from helpers import internlm2_to_llama
from transformers import LlamaForCausalLM

from text_generation_common.sockets import free_port, free_ports
from text_generation_common.tokenizer import Tokenizer

LAUNCHER = str(Path(sys.executable).with_name("text-generation-launcher"))
PROMPTS = ["Hello world, this is", "The weather in Shanghai", "1 2 3 4 5 6"]
NEW_TOKENS = 10


def processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (a path unique to one test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class Launched:
    """A launcher on free ports, no two the same. default_sockets: leave --shard-uds-path and --master-port to the
    launcher; metrics: also serve /metrics on `metrics_port`."""

    def __init__(self, model_dir: Path, tmp_path: Path, *args: str, default_sockets: bool = False, metrics: bool = False,
                 name: str = "launcher"):
        self.port, self.grpc_port, self.metrics_port, master_port = free_ports(4)
        self.log = tmp_path / f"{name}.log"
        argv = [
            LAUNCHER, "--model-id", str(model_dir), "--port", str(self.port), "--grpc-port", str(self.grpc_port),
            "--hostname", "127.0.0.1", "--kv-cache-fraction", "0.002", "--graceful-termination-timeout", "20", *args,
        ]
        if metrics:
            argv += ["--prometheus-port", str(self.metrics_port)]
        if not default_sockets:
            uds = tmp_path / f"{name}-sock" / "shard"
            uds.parent.mkdir(exist_ok=True)
            argv += ["--shard-uds-path", str(uds), "--master-port", str(master_port)]
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.uds = str(uds) if not default_sockets else f"/tmp/text-generation-server-{self.process.pid}"
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"launcher exited with {self.process.returncode}:\n{self.log.read_text()}")
            if "ready: HTTP" in self.log.read_text():
                return
            time.sleep(0.2)
        raise AssertionError(f"launcher not ready after {timeout}s:\n{self.log.read_text()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for pid in processes_mentioning(self.uds):
            os.kill(pid, signal.SIGKILL)
        self._log_file.close()


@pytest.fixture()
def launch(tmp_path):
    started = []

    def start(model_dir: Path, *args: str, ready: bool = True, **kwargs) -> Launched:
        launched = Launched(model_dir, tmp_path, *args, **kwargs)
        started.append(launched)
        if ready:
            launched.wait_ready()
        return launched

    yield start
    for launched in started:
        launched.close()


def reference_tokens(model_dir: Path, tmp_path: Path) -> dict[str, list[int]]:
    """Greedy tokens of transformers' Llama on the converted weights, for each prompt."""
    llama = LlamaForCausalLM.from_pretrained(internlm2_to_llama(model_dir, tmp_path / "llama"), dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            generated = llama.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        out[prompt] = generated[0, len(ids) :].tolist()
    return out


@pytest.mark.parametrize("format,shards", [("safetensors", 1), ("bin", 2)])
def test_launcher_serves_internlm2_through_every_api(launch, tmp_path, tmp_path_factory, format, shards):
    from text_generation import Client
    from openai import OpenAI

    from text_generation_common.pb import generation_pb2, generation_pb2_grpc

    model_dir = make_tiny(tmp_path_factory, f"launcher-{format}", format=format, shards=2, hidden=64, heads=4, kv_heads=2)
    expected = reference_tokens(model_dir, tmp_path)
    # the operations flags reach the router and the shards (a rope factor of 1.0 alone is linear: no change)
    key = "launcher-key"
    served = launch(
        model_dir, "--num-shard", str(shards), "--api-key", key, "--payload-limit", "100000", "--rope-factor", "1.0",
        metrics=True,
    )
    children = [pid for pid in processes_mentioning(served.uds) if pid != served.process.pid]
    assert children and all(key not in Path(f"/proc/{pid}/cmdline").read_text() for pid in children)  # env, not argv
    assert "tgi_request_count " in urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics").read().decode()
    big = httpx.post(f"{served.url}/generate", content=b" " * 100_001, headers={"Authorization": f"Bearer {key}"})
    assert big.status_code == 413
    assert httpx.post(f"{served.url}/generate", json={"inputs": "hi"}).status_code == 401

    client = Client(served.url, timeout=60, headers={"Authorization": f"Bearer {key}"})
    for prompt in PROMPTS:
        response = client.generate(prompt, max_new_tokens=NEW_TOKENS, decoder_input_details=True)
        assert [t.id for t in response.details.tokens] == expected[prompt], prompt
        streamed = [r.token.id for r in client.generate_stream(prompt, max_new_tokens=NEW_TOKENS)]
        assert streamed == expected[prompt]

    openai = OpenAI(base_url=f"{served.url}/v1", api_key=key)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    completion = openai.completions.create(model="tgi", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0)
    assert completion.choices[0].text == tokenizer.decode(expected[PROMPTS[0]], skip_special_tokens=True)
    chat = openai.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].finish_reason in ("length", "stop")

    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply = stub.Generate(
            generation_pb2.BatchedGenerationRequest(
                requests=[generation_pb2.GenerationRequest(text=PROMPTS[1])],
                params=generation_pb2.Parameters(
                    stopping=generation_pb2.StoppingCriteria(max_new_tokens=NEW_TOKENS),
                    response=generation_pb2.ResponseOptions(generated_tokens=True),
                ),
            ),
            timeout=60,
        )
        assert reply.responses[0].text == tokenizer.decode(expected[PROMPTS[1]], skip_special_tokens=True)


class Streams:
    """`count` streaming /v1/completions clients that never end by themselves (ignore_eos, a long max_tokens);
    each records when and how its stream ended: its last event before [DONE], or the client's error."""

    def __init__(self, url: str, count: int, max_tokens: int = 400):
        self.url, self.max_tokens, self.ends, self.lock = url, max_tokens, [], threading.Lock()
        self.started = threading.Semaphore(0)  # released by each stream's first event
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        body = {"prompt": "Hello", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        events: list[str] = []
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events.append(line)
                        if len(events) == 1:
                            self.started.release()
            outcome = events[-2] if len(events) > 1 and events[-1] == "data:[DONE]" else f"no [DONE]: {events[-1:]}"
        except httpx.HTTPError as error:
            outcome = f"{type(error).__name__}: {error}"
        with self.lock:
            self.ends.append((time.monotonic(), outcome))

    def wait_started(self, timeout: float = 30) -> None:
        """Until every stream has its first event (all are in flight)."""
        for _ in self.threads:
            assert self.started.acquire(timeout=timeout), "the streams did not start"

    def join(self, timeout: float) -> list[tuple[float, str]]:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a client was left hanging"
        return self.ends


def shared_memory() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    """A tiny model that 1, 2 and 4 ranks can split."""
    return make_tiny(tmp_path_factory, "launcher-4kv", hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=1000)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_sigterm_while_streaming_stops_cleanly(launch, four_kv_heads, shards):
    """In-flight streams get the grace period, then an error event; every process is gone 5 s later, exit 0.
    The grace period is 0 s: the tiny model could finish a stream within any longer one, and which way a
    stream ends must not depend on the machine's speed."""
    before = shared_memory()
    served = launch(four_kv_heads, "--num-shard", str(shards), "--graceful-termination-timeout", "0")
    streams = Streams(served.url, 3)
    streams.wait_started()
    signalled = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(5 + 1) == 0, served.log.read_text()
    stopped = time.monotonic() - signalled
    ends = streams.join(10)
    assert len(ends) == 3 and all("the server is shutting down" in outcome for _, outcome in ends), ends
    assert all(at - signalled < 1 for at, _ in ends), ends  # at the end of the grace period (and a margin)
    assert stopped < 5, served.log.read_text()
    assert processes_mentioning(served.uds) == []
    assert not any(Path(served.uds).parent.iterdir()), "sockets left behind"
    assert shared_memory() <= before, "shared memory left behind"
    assert f"{shards} shard(s) ready" in served.log.read_text() and "killing" not in served.log.read_text()


def test_sigterm_lets_in_flight_requests_finish_within_the_grace_period(launch, four_kv_heads):
    served = launch(four_kv_heads, "--num-shard", "2", "--graceful-termination-timeout", "30")
    streams = Streams(served.url, 3, max_tokens=40)
    streams.wait_started()
    signalled = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(30 + 5) == 0, served.log.read_text()
    ends = streams.join(10)
    assert len(ends) == 3 and all('"finish_reason":"length"' in outcome for _, outcome in ends), ends
    assert time.monotonic() - signalled < 30, "the server waited out the grace period though nothing was left"
    assert processes_mentioning(served.uds) == []


@pytest.mark.parametrize("victim", ["shard 1", "router"])
def test_a_killed_shard_or_router_stops_everything(launch, four_kv_heads, victim):
    """Everything stops within 5 s, the launcher exits non-zero, every in-flight client has its error."""
    served = launch(four_kv_heads, "--num-shard", "2")
    streams = Streams(served.url, 3)
    streams.wait_started()
    children = [pid for pid in processes_mentioning(served.uds) if pid != served.process.pid]
    marker = b"text-generation-router" if victim == "router" else b"serve"
    candidates = [pid for pid in children if marker in Path(f"/proc/{pid}/cmdline").read_bytes()]
    if victim == "shard 1":
        candidates = [pid for pid in candidates if b"RANK=1\x00" in Path(f"/proc/{pid}/environ").read_bytes()]
    assert len(candidates) == 1, candidates
    killed = time.monotonic()
    os.kill(candidates[0], signal.SIGKILL)
    assert served.process.wait(5) == 1
    ends = streams.join(10)
    assert len(ends) == 3 and all(at - killed < 5 for at, _ in ends), ends
    assert not any(outcome.startswith("data:{\"id\"") for _, outcome in ends), ends  # an error, not a token
    assert f"{victim} exited unexpectedly" in served.log.read_text()
    time.sleep(0.5)
    assert processes_mentioning(served.uds) == []


def test_two_servers_on_one_host_never_collide(launch, tiny_internlm2_dir, tmp_path):
    """Default sockets and master ports are per instance; a taken socket or port is one clear error, at once,
    and the running server is untouched."""
    first = launch(tiny_internlm2_dir, "--num-shard", "2", default_sockets=True, name="first")
    second = launch(tiny_internlm2_dir, "--num-shard", "2", default_sockets=True, name="second")
    assert first.uds != second.uds
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for served in (first, second):
        # below the range gloo's pairs and outgoing connections draw from, so none can take it first
        master_port = int(re.search(r"torch.distributed on localhost:(\d+)", served.log.read_text()).group(1))
        assert 1024 <= master_port < ephemeral_low
        assert httpx.post(f"{served.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200

    started = time.monotonic()
    taken_socket = launch(
        tiny_internlm2_dir, "--shard-uds-path", first.uds, ready=False, default_sockets=True, name="taken-socket"
    )
    assert taken_socket.process.wait(30) == 1
    assert f"shard socket {first.uds}-0 is in use" in taken_socket.log.read_text()
    taken_port = launch(tiny_internlm2_dir, "--port", str(first.port), ready=False, default_sockets=True, name="taken-port")
    assert taken_port.process.wait(30) == 1 and time.monotonic() - started < 20
    log = taken_port.log.read_text()
    assert f"--port {first.port} on 127.0.0.1 is in use" in log and "shard 0" not in log  # before any shard loads
    assert Path(f"{first.uds}-0").exists() and Path(f"{first.uds}-1").exists()
    assert httpx.post(f"{first.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_a_master_port_that_is_also_the_http_port_is_refused_at_once(launch, tiny_internlm2_dir):
    port = free_port()
    clash = launch(tiny_internlm2_dir, "--num-shard", "2", "--port", str(port), "--master-port", str(port),
                   ready=False, default_sockets=True, name="clash")
    assert clash.process.wait(30) == 1
    log = clash.log.read_text()
    assert f"--port {port} is also --master-port" in log and "shard 0" not in log  # before any shard loads


def test_free_port_skips_the_ports_it_is_told_to_avoid(monkeypatch):
    """A launcher picks its master port while its HTTP and gRPC ports are still unbound: it must not pick them."""
    from text_generation_common import sockets

    monkeypatch.setattr(sockets.random, "shuffle", lambda ports: None)  # the candidates in order, lowest first
    lowest = sockets.free_port()
    assert sockets.free_port() == lowest
    assert sockets.free_port(avoid={lowest}) != lowest


@pytest.mark.parametrize("problem", ["missing", "broken-config", "broken-weights"])
def test_a_missing_or_broken_model_is_one_clear_error(tmp_path, tiny_internlm2_dir, problem):
    model_dir = tmp_path / "model"
    if problem == "broken-config":
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{ not json")
        (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    elif problem == "broken-weights":
        shutil.copytree(tiny_internlm2_dir, model_dir)
        next(model_dir.glob("*.safetensors")).write_bytes(b"truncated")
    result = subprocess.run(
        [LAUNCHER, "--model-id", str(model_dir), "--port", str(free_port()), "--shard-uds-path", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(model_dir) in errors[0], errors[0]
