"""A whole serving stack for tests: `text-generation-server serve` shards plus `text-generation-router`.

    stack = start_stack(model_dir, tmp_path, router_args=["--max-batch-total-tokens", "256"])
    try:
        httpx.post(f"{stack.http_url}/generate", json={...})
    finally:
        stack.close()

or as a context manager (`with start_stack(...) as stack:`). Every process writes its log to a file under
`tmp_path`; a stack that fails to start raises with every log attached, and `stack.logs()` returns them for
assertion messages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from text_generation_common.sockets import free_port, free_ports  # noqa: F401  (free_port: the tests import it from here)

_BIN = Path(sys.executable).parent
SERVER_CLI = (
    [str(_BIN / "text-generation-server")]
    if (_BIN / "text-generation-server").exists()
    else [sys.executable, "-m", "text_generation_server.cli"]
)
ROUTER_CLI = (
    [str(_BIN / "text-generation-router")]
    if (_BIN / "text-generation-router").exists()
    else [sys.executable, "-m", "text_generation_router.cli"]
)
UNIX_PATH_MAX = 107
TORCH_BLOCKER_MESSAGE = "the router must not import torch"


def torch_blocking_env(env: dict, tmp_path: Path) -> dict:
    """`env` with a `torch` package first on PYTHONPATH whose import fails: a process started with it dies
    at once if anything it loads imports torch. Every stack's router runs with it."""
    blocker = Path(tmp_path) / "no-torch"
    (blocker / "torch").mkdir(parents=True, exist_ok=True)
    (blocker / "torch" / "__init__.py").write_text(f"raise ImportError({TORCH_BLOCKER_MESSAGE!r})\n")
    paths = [str(blocker), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def _uds_base(tmp_path: Path) -> Path:
    """A socket base path unique to this stack; falls back to a short temp dir when tmp_path is too long."""
    base = Path(tmp_path) / "shard"
    if len(str(base)) + 4 > UNIX_PATH_MAX:
        base = Path(tempfile.mkdtemp(prefix="tgi-")) / "shard"
    return base


@dataclass
class Stack:
    http_url: str
    grpc_port: int  # 0 when the public gRPC API is disabled
    prometheus_port: int | None  # /metrics on a port of its own, None when not asked for
    router: subprocess.Popen
    shards: list[subprocess.Popen]
    uds_path: Path
    log_dir: Path
    log_files: dict[str, Path] = field(default_factory=dict)
    router_env: dict = field(default_factory=dict)  # the router's environment (torch cannot be imported in it)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def logs(self, tail: int = 20000) -> str:
        """Every process's log (the last `tail` characters of each), for assertion messages."""
        parts = []
        for name, path in self.log_files.items():
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"----- {name} ({path}) -----\n{text[-tail:]}")
        return "\n".join(parts)

    def router_log(self) -> str:
        path = self.log_files.get("router")
        return path.read_text(errors="replace") if path and path.exists() else ""

    def close(self, timeout: float = 15.0) -> None:
        """SIGTERM the router, then the shards; kill whatever has not exited after `timeout` seconds."""
        for group in ([self.router], self.shards):
            for process in group:
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for process in group:
                if process is None:
                    continue
                try:
                    process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StackError(AssertionError):
    pass


def _wait_for_sockets(uds: Path, shards: list[subprocess.Popen], stack: Stack, deadline: float) -> None:
    for rank, process in enumerate(shards):
        path = Path(f"{uds}-{rank}")
        while not path.exists():
            for other in shards:
                if other.poll() is not None:
                    raise StackError(f"a shard exited with {other.returncode}:\n{stack.logs()}")
            if time.monotonic() > deadline:
                raise StackError(f"shard {rank} made no socket {path} in time:\n{stack.logs()}")
            time.sleep(0.05)


def start_stack(
    model_dir: Path,
    tmp_path: Path,
    *,
    num_shard: int = 1,
    router_args: list[str] | tuple[str, ...] = (),
    shard_args: list[str] | tuple[str, ...] = (),
    kv_cache_fraction: float = 0.002,
    grpc: bool = True,
    prometheus: bool = False,
    timeout: float = 90.0,
    env: dict | None = None,
) -> Stack:
    """Start `num_shard` shards and a router on free ports; returns once GET /health answers 200 and the router
    has logged its ready line.

    `router_args` are appended to the router's command line (e.g. `["--max-batch-total-tokens", "128"]`),
    `shard_args` to each shard's.
    `grpc=False` passes `--grpc-port 0` (no public gRPC API); `prometheus=True` also serves /metrics on
    `stack.prometheus_port`. The stack's ports are all different.
    """
    tmp_path = Path(tmp_path)
    log_dir = tmp_path / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    uds = _uds_base(tmp_path)
    http_port, grpc_port, master_port, prometheus_port = free_ports(4)
    grpc_port = grpc_port if grpc else 0
    prometheus_port = prometheus_port if prometheus else None
    base_env = dict(env or os.environ)
    base_env.setdefault("OMP_NUM_THREADS", "1")

    stack = Stack(
        http_url=f"http://127.0.0.1:{http_port}",
        grpc_port=grpc_port,
        prometheus_port=prometheus_port,
        router=None,  # type: ignore[arg-type]
        shards=[],
        uds_path=uds,
        log_dir=log_dir,
    )
    try:
        for rank in range(num_shard):
            log = log_dir / f"shard-{rank}.log"
            stack.log_files[f"shard-{rank}"] = log
            shard_env = dict(base_env)
            command = [
                *SERVER_CLI, "serve", str(model_dir),
                "--uds-path", str(uds),
                "--dtype", "float32",
                "--device", "cpu",
                "--kv-cache-fraction", str(kv_cache_fraction),
                *shard_args,
            ]
            if num_shard > 1:
                command.append("--sharded")
                shard_env.update(
                    RANK=str(rank), WORLD_SIZE=str(num_shard), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port)
                )
            with open(log, "wb") as out:
                stack.shards.append(
                    subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=shard_env,
                                     start_new_session=True)
                )
        deadline = time.monotonic() + timeout
        _wait_for_sockets(uds, stack.shards, stack, deadline)

        log = log_dir / "router.log"
        stack.log_files["router"] = log
        command = [
            *ROUTER_CLI,
            "--master-shard-uds-path", f"{uds}-0",
            "--tokenizer-name", str(model_dir),
            "--hostname", "127.0.0.1",
            "--port", str(http_port),
            "--grpc-port", str(grpc_port),
            *(["--prometheus-port", str(prometheus_port)] if prometheus else []),
            *router_args,
        ]
        stack.router_env = torch_blocking_env(base_env, tmp_path)
        with open(log, "wb") as out:
            stack.router = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=stack.router_env, start_new_session=True
            )

        with httpx.Client(timeout=2.0) as client:
            while True:
                if stack.router.poll() is not None:
                    raise StackError(f"the router exited with {stack.router.returncode}:\n{stack.logs()}")
                for process in stack.shards:
                    if process.poll() is not None:
                        raise StackError(f"a shard exited with {process.returncode}:\n{stack.logs()}")
                try:
                    # the API answers a moment before the router has logged its ready line
                    healthy = client.get(f"{stack.http_url}/health").status_code == 200
                    if healthy and "router ready" in stack.router_log():
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the router was not ready (/health 200, its ready line) within {timeout}s:\n{stack.logs()}"
                    )
                time.sleep(0.1)
        return stack
    except BaseException:
        stack.close(timeout=5)
        raise
