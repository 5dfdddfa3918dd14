"""One rank of a tensor-parallel run (started by test_tensor_parallel.py with RANK/WORLD_SIZE set).

Usage: python tp_worker.py MODEL_DIR OUT_FILE. Rank 0 saves the prefill logits and greedy tokens to OUT_FILE.
"""

from __future__ import annotations

import sys

import torch
from helpers import BlockAllocator, make_request

from text_generation_server.models import get_model
from text_generation_server.models.flash_causal_lm import FlashCausalLMBatch
from text_generation_server.utils.dist import initialize_distributed, shutdown_distributed

PROMPT_LENGTHS = (3, 11, 25, 40)


def main(model_dir: str, out_file: str) -> None:
    device = torch.device("cpu")
    tp = initialize_distributed(device)
    model = get_model(model_dir, dtype="float32", device=device, tp=tp)
    model.allocate_kv_cache(64, 16)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 990, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]

    allocator = BlockAllocator(64, 16)
    requests = [make_request(allocator, i, p, max_new_tokens=10) for i, p in enumerate(prompts)]
    logits = model.forward(FlashCausalLMBatch.from_requests(0, requests, model), every_position=True)

    tokens = {r.id: [] for r in requests}
    batch = FlashCausalLMBatch.from_requests(1, requests, model)
    while batch is not None:
        generations, batch = model.generate_token(batch)
        for g in generations:
            tokens[g.request_id].extend(g.tokens.ids)
    if tp.rank == 0:
        torch.save({"logits": logits, "tokens": tokens, "kv_heads": model.num_kv_heads}, out_file)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
