"""End to end: `text-generation-launcher` with real shard and router processes and real clients."""

from __future__ import annotations

import os
import shutil
import signal
import socket
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

from text_generation_common.tokenizer import Tokenizer

LAUNCHER = str(Path(sys.executable).with_name("text-generation-launcher"))
PROMPTS = ["Hello world, this is", "The weather in Shanghai", "1 2 3 4 5 6"]
NEW_TOKENS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def __init__(self, model_dir: Path, tmp_path: Path, *args: str):
        self.uds = str(tmp_path / "sock" / "shard")
        Path(self.uds).parent.mkdir(exist_ok=True)
        self.port, self.grpc_port = free_port(), free_port()
        self.log = tmp_path / "launcher.log"
        argv = [
            LAUNCHER, "--model-id", str(model_dir), "--port", str(self.port), "--grpc-port", str(self.grpc_port),
            "--hostname", "127.0.0.1", "--shard-uds-path", self.uds, "--master-port", str(free_port()),
            "--kv-cache-fraction", "0.002", "--graceful-termination-timeout", "20", *args,
        ]
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT)
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

    def start(model_dir: Path, *args: str) -> Launched:
        launched = Launched(model_dir, tmp_path, *args)
        started.append(launched)
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
    metrics_port, key = free_port(), "launcher-key"
    served = launch(
        model_dir, "--num-shard", str(shards), "--api-key", key, "--prometheus-port", str(metrics_port),
        "--payload-limit", "100000", "--rope-factor", "1.0",
    )
    children = [pid for pid in processes_mentioning(served.uds) if pid != served.process.pid]
    assert children and all(key not in Path(f"/proc/{pid}/cmdline").read_text() for pid in children)  # env, not argv
    assert "tgi_request_count " in urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
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


def test_a_dead_shard_stops_everything(launch, tiny_internlm2_dir):
    served = launch(tiny_internlm2_dir)
    shard_pids = [pid for pid in processes_mentioning(served.uds) if pid != served.process.pid]
    servers = [pid for pid in shard_pids if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert servers, "no shard process found"
    os.kill(servers[0], signal.SIGKILL)
    assert served.process.wait(15) != 0
    assert "shard 0 exited unexpectedly" in served.log.read_text()
    time.sleep(0.5)
    assert processes_mentioning(served.uds) == []


def test_sigterm_while_streaming_stops_cleanly(launch, tiny_internlm2_dir):
    served = launch(tiny_internlm2_dir)
    outcomes: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream(
                "POST", f"{served.url}/generate_stream", timeout=60,
                json={"inputs": "Hello", "parameters": {"max_new_tokens": 400}},
            ) as response:
                for _ in response.iter_lines():
                    pass
            outcomes.append("ended")
        except httpx.HTTPError as e:
            outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0, served.log.read_text()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a client was left hanging"
    assert len(outcomes) == 4
    assert processes_mentioning(served.uds) == []
    assert not any(Path(served.uds).parent.iterdir()), "sockets left behind"


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
