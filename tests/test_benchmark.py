"""`text-generation-benchmark --smoke`: the whole benchmark on a tiny model, as a subprocess.

Benchmarks are not tests: nothing here looks at a timing. The smoke run checks that every phase ran (our
engine in-process, our served stack, transformers, the feature workloads on and off), that results.json holds
every workload for ours and the baseline, and that the ratios and targets were computed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(sys.executable).with_name("text-generation-benchmark")


def test_smoke_run_writes_every_workload_and_ratio(tmp_path):
    out = tmp_path / "bench"
    argv = [str(BENCHMARK)] if BENCHMARK.exists() else [
        sys.executable, "-c", "from text_generation_launcher.benchmark.cli import app; app()"
    ]
    proc = subprocess.run(
        [*argv, "--smoke", "--out", str(out), "--model-cache", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-8000:]}"
    results = json.loads((out / "results.json").read_text())
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

    assert len(results["targets"]) == 5 and all(t["value"] is not None for t in results["targets"])
    assert "Targets" in proc.stdout and "results.json" in proc.stdout
