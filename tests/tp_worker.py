"""One rank of a tensor-parallel run (started by test_tensor_parallel.py with RANK/WORLD_SIZE set).

Usage: python tp_worker.py MODEL_DIR OUT_FILE [KERNELS]. Rank 0 saves the prompts' logits and greedy tokens (prompts in chunks) to OUT_FILE.
"""

from __future__ import annotations

import sys

import torch
from helpers import greedy_tokens, prompt_logits

from text_generation_server.models import get_model
from text_generation_server.utils.dist import initialize_distributed, shutdown_distributed

PROMPT_LENGTHS = (3, 11, 25, 40)


def main(model_dir: str, out_file: str, kernels: str = "auto") -> None:
    device = torch.device("cpu")
    tp = initialize_distributed(device)
    model = get_model(model_dir, dtype="float32", device=device, tp=tp, kernels=kernels)
    model.allocate_kv_cache(1024 // model.block_size)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 990, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]

    logits = torch.cat([prompt_logits(model, p, chunk_size=7) for p in prompts])
    tokens = dict(enumerate(greedy_tokens(model, prompts, 10, chunk_size=9)))
    if tp.rank == 0:
        torch.save({"logits": logits, "tokens": tokens, "kv_heads": model.num_kv_heads}, out_file)
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
