"""The baseline: transformers `generate` on the same weights in Llama layout, in this process.

Batch 1 for the decode and prefill workloads; static batches of `concurrency` consecutive requests for the mixed
workload, padded as transformers does it (left padding, attention mask) and generating the batch's largest
max_new_tokens (a request's tokens past its own budget are wasted work and are not counted).

Timing: a StoppingCriteria that never stops records `time.perf_counter()` each time generate has produced a
token for the whole batch. The first record is the batch's first new token (prefill + first choice): the TTFT
of every request of the batch, measured from the batch's start (all its requests are taken as submitted then).
The gaps between records are the inter-token latencies; a request contributes the gaps of its own tokens.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from .stats import latency_summary, median
from .workloads import Prompt, PromptSet, Workloads


class _StepClock:
    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Baseline:
    name = "transformers"

    def __init__(self, llama_dir: Path, dtype: str, threads: int):
        import torch
        import transformers
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=getattr(torch, dtype)).eval()
        config = self.model.generation_config
        config.eos_token_id = None  # EOS ignored (its logit is 0 anyway: see workloads._unreachable_eos)
        config.pad_token_id = 0
        config.do_sample = False
        self.info = {"engine": f"transformers {transformers.__version__} generate", "dtype": dtype, "threads": threads}

    def close(self) -> None:
        self.model = None
        gc.collect()

    def generate(self, prompts: list[Prompt], max_new_tokens: int) -> tuple[float, float, list[float]]:
        """One static batch: (start, end, step times)."""
        from transformers import StoppingCriteriaList

        torch = self.torch
        width = max(len(p.ids) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding
            ids[row, width - len(p.ids):] = torch.tensor(p.ids)
            mask[row, width - len(p.ids):] = 1
        clock = _StepClock()
        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
            )
            end = time.perf_counter()
        return start, end, clock.times

    def warmup(self, prompts: PromptSet, workloads: Workloads) -> None:
        short = Prompt(prompts.decode.text, prompts.decode.ids[:16], 4)
        self.generate([short], 4)
        for c in workloads.concurrency:
            if c > 1:
                self.generate([short] * c, 2)

    # ----------------------------------------------------------------------------------------- workloads

    def decode(self, prompt: Prompt, repeats: int) -> dict:
        runs = []
        for _ in range(repeats):
            start, end, times = self.generate([prompt], prompt.max_new_tokens)
            n = len(times)
            runs.append({"decode_tok_s": (n - 1) / (times[-1] - times[0]), "e2e_tok_s": n / (end - start),
                         "ttft_ms": (times[0] - start) * 1000})
        return _median_runs(runs, prompt_tokens=len(prompt.ids), new_tokens=prompt.max_new_tokens, repeats=repeats)

    def prefill(self, prompt: Prompt, repeats: int) -> dict:
        runs = []
        for _ in range(repeats):
            start, _, times = self.generate([prompt], 1)
            runs.append({"prefill_tok_s": len(prompt.ids) / (times[0] - start), "ttft_ms": (times[0] - start) * 1000})
        return _median_runs(runs, prompt_tokens=len(prompt.ids), repeats=repeats)

    def mixed(self, prompts: list[Prompt], concurrency: int) -> dict:
        ttfts, gaps, tokens, padded = [], [], 0, 0
        wall_start = time.perf_counter()
        for first in range(0, len(prompts), concurrency):
            batch = prompts[first:first + concurrency]
            steps = max(p.max_new_tokens for p in batch)
            start, _, times = self.generate(batch, steps)
            padded += steps * len(batch)
            for p in batch:
                n = min(p.max_new_tokens, len(times))
                tokens += n
                ttfts.append(times[0] - start)
                gaps.extend(times[i] - times[i - 1] for i in range(1, n))
        wall = time.perf_counter() - wall_start
        result = latency_summary(ttfts, gaps, tokens, wall)
        result.update(concurrency=concurrency, mode=f"static batches of {concurrency}", computed_tokens=padded)
        return result


def _median_runs(runs: list[dict], **extra) -> dict:
    out = {key: median(r[key] for r in runs) for key in runs[0]}
    out.update(extra)
    return out
