"""`text-generation-server`: the shard's command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from loguru import logger

from text_generation_server.device import DEVICE_KINDS, DTYPES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Model shard of the InternLM2 inference server.")


@app.callback()
def main() -> None:
    """Model shard of the InternLM2 inference server."""


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="Hugging Face model directory (config.json, weights, tokenizer)."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(32, min=1, help="Tokens to generate at most."),
    dtype: str = typer.Option(None, help=f"One of {', '.join(DTYPES)}; default float32 on CPU, bfloat16 elsewhere."),
    device: str = typer.Option("auto", help=f"One of {', '.join(DEVICE_KINDS)}."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (1.0 with no --do-sample: greedy)."),
    do_sample: bool = typer.Option(False, help="Sample instead of taking the most likely token."),
    seed: int = typer.Option(0, help="Seed of the sampler."),
) -> None:
    """Generate from PROMPT in this process and stream the text to stdout (no server involved)."""
    from text_generation_server.models import get_model
    from text_generation_server.models.flash_causal_lm import FlashCausalLMBatch
    from text_generation_server.models.types import Request, SamplingParameters, StoppingParameters

    try:
        model = get_model(model_dir, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as e:
        logger.error(str(e))
        raise typer.Exit(1) from e
    input_ids = model.tokenizer.encode(prompt)
    block_size = 16
    tokens = len(input_ids) + max_new_tokens
    blocks = tuple(range(-(-tokens // block_size)))
    model.allocate_kv_cache(len(blocks), block_size)
    request = Request(
        id=0,
        input_ids=tuple(input_ids),
        blocks=blocks,
        slots=tuple(range(tokens)),
        parameters=SamplingParameters(temperature=temperature, do_sample=do_sample, seed=seed),
        stopping=StoppingParameters(max_new_tokens=max_new_tokens),
    )
    batch = FlashCausalLMBatch.from_requests(0, [request], model)
    while batch is not None:
        generations, batch = model.generate_token(batch)
        sys.stdout.write(generations[0].tokens.texts[0])
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    app()
