"""llama.cpp's engine alone: batch-1 greedy decode through llama-cpp-python, timed like our in-process engine.

Runs in llama-cpp-python's own environment (not ours: nothing of this project is imported):

    python llama_cpp_decode.py MODEL.gguf '[1, 2, ...]' NEW_TOKENS THREADS REPEATS

and prints one JSON line: decode tokens/s (the gaps between the first and the last new token), the time to the
first token and end-to-end tokens/s, medians over REPEATS runs. `Llama.generate` evaluates the prompt, then one
token per step, and never stops by itself, so every run decodes exactly NEW_TOKENS tokens.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def decode_once(llm, ids: list[int], new_tokens: int) -> dict:
    start = time.perf_counter()
    times = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter())
        if len(times) == new_tokens:
            break
    return {
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
        "e2e_tok_s": len(times) / (times[-1] - start),
        "ttft_ms": (times[0] - start) * 1000,
    }


def main() -> None:
    from llama_cpp import Llama, __version__

    gguf, ids, new_tokens, threads, repeats = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
    llm = Llama(model_path=gguf, n_ctx=len(ids) + new_tokens + 8, n_batch=512, n_threads=threads,
                n_threads_batch=threads, use_mmap=False, verbose=False)
    decode_once(llm, ids[:16], 4)  # warm-up
    runs = [decode_once(llm, ids, new_tokens) for _ in range(repeats)]
    out = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    out.update(engine=f"llama-cpp-python {__version__}", prompt_tokens=len(ids), new_tokens=new_tokens,
               repeats=repeats, threads=threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
