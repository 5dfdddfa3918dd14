"""`text-generation-benchmark`: our server and transformers on the same random-weight model, in one run.

Phases run one after another (never two engines at once): transformers `generate` (the baseline, Llama layout),
our engine in-process, the served stack (text-generation-launcher) driven over HTTP, then the engine's features
each on and off (prefix caching, chunked prefill) and a long-context prompt. Writes OUT/results.json and
OUT/plot.png (with matplotlib, the `bench` extra) and prints a table of ratios measured in the same run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import typer

from . import report
from .features import SMOKE_FEATURES, FeatureWorkloads
from .workloads import PRESETS, SMOKE_WORKLOADS, Workloads, cpu_count, make_prompts, prepare_models

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "internlm2-tgi-bench"


@app.command()
def main(
    preset: str = typer.Option("small", help="Model shape: small (hidden 768, 12 layers) or 1_8b (internlm2-chat-1_8b)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16, for every engine."),
    out: Path = typer.Option(Path("bench-results"), help="Directory for results.json, plot.png and logs."),
    concurrency: str = typer.Option(None, help="Concurrent streams of the mixed workload, comma-separated (default 1,8,32)."),
    requests: int = typer.Option(None, help="Requests per concurrency level (default 32; at least the concurrency)."),
    seed: int = typer.Option(0, help="Seed of the prompts and output lengths."),
    skip_baseline: bool = typer.Option(False, help="Do not run transformers."),
    skip_served: bool = typer.Option(False, help="Do not start the served stack (in-process engine only)."),
    skip_engine: bool = typer.Option(False, help="Do not run the in-process engine."),
    skip_features: bool = typer.Option(False, help="Do not run the feature workloads (prefix cache, chunking, long)."),
    only_features: bool = typer.Option(False, help="Run only the feature workloads."),
    repeats: int = typer.Option(None, help="Runs of the decode workload (median); default 2, prefill 3."),
    profile: bool = typer.Option(False, help="Also write torch.profiler tables of the in-process decode step (OUT/profile)."),
    model_cache: Path = typer.Option(None, help="Where the random-weight models are written once (default ~/.cache/internlm2-tgi-bench)."),
    smoke: bool = typer.Option(False, help="Tiny model (hidden 64, 2 layers, vocab 1000), a few tokens, concurrency 1,2."),
) -> None:
    if preset not in ("small", "1_8b"):
        raise typer.BadParameter("--preset must be small or 1_8b")
    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter("--dtype must be float32 or bfloat16")
    model_preset = "smoke" if smoke else preset
    workloads = SMOKE_WORKLOADS if smoke else Workloads()
    features = SMOKE_FEATURES if smoke else FeatureWorkloads()
    if only_features:
        skip_baseline = skip_engine = skip_served = True
    if concurrency:
        workloads = dataclasses.replace(workloads, concurrency=tuple(int(c) for c in concurrency.split(",") if c.strip()))
    if requests is not None:
        workloads = dataclasses.replace(workloads, requests=requests)
    workloads = dataclasses.replace(workloads, requests=max(workloads.requests, max(workloads.concurrency)))
    decode_repeats = repeats or (1 if smoke else 2)
    prefill_repeats = repeats or workloads.prefill_repeats
    threads = cpu_count()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    internlm2_dir, llama_dir = prepare_models(model_preset, dtype, model_cache or _default_cache(), log=_log)
    prompts = make_prompts(internlm2_dir, workloads, seed)
    results: dict = {
        "meta": {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "preset": model_preset, "dtype": dtype, "model_shape": PRESETS[model_preset],
            "model_dir": str(internlm2_dir), "baseline_model_dir": str(llama_dir),
            "threads": threads, "machine": platform.machine(), "python": platform.python_version(),
            "workloads": prompts.meta,
            "mixed_prompt_tokens": [len(p.ids) for p in prompts.mixed],
            "mixed_new_tokens": [p.max_new_tokens for p in prompts.mixed],
        },
        "engines": {},
        "features": {},
        "workloads": {"decode_b1": {}, "prefill": {}, "mixed": {str(c): {} for c in workloads.concurrency},
                      "decode_step": {}},
    }
    w = results["workloads"]

    def mixed_prompts(c: int):
        return prompts.mixed[: max(workloads.requests, c)]

    if not skip_baseline:
        from .baseline import Baseline

        _log(f"baseline: transformers generate, {model_preset} {dtype}, {threads} threads")
        base = Baseline(llama_dir, dtype, threads)
        results["engines"]["baseline"] = base.info
        base.warmup(prompts, workloads)
        w["decode_b1"]["baseline"] = base.decode(prompts.decode, decode_repeats)
        _log(f"  decode b1: {w['decode_b1']['baseline']['decode_tok_s']:.1f} tok/s")
        w["prefill"]["baseline"] = base.prefill(prompts.prefill, prefill_repeats)
        for c in workloads.concurrency:
            w["mixed"][str(c)]["baseline"] = base.mixed(mixed_prompts(c), c)
            _log(f"  mixed c={c}: {w['mixed'][str(c)]['baseline']['throughput_tok_s']:.1f} tok/s")
        base.close()
        del base

    if not skip_engine:
        from .engine import Engine

        _log(f"ours in-process: {model_preset} {dtype}, {threads} threads")
        engine = Engine(internlm2_dir, dtype, threads, workloads)
        results["engines"]["ours_engine"] = engine.info
        engine.warmup(prompts, workloads)
        w["decode_b1"]["ours_engine"] = engine.decode(prompts.decode, decode_repeats)
        _log(f"  decode b1: {w['decode_b1']['ours_engine']['decode_tok_s']:.1f} tok/s")
        w["prefill"]["ours_engine"] = engine.prefill(prompts.prefill, prefill_repeats)
        w["decode_step"]["ours_engine"] = engine.decode_step(prompts.step)
        _log(f"  decode step x{workloads.step_streams}: {w['decode_step']['ours_engine']['step_ms']:.2f} ms")
        if profile:
            engine.decode_step([prompts.decode], profile_dir=out / "profile", label="b1")
            engine.decode_step(prompts.step, profile_dir=out / "profile", label=f"b{workloads.step_streams}")
            _log(f"  profiles in {out / 'profile'}")
        engine.close()
        del engine

    if not skip_served:
        from .served import ServedStack

        _log("ours served: starting text-generation-launcher")
        stack = ServedStack.for_workloads(internlm2_dir, dtype, workloads, out / "launcher.log")
        try:
            results["engines"]["ours_served"] = stack.info
            stack.warmup(prompts, workloads)
            w["decode_b1"]["ours_served"] = stack.decode(prompts.decode, decode_repeats)
            _log(f"  decode b1: {w['decode_b1']['ours_served']['decode_tok_s']:.1f} tok/s")
            w["prefill"]["ours_served"] = stack.prefill(prompts.prefill, prefill_repeats)
            w["decode_step"]["ours_served"] = stack.decode_step(prompts.step)
            _log(f"  decode step x{workloads.step_streams}: {w['decode_step']['ours_served']['step_ms']:.2f} ms")
            for c in workloads.concurrency:
                w["mixed"][str(c)]["ours_served"] = stack.mixed(mixed_prompts(c), c)
                _log(f"  mixed c={c}: {w['mixed'][str(c)]['ours_served']['throughput_tok_s']:.1f} tok/s")
        finally:
            stack.close()

    if not skip_features:
        run_features(results["features"], internlm2_dir, dtype, features, model_cache or _default_cache(), out)

    report.add_ratios(results)
    results["meta"]["wall_s"] = time.perf_counter() - started
    json_path = report.write_json(results, out)
    print(report.table(results))
    print(f"JSON: {json_path}")
    png = report.plot(results, out)
    print(f"plot: {png}" if png else "plot: not drawn (matplotlib is missing: pip install 'internlm2-tgi[bench]')")


def run_features(into: dict, model_dir: Path, dtype: str, w: FeatureWorkloads, model_cache: Path, out: Path) -> None:
    from . import features

    into["workloads"] = dataclasses.asdict(w)
    into["prefix_cache"] = features.prefix_cache(model_dir, dtype, w, out, _log)
    into["chunked_prefill"] = features.chunked_prefill(model_dir, dtype, w, out, _log)
    long_dir, _ = prepare_models(w.long_context_preset, dtype, model_cache, log=_log)
    into["long_context"] = features.long_context(long_dir, dtype, w, out, _log)
    into["long_context"]["model_shape"] = PRESETS[w.long_context_preset]


if __name__ == "__main__":  # pragma: no cover
    app()
