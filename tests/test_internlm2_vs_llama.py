"""Our native InternLM2 against transformers' LlamaForCausalLM on the same weights converted to Llama layout.

The conversion used here (tests/helpers.py) selects wqkv rows from the layout formula with index lists, a
different code path from the engine's reshape, so a layout mistake on either side shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from helpers import BlockAllocator, internlm2_to_llama, make_request
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from text_generation_server.models import get_model
from text_generation_server.models.flash_causal_lm import FlashCausalLMBatch
from text_generation_server.models.flash_llama import FlashLlama

BLOCK_SIZE = 16
NUM_BLOCKS = 256

SHAPES = {
    # name: (make_tiny_internlm2 kwargs, prompt lengths)
    "gqa-6h-2kv": (dict(hidden=96, heads=6, kv_heads=2), None),
    "mha": (dict(hidden=64, heads=4, kv_heads=4), None),
    "single-kv": (dict(hidden=64, heads=4, kv_heads=1), None),
    "bias": (dict(hidden=64, heads=4, kv_heads=2, bias=True), None),
    "dynamic-ntk": (dict(hidden=64, heads=4, kv_heads=2, max_pos=48, rope_scaling={"type": "dynamic", "factor": 2.0}), None),
    "linear-rope": (dict(hidden=64, heads=4, kv_heads=2, rope_scaling={"type": "linear", "factor": 2.0}), None),
    "bin-sharded": (dict(hidden=64, heads=4, kv_heads=2, format="bin", shards=3), None),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    """(our engine on the InternLM2 checkpoint, transformers' Llama on its conversion, checkpoint config kwargs)."""
    kwargs, _ = SHAPES[request.param]
    src = make_tiny(tmp_path_factory, f"ref-{request.param}", layers=2, intermediate=128, vocab=1000, **kwargs)
    dst = internlm2_to_llama(src, tmp_path_factory.mktemp(f"llama-{request.param}"))
    ours = get_model(src, dtype="float32", device="cpu")
    ours.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    reference = LlamaForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    return ours, reference, request.param, dst


def prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 6, (n,), generator=generator).tolist() for n in lengths]


def prompt_lengths(name: str) -> list[int]:
    if name == "dynamic-ntk":  # max_position_embeddings 48: below, at and beyond it
        return [5, 30, 48, 60, 75, 90, 41, 100]
    return [1, 3, 7, 12, 20, 33, 50, 64]


def reset_dynamic_rope(reference: LlamaForCausalLM) -> None:
    """transformers keeps an enlarged dynamic-NTK base between calls; start each prompt from a fresh rotary."""
    reference.model.rotary_emb = LlamaRotaryEmbedding(reference.config)


def test_prefill_logits_match(pair):
    ours, reference, name, _ = pair
    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    batch_prompts = prompts(ours.config.vocab_size, prompt_lengths(name))
    requests = [make_request(allocator, i, p, max_new_tokens=1) for i, p in enumerate(batch_prompts)]
    batch = FlashCausalLMBatch.from_requests(0, requests, ours)
    logits = ours.forward(batch, every_position=True)  # all prompts packed in one forward
    start = 0
    for prompt in batch_prompts:
        reset_dynamic_rope(reference)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        got = logits[start : start + len(prompt)]
        start += len(prompt)
        assert expected.std() > 0.5, "logits too flat for a meaningful greedy comparison"
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_tokens_match(pair):
    ours, reference, name, _ = pair
    new_tokens = 12
    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    batch_prompts = prompts(ours.config.vocab_size, prompt_lengths(name), seed=1)
    requests = [make_request(allocator, i, p, max_new_tokens=new_tokens) for i, p in enumerate(batch_prompts)]
    batch = FlashCausalLMBatch.from_requests(0, requests, ours)
    produced = {r.id: [] for r in requests}
    while batch is not None:
        generations, batch = ours.generate_token(batch)
        for g in generations:
            produced[g.request_id].extend(g.tokens.ids)
    for request, prompt in zip(requests, batch_prompts):
        reset_dynamic_rope(reference)
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert produced[request.id] == expected, f"prompt of {len(prompt)} tokens"


def test_flash_llama_serves_the_converted_checkpoint(pair):
    """The Llama route: our FlashLlama on the converted directory gives transformers' logits too."""
    ours, reference, name, llama_dir = pair
    llama = get_model(llama_dir, dtype="float32", device="cpu")
    assert type(llama) is FlashLlama
    llama.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    batch_prompts = prompts(ours.config.vocab_size, prompt_lengths(name)[-3:], seed=2)
    batch = FlashCausalLMBatch.from_requests(
        0, [make_request(allocator, i, p) for i, p in enumerate(batch_prompts)], llama
    )
    logits = llama.forward(batch)  # last token of each prompt
    for row, prompt in zip(logits, batch_prompts):
        reset_dynamic_rope(reference)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(row, expected, atol=1e-4, rtol=0)


def test_flash_llama_on_a_transformers_saved_tied_checkpoint(tiny_internlm2_dir, tmp_path):
    """A checkpoint written by transformers itself (save_pretrained), with a tied head and no lm_head tensor."""
    import shutil

    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.5,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_internlm2_dir / name, tmp_path / name)
    llama = get_model(tmp_path, dtype="float32", device="cpu")
    llama.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    prompt = prompts(1000, [17])[0]
    batch = FlashCausalLMBatch.from_requests(0, [make_request(BlockAllocator(NUM_BLOCKS, BLOCK_SIZE), 0, prompt)], llama)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(llama.forward(batch, every_position=True), expected, atol=1e-4, rtol=0)
