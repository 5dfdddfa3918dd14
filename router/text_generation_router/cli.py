"""`text-generation-router`: connects to the shards, warms them up, schedules requests and serves the APIs.

Start-up (TGI's order): connect to the master shard, ServiceDiscovery, ClearCache, Info, Warmup, check the
limits, build the RouterState, start the step loop, then open /metrics (--prometheus-port), the public gRPC API
(`text_generation_router.grpc_api.serve_grpc`) and last the HTTP API (uvicorn, the FastAPI app of
`text_generation_router.api.create_app`), whose answer the launcher waits for; a port that cannot be bound stops
the start-up with a StartupError naming it. One log line containing "ready" gives the URLs. SIGTERM/SIGINT: stop
accepting (HTTP and gRPC), let in-flight requests finish; when --graceful-termination-timeout is up, end the rest
with an error (an error event on a stream), then exit 0.

Defaults derived from the model (stated here because TGI computes some of them in its launcher):
  * --max-total-tokens: min(max_position_embeddings, KV capacity after Warmup, --max-batch-total-tokens);
  * --max-input-tokens: max_total_tokens - 1;
  * --max-batch-prefill-tokens: 4096 (TGI's) on accelerators, 2048 on CPU, capped at the KV capacity: the tokens
    one step computes. It may be smaller than --max-input-tokens: longer prompts are prefilled in chunks over
    several steps;
  * --max-batch-total-tokens: the KV capacity from Warmup; a smaller value caps what the router uses
    (whole blocks: floor(value / block_size) blocks), which forces preemption in tests;
  * --prefix-caching (env PREFIX_CACHING, default on): share the KV blocks of identical prompt prefixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from loguru import logger

app = typer.Typer(add_completion=False, help="Router of the InternLM2 inference server (TGI-compatible APIs).")


def default_max_batch_prefill_tokens(device_type: str) -> int:
    """The step budget when --max-batch-prefill-tokens is not given: TGI's 4096 on accelerators, 2048 on CPU (as
    vLLM's CPU backend). A CPU computes a prompt's tokens at a few thousand a second, so a burst of prompts split
    over steps of 2048 gets its first tokens earlier: measured on the 2-core AVX-512 machine (small preset,
    bfloat16, 32 simultaneous 128-token prompts, 128 new tokens each), TTFT p50 1.1-1.6 s against 1.8-2.6 s with
    4096, the same total tokens/s (401-459 against 400-433). Running streams also wait at most one such step."""
    return 2048 if device_type == "cpu" else 4096


class StartupError(Exception):
    pass


def setup_logging(json_output: bool, level: str = "INFO") -> None:
    logger.remove()
    if json_output:
        logger.add(sys.stderr, level=level, serialize=True)
    else:
        logger.add(sys.stderr, level=level, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} router: {message}")


@app.command()
def main(
    master_shard_uds_path: str = typer.Option("/tmp/text-generation-server-0", help="Rank 0's unix socket."),
    tokenizer_name: str = typer.Option(..., help="Directory holding the tokenizer files (the model directory)."),
    model_id: Optional[str] = typer.Option(None, help="Model name shown to clients (default: the tokenizer dir)."),
    hostname: str = typer.Option("0.0.0.0", help="HTTP listen address."),
    port: int = typer.Option(3000, help="HTTP port."),
    grpc_port: int = typer.Option(8033, help="Public gRPC API port; 0 disables it."),
    max_concurrent_requests: int = typer.Option(128),
    max_best_of: int = typer.Option(2),
    max_stop_sequences: int = typer.Option(4),
    max_top_n_tokens: int = typer.Option(5),
    max_input_tokens: Optional[int] = typer.Option(None, help="Default: max_total_tokens - 1."),
    max_total_tokens: Optional[int] = typer.Option(
        None, help="Default: min(max_position_embeddings, KV capacity)."
    ),
    max_batch_prefill_tokens: Optional[int] = typer.Option(
        None, help="Tokens one step computes at most (decode tokens and prompt chunks). Default: 4096, 2048 on CPU."
    ),
    max_batch_total_tokens: Optional[int] = typer.Option(
        None, help="Cap on the KV capacity the router uses (default: all of it, from Warmup)."
    ),
    prefix_caching: bool = typer.Option(
        True, envvar="PREFIX_CACHING", help="Share the KV blocks of identical prompt prefixes (PREFIX_CACHING=0: off)."
    ),
    waiting_served_ratio: float = typer.Option(
        0.3, help="Accepted for TGI compatibility; no effect: new requests join every step within the token budget."
    ),
    max_waiting_tokens: int = typer.Option(
        20, help="Accepted for TGI compatibility; no effect: new requests join every step within the token budget."
    ),
    max_client_batch_size: int = typer.Option(
        4, help="Most prompts in one /v1/completions request; also the most `n` and `best_of` on the OpenAI routes."
    ),
    disable_grammar_support: bool = typer.Option(
        False, envvar="DISABLE_GRAMMAR_SUPPORT",
        help="Refuse constrained decoding (grammars, JSON response formats, guided decoding, forced tool calls).",
    ),
    api_key: Optional[str] = typer.Option(
        None, envvar="API_KEY", help="Require `Authorization: Bearer <key>` on the generation and tokenize routes."
    ),
    cors_allow_origin: list[str] = typer.Option(
        [], help="An origin browsers may call the API from (repeatable; default: any origin)."
    ),
    payload_limit: int = typer.Option(2_000_000, help="Largest request body in bytes; larger ones get 413."),
    chat_template: Optional[Path] = typer.Option(
        None, help="A Jinja chat template file that replaces the tokenizer's own."
    ),
    prometheus_port: Optional[int] = typer.Option(
        None, help="Also serve GET /metrics on this port (off unless given)."
    ),
    otlp_endpoint: Optional[str] = typer.Option(
        None, envvar="OTLP_ENDPOINT", help="Export OpenTelemetry traces over OTLP/gRPC to this endpoint."
    ),
    otlp_service_name: str = typer.Option(
        "text-generation-inference.router", envvar="OTLP_SERVICE_NAME", help="service.name of the exported traces."
    ),
    graceful_termination_timeout: float = typer.Option(60.0, help="Seconds in-flight requests get at shutdown."),
    json_output: bool = typer.Option(False, help="One JSON log record per line."),
    logger_level: str = typer.Option("INFO"),
) -> None:
    """Router of the InternLM2 inference server (TGI-compatible APIs)."""
    setup_logging(json_output, logger_level)
    options = dict(locals())
    try:
        code = asyncio.run(run(options))
    except StartupError as e:
        logger.error(f"start-up failed: {e}")
        raise typer.Exit(1)
    raise typer.Exit(code)


async def connect_and_warm(o: dict):
    """Client, Info, limits and the KV cache size after Warmup (raises StartupError with a clear message)."""
    from text_generation_router.client import ShardedClient
    from text_generation_router.types import RouterLimits, ShardInfo

    try:
        client = await ShardedClient.connect(o["master_shard_uds_path"])
        await client.clear_cache()
        info = await client.info()
    except Exception as e:  # noqa: BLE001
        raise StartupError(str(e)) from None

    mpe = info.max_position_embeddings
    user_total, user_input = o["max_total_tokens"], o["max_input_tokens"]
    user_prefill, user_batch_total = o["max_batch_prefill_tokens"], o["max_batch_total_tokens"]
    if user_input is not None and user_total is not None and not user_input < user_total:
        raise StartupError(f"--max-input-tokens ({user_input}) must be < --max-total-tokens ({user_total})")
    # what Warmup is asked for: the user's limits, else the model's
    warm_total = user_total if user_total is not None else (user_input + 1 if user_input is not None else mpe)
    if user_batch_total is not None and user_total is None:
        warm_total = min(warm_total, user_batch_total)
    warm_input = user_input if user_input is not None else warm_total - 1
    default_prefill = default_max_batch_prefill_tokens(info.device_type)
    warm_prefill = user_prefill if user_prefill is not None else default_prefill
    if warm_input < 1:
        raise StartupError(f"max_total_tokens ({warm_total}) leaves no room for a prompt")
    if warm_prefill < 1:
        raise StartupError(f"--max-batch-prefill-tokens must be >= 1, got {warm_prefill}")
    try:
        warm = await client.warmup(warm_input, warm_prefill, warm_total)
    except Exception as e:  # noqa: BLE001
        raise StartupError(f"Warmup failed: {e}") from None

    block_size = warm.block_size or info.block_size
    num_blocks = warm.num_blocks
    if user_batch_total is not None:
        if user_batch_total < block_size:
            raise StartupError(f"--max-batch-total-tokens ({user_batch_total}) is less than one block ({block_size})")
        num_blocks = min(num_blocks, user_batch_total // block_size)
    capacity = num_blocks * block_size
    total = user_total if user_total is not None else min(mpe, capacity)
    if user_total is None and user_input is not None:
        total = max(min(total, capacity), user_input + 1)
    max_input = user_input if user_input is not None else total - 1
    prefill = user_prefill if user_prefill is not None else min(default_prefill, capacity)

    # TGI's start-up constraints (with chunked prefill: the step budget need not hold a whole prompt)
    if not max_input < total:
        raise StartupError(f"max_input_tokens ({max_input}) must be < max_total_tokens ({total})")
    if prefill > capacity:
        raise StartupError(
            f"max_batch_prefill_tokens ({prefill}) must be <= max_batch_total_tokens ({capacity}, the KV capacity)"
        )
    if total > capacity:
        raise StartupError(
            f"max_total_tokens ({total}) must be <= max_batch_total_tokens ({capacity}): not enough KV cache "
            f"({num_blocks} blocks of {block_size} tokens) for one request"
        )
    if max_input < 1:
        raise StartupError(f"max_input_tokens must be >= 1, got {max_input}")

    limits = RouterLimits(
        max_concurrent_requests=o["max_concurrent_requests"],
        max_best_of=o["max_best_of"],
        max_stop_sequences=o["max_stop_sequences"],
        max_top_n_tokens=o["max_top_n_tokens"],
        max_input_tokens=max_input,
        max_total_tokens=total,
        max_batch_prefill_tokens=prefill,
        max_batch_total_tokens=capacity,
        prefix_caching=o["prefix_caching"],
        waiting_served_ratio=o["waiting_served_ratio"],
        max_waiting_tokens=o["max_waiting_tokens"],
        max_client_batch_size=o["max_client_batch_size"],
        grammar_support=not o["disable_grammar_support"],
    )
    shard = ShardInfo(
        model_id=info.model_id,
        architecture=info.architecture,
        dtype=info.dtype,
        device_type=info.device_type,
        block_size=block_size,
        world_size=client.world_size,
        vocab_size=info.vocab_size,
        max_position_embeddings=mpe,
        eos_token_ids=tuple(info.eos_token_ids),
        num_blocks=num_blocks,
        dynamic_rope=info.dynamic_rope,
        kernels=info.kernels,
    )
    return client, info, limits, shard


def build_state(client, limits, shard, tokenizer, model_id: str, features=(), tracer=None):
    """BlockManager, Scheduler, Infer, Validation and RouterState (the step loop is not started)."""
    from text_generation_router.block_manager import BlockManager
    from text_generation_router.infer import Infer
    from text_generation_router.scheduler import Scheduler, SchedulerConfig
    from text_generation_router.types import RouterState
    from text_generation_router.validation import Validation

    scheduler = Scheduler(
        BlockManager(shard.num_blocks, shard.block_size, prefix_caching=limits.prefix_caching),
        tokenizer,
        SchedulerConfig(
            max_batch_tokens=limits.max_batch_prefill_tokens,
            prefix_caching=limits.prefix_caching,
            dynamic_rope_limit=shard.max_position_embeddings if shard.dynamic_rope else None,
        ),
    )
    infer = Infer(scheduler, client, limits.max_concurrent_requests, tracer)
    return RouterState(
        infer=infer,
        validation=Validation(tokenizer, limits, shard.eos_token_ids),
        tokenizer=tokenizer,
        limits=limits,
        shard=shard,
        model_id=model_id,
        features=tuple(features),
    )


IDLE_CONNECTION_TIMEOUT_S = 5  # uvicorn's keep-alive timeout, applied from the moment a connection opens


class _Uvicorn:
    """uvicorn.Server without its own signal handling (the router handles SIGTERM/SIGINT itself), whose
    connections are closed when they stay idle for IDLE_CONNECTION_TIMEOUT_S seconds, before their first request
    as well as between requests: a client that opens connections and sends nothing (slowloris) does not keep
    them. uvicorn alone closes idle connections only between requests."""

    @staticmethod
    def make(app_, host: str, port: int, graceful: float, json_output: bool):
        import uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        class IdleClosingH11Protocol(H11Protocol):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                # the keep-alive timer, cancelled by the first bytes received as it is between requests
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

        config = uvicorn.Config(
            # a backstop: in-flight requests are ended with an error by the router at `graceful` already
            app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(graceful) + 3,
            access_log=False, http=IdleClosingH11Protocol, timeout_keep_alive=IDLE_CONNECTION_TIMEOUT_S,
        )
        return Server(config)


def load_tokenizer(o: dict, vocab_size: int):
    """The tokenizer of --tokenizer-name, with --chat-template's template instead of its own if given; a
    template that does not compile stops the start-up with its error."""
    from text_generation_common.tokenizer import Tokenizer
    from text_generation_router.chat import TemplateError, check_template

    tokenizer_dir = Path(o["tokenizer_name"])
    template = None
    if o["chat_template"] is not None:
        try:
            template = Path(o["chat_template"]).read_text(encoding="utf-8")
        except OSError as e:
            raise StartupError(f"cannot read --chat-template {o['chat_template']}: {e}") from None
    try:
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir, vocab_size=vocab_size, chat_template=template)
    except Exception as e:  # noqa: BLE001
        raise StartupError(f"cannot load the tokenizer from {tokenizer_dir}: {e}") from None
    if tokenizer.chat_template:
        try:
            check_template(tokenizer.chat_template)
        except TemplateError as e:
            source = o["chat_template"] or f"{tokenizer_dir}'s tokenizer config"
            if o["chat_template"] is not None:
                raise StartupError(f"the chat template of {source} does not compile: {e}") from None
            logger.warning(f"the chat template of {source} does not compile ({e}); chat requests will get 422")
    return tokenizer


async def start_http(app_, host: str, port: int, o: dict):
    """A uvicorn server for `app_`, started; (server, its serve task). Raises StartupError if it cannot bind."""
    server = _Uvicorn.make(app_, host, port, o["graceful_termination_timeout"], o["json_output"])
    failure = f"the HTTP server could not start on {host}:{port}"

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit as exit_:  # uvicorn logs why (a port in use, say), then exits the whole loop
            raise StartupError(failure) from exit_

    task = asyncio.create_task(serve())
    while not server.started:
        if task.done():
            await task
            raise StartupError(failure)
        await asyncio.sleep(0.02)
    return server, task


async def start_grpc(state, host: str, port: int):
    """The public gRPC API, started. Raises StartupError if it cannot bind."""
    from text_generation_router.grpc_api import serve_grpc

    try:
        return await serve_grpc(state, host, port)
    except RuntimeError as error:  # grpc's "Failed to bind to address ..."
        raise StartupError(f"the gRPC API could not start on {host}:{port}: {error}") from error


def metrics_app():
    """The app of --prometheus-port: GET /metrics only."""
    from fastapi import FastAPI

    from text_generation_router.api.tgi_routes import metrics_response

    app_ = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app_.get("/metrics")(metrics_response)
    return app_


async def run(o: dict) -> int:
    from text_generation_router.api import HttpOptions, create_app
    from text_generation_router.tracing import RequestTracer

    client, info, limits, shard = await connect_and_warm(o)
    tokenizer = load_tokenizer(o, info.vocab_size)
    tracer = RequestTracer(o["otlp_endpoint"], o["otlp_service_name"])
    model_id = o["model_id"] or str(o["tokenizer_name"])
    state = build_state(client, limits, shard, tokenizer, model_id, features=info.features, tracer=tracer)
    infer = state.infer
    infer.start()
    options = HttpOptions(
        api_key=o["api_key"], cors_allow_origins=tuple(o["cors_allow_origin"]), payload_limit=o["payload_limit"]
    )
    servers, grpc_server = [], None
    try:
        # the API's port opens last: the launcher calls the stack ready once it answers, so /metrics and the
        # gRPC API must be listening by then
        if o["prometheus_port"] is not None:
            servers.append(await start_http(metrics_app(), o["hostname"], o["prometheus_port"], o))
        grpc_server = await start_grpc(state, o["hostname"], o["grpc_port"]) if o["grpc_port"] else None
        servers.append(await start_http(create_app(state, options), o["hostname"], o["port"], o))
    except StartupError:
        for server, _ in servers:
            server.should_exit = True
        await asyncio.gather(*(task for _, task in servers))
        if grpc_server is not None:
            await grpc_server.stop(grace=None)
        await infer.stop()
        raise

    loop = asyncio.get_running_loop()
    timeout = o["graceful_termination_timeout"]
    draining: list[asyncio.Task] = []

    async def drain() -> None:
        """In-flight requests finish, or end with an error once the timeout is up; gRPC stops accepting now."""
        stopped = [grpc_server.stop(grace=timeout)] if grpc_server is not None else []
        if not await infer.wait_idle(timeout):
            logger.warning(f"in-flight requests did not finish within {timeout:g}s: ending them with an error")
        await infer.stop()
        await asyncio.gather(*stopped)

    def on_signal(sig: signal.Signals) -> None:
        if draining:
            logger.warning(f"received {sig.name} again: forcing exit")
            for server, _ in servers:
                server.force_exit = True
            return
        logger.info(f"received {sig.name}: stop accepting, finish in-flight requests (at most {timeout:g}s)")
        draining.append(loop.create_task(drain()))
        for server, _ in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    logger.info(
        f"router ready: http://{o['hostname']}:{o['port']}"
        + (f", gRPC {o['hostname']}:{o['grpc_port']}" if grpc_server is not None else "")
        + (f", metrics :{o['prometheus_port']}/metrics" if o["prometheus_port"] is not None else "")
        + f"; {shard.architecture} {shard.dtype} on {shard.device_type} × {shard.world_size}, "
        f"KV {shard.num_blocks} blocks × {shard.block_size} tokens, max_input_tokens {limits.max_input_tokens}, "
        f"max_total_tokens {limits.max_total_tokens}, max_batch_prefill_tokens {limits.max_batch_prefill_tokens}, "
        f"prefix caching {'on' if limits.prefix_caching else 'off'}, kernels {shard.kernels}"
        + (", API key required" if o["api_key"] else "")
    )

    # each returns once should_exit is set and its HTTP connections are done (bounded)
    await asyncio.gather(*(task for _, task in servers))
    if not draining:  # the HTTP server ended without a signal
        draining.append(loop.create_task(drain()))
    await draining[0]
    tracer.shutdown()
    with contextlib.suppress(Exception):
        await client.close()
    logger.info("router stopped")
    return 0


if __name__ == "__main__":
    app()
