"""An earlier commit of this project measured in the same run: "did anything get slower?".

The commit is checked out as a git worktree, its gRPC stubs generated with this environment's tools, and its
own benchmark runs (in-process engine and served stack, no baseline, no features) with its packages ahead of
ours on PYTHONPATH, so its launcher, router and shards are that commit's code. Same model files (the same model
cache), same prompts (same seed and workloads), same machine, minutes apart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .workloads import REPO_ROOT

PACKAGE_DIRS = ("server", "router", "launcher", "common")

# (workload, engine, metric, higher is better)
COMPARED = (
    ("decode_b1", "ours_engine", "decode_tok_s", True),
    ("decode_b1", "ours_served", "decode_tok_s", True),
    ("prefill", "ours_engine", "prefill_tok_s", True),
    ("prefill", "ours_served", "prefill_tok_s", True),
    ("decode_step", "ours_engine", "step_ms", False),
    ("decode_step", "ours_served", "step_ms", False),
)


def run_commit(rev: str, benchmark_args: list[str], out: Path, log) -> dict:
    """results.json of commit `rev`'s benchmark run with `benchmark_args` (written under `out`)."""
    out = out.resolve()  # that benchmark runs in the worktree
    sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    worktree = Path(tempfile.mkdtemp(prefix="tgi-bench-commit-"))
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(worktree), sha],
                   check=True, capture_output=True)
    try:
        venv = Path(sys.executable).parent.parent
        subprocess.run(["make", "-C", str(worktree), "stubs", f"VENV={venv}"], check=True, capture_output=True)
        path = [str(worktree / d) for d in PACKAGE_DIRS if (worktree / d).is_dir()]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        out.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "text_generation_launcher.benchmark.cli", *benchmark_args, "--out", str(out)]
        log(f"commit {sha[:10]}: its own benchmark, {' '.join(benchmark_args)}")
        with open(out / "benchmark.log", "w") as log_file:
            done = subprocess.run(argv, cwd=worktree, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"commit {sha[:10]}'s benchmark failed ({done.returncode}); see {out / 'benchmark.log'}")
        results = json.loads((out / "results.json").read_text())
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(worktree)],
                       capture_output=True)
        shutil.rmtree(worktree, ignore_errors=True)
    return {"commit": sha, "workloads": results["workloads"]}


def ratios(current: dict, earlier: dict) -> list[dict]:
    """Each workload of both runs: now / then for rates, then / now for times (> 1: faster now)."""
    rows = []
    now_w, then_w = current["workloads"], earlier["workloads"]
    pairs = list(COMPARED)
    for level in sorted(set(now_w.get("mixed", {})) & set(then_w.get("mixed", {})), key=int):
        pairs.append((f"mixed/{level}", "ours_served", "throughput_tok_s", True))
    for workload, who, key, higher in pairs:
        now = _lookup(now_w, workload, who, key)
        then = _lookup(then_w, workload, who, key)
        if now is None or then is None:
            continue
        rows.append({"workload": workload, "engine": who, "metric": key, "now": now, "then": then,
                     "speedup": now / then if higher else then / now})
    return rows


def _lookup(workloads: dict, workload: str, who: str, key: str):
    entry = workloads
    for part in workload.split("/"):
        entry = entry.get(part, {})
    return entry.get(who, {}).get(key)
