"""The engine's batching, sampling, stopping and bookkeeping, on a tiny InternLM2."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import make_tiny
from helpers import BlockAllocator, make_request

from text_generation_server.layers.attention import KVCache
from text_generation_server.models import get_model
from text_generation_server.models.flash_causal_lm import FlashCausalLMBatch
from text_generation_server.models.flash_internlm2 import FlashInternlm2
from text_generation_server.models.types import FinishReason, SamplingParameters

BLOCK_SIZE = 16
NUM_BLOCKS = 512


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny(tmp_path_factory, "engine", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000)
    engine = get_model(path, dtype="float32", device="cpu")
    engine.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    return engine


def random_prompts(count: int, seed: int = 0, low: int = 2, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(3, 990, (n,), generator=g).tolist() for n in lengths]


def run_to_end(model, batch) -> dict[int, list]:
    """Step a batch until every request finished; generations by request id."""
    out: dict[int, list] = {r.id: [] for r in batch.requests}
    while batch is not None:
        generations, batch = model.generate_token(batch)
        for g in generations:
            out[g.request_id].append(g)
    return out


def tokens_of(generations) -> list[int]:
    return [t for g in generations for t in g.tokens.ids]


def alone(model, prompt, **kwargs) -> list:
    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    batch = FlashCausalLMBatch.from_requests(0, [make_request(allocator, 0, prompt, **kwargs)], model)
    return run_to_end(model, batch)[0]


def test_tokens_are_the_same_alone_and_in_a_changing_batch(model):
    """8 requests of different lengths join in three waves and leave at different steps (one is cancelled)."""
    prompts = random_prompts(8)
    budgets = [3, 9, 14, 6, 11, 2, 8, 12]
    params = [SamplingParameters()] * 6 + [SamplingParameters(do_sample=True, seed=7), SamplingParameters(top_k=5, seed=3)]
    expected = [
        tokens_of(alone(model, p, max_new_tokens=n, parameters=s)) for p, n, s in zip(prompts, budgets, params)
    ]

    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    requests = [
        make_request(allocator, i, p, max_new_tokens=n, parameters=s)
        for i, (p, n, s) in enumerate(zip(prompts, budgets, params))
    ]
    waves = {0: [0, 1, 2], 2: [3, 4], 5: [5, 6, 7]}  # step -> requests whose prefill joins the running batch
    cancelled_at = {7: 2}  # step -> request the client abandoned
    produced = {r.id: [] for r in requests}
    running = None
    for step in range(40):
        if step in waves:
            new = FlashCausalLMBatch.from_requests(step, [requests[i] for i in waves[step]], model)
            generations, new = model.generate_token(new)  # prefill, on its own
            for g in generations:
                produced[g.request_id].extend(g.tokens.ids)
            joining = [b for b in (running, new) if b is not None]
            running = FlashCausalLMBatch.concatenate(joining) if joining else None
        if step in cancelled_at and running is not None:
            running = running.filter([rid for rid in running.request_ids if rid != cancelled_at[step]])
        if running is None:
            continue
        generations, running = model.generate_token(running)
        for g in generations:
            produced[g.request_id].extend(g.tokens.ids)
    assert running is None
    for i, tokens in enumerate(expected):
        if i == cancelled_at[7]:
            assert produced[i] == tokens[: len(produced[i])] and len(produced[i]) < len(tokens)
        else:
            assert produced[i] == tokens, f"request {i}"


def test_seeded_sampling_is_reproducible(model):
    prompt = random_prompts(1, seed=5)[0]
    sampled = SamplingParameters(do_sample=True, temperature=1.5, seed=1234)
    first = tokens_of(alone(model, prompt, max_new_tokens=16, parameters=sampled))
    second = tokens_of(alone(model, prompt, max_new_tokens=16, parameters=sampled))
    other_seed = tokens_of(alone(model, prompt, max_new_tokens=16, parameters=SamplingParameters(do_sample=True, temperature=1.5, seed=99)))
    greedy = tokens_of(alone(model, prompt, max_new_tokens=16))
    assert first == second
    assert first != other_seed
    assert first != greedy
    top_k_one = tokens_of(alone(model, prompt, max_new_tokens=16, parameters=SamplingParameters(do_sample=True, top_k=1, seed=5)))
    assert top_k_one == greedy


def test_logprobs_top_n_and_prefill_tokens(model):
    prompt = random_prompts(1, seed=8)[0]
    generations = alone(model, prompt, max_new_tokens=4, top_n_tokens=3, prefill_logprobs=True)
    first = generations[0]
    assert first.prefill_tokens.ids == prompt
    assert math.isnan(first.prefill_tokens.logprobs[0])
    assert all(lp <= 0 for lp in first.prefill_tokens.logprobs[1:])
    for g in generations:
        assert g.prefill_tokens is None or g is first
        # greedy: the chosen token is the best alternative, with the same logprob
        assert g.top_tokens.ids[0] == g.tokens.ids[0]
        assert g.top_tokens.logprobs[0] == pytest.approx(g.tokens.logprobs[0])
        assert len(g.top_tokens.ids) == 3 and g.top_tokens.logprobs == sorted(g.top_tokens.logprobs, reverse=True)

    # the prompt logprobs are those of a plain forward
    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    batch = FlashCausalLMBatch.from_requests(0, [make_request(allocator, 0, prompt)], model)
    logprobs = torch.log_softmax(model.forward(batch, every_position=True), -1)
    expected = [logprobs[p, prompt[p + 1]].item() for p in range(len(prompt) - 1)]
    assert first.prefill_tokens.logprobs[1:] == pytest.approx(expected, abs=1e-5)


def test_stops_on_every_eos_id_and_reports_why(model):
    prompt = random_prompts(1, seed=11)[0]
    free_run = tokens_of(alone(model, prompt, max_new_tokens=10))
    eos_like = free_run[4]
    # the model's own generation_config lists [2, <|im_end|>]; make the 5th greedy token one of them
    assert model.tokenizer.token_to_id("<|im_end|>") in model.eos_token_ids and 2 in model.eos_token_ids
    original = model.eos_token_ids
    model.eos_token_ids = frozenset({eos_like})
    try:
        generations = alone(model, prompt, max_new_tokens=10, ignore_eos=False)
        ignored = alone(model, prompt, max_new_tokens=10, ignore_eos=True)
    finally:
        model.eos_token_ids = original
    assert tokens_of(generations) == free_run[: free_run.index(eos_like) + 1]
    assert generations[-1].generated_text.finish_reason == FinishReason.EOS_TOKEN
    assert ignored[-1].generated_text.finish_reason == FinishReason.LENGTH
    assert ignored[-1].generated_text.generated_tokens == 10


def test_stop_sequence_on_decoded_text(model):
    prompt = random_prompts(1, seed=12)[0]
    free_run = alone(model, prompt, max_new_tokens=12)
    text = "".join(g.tokens.texts[0] for g in free_run)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a printable stop sequence"
    generations = alone(model, prompt, max_new_tokens=12, stopping={"stop_sequences": (stop,)})
    streamed = "".join(g.tokens.texts[0] for g in generations)
    assert generations[-1].generated_text.finish_reason == FinishReason.STOP_SEQUENCE
    last_text = generations[-1].tokens.texts[0]
    assert stop in streamed and stop not in streamed[: len(streamed) - len(last_text)]
    assert streamed == text[: len(streamed)] and len(generations) < len(free_run)


def test_generated_text_and_seed(model):
    prompt = random_prompts(1, seed=13)[0]
    generations = alone(model, prompt, max_new_tokens=6)
    done = generations[-1].generated_text
    assert done.generated_tokens == 6 and done.finish_reason == FinishReason.LENGTH and done.seed is None
    assert done.text == model.tokenizer.decode(tokens_of(generations), skip_special_tokens=True)
    assert all(g.generated_text is None for g in generations[:-1])
    sampled = alone(model, prompt, max_new_tokens=2, parameters=SamplingParameters(do_sample=True, seed=42))
    assert sampled[-1].generated_text.seed == 42


def test_bad_requests_are_refused_with_the_value(model):
    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    good = make_request(allocator, 1, [5, 6, 7], max_new_tokens=4)
    with pytest.raises(ValueError, match="token id 1000"):
        FlashCausalLMBatch.from_requests(0, [make_request(allocator, 2, [5, 1000])], model)
    with pytest.raises(ValueError, match="cannot hold its 20 prompt tokens"):
        long = make_request(allocator, 4, list(range(3, 23)), max_new_tokens=1)
        FlashCausalLMBatch.from_requests(0, [long.__class__(**{**long.__dict__, "blocks": long.blocks[:1]})], model)
    with pytest.raises(ValueError, match="block 99999"):
        FlashCausalLMBatch.from_requests(0, [good.__class__(**{**good.__dict__, "blocks": (99999,)})], model)
    with pytest.raises(ValueError, match="not in its block table"):
        shifted = tuple(s + 1 for s in good.slots)
        FlashCausalLMBatch.from_requests(0, [good.__class__(**{**good.__dict__, "slots": shifted})], model)
    with pytest.raises(ValueError, match="empty"):
        FlashCausalLMBatch.from_requests(0, [good.__class__(**{**good.__dict__, "input_ids": ()})], model)
    with pytest.raises(ValueError, match="unique"):
        FlashCausalLMBatch.from_requests(0, [good, good], model)
    batch = FlashCausalLMBatch.from_requests(0, [good], model)
    with pytest.raises(ValueError, match="no request 77"):
        batch.filter([77])
    with pytest.raises(ValueError, match="prefilled"):
        FlashCausalLMBatch.concatenate([batch, FlashCausalLMBatch.from_requests(1, [make_request(allocator, 3, [4])], model)])


def test_kv_cache_is_sized_by_kv_heads():
    """internlm2-chat-20b: 48 layers, 48 heads but 8 KV heads of 128 -> 6× less cache than with 48 KV heads."""
    gqa = KVCache.bytes_per_token(48, 8, 128, torch.bfloat16)
    mha = KVCache.bytes_per_token(48, 48, 128, torch.bfloat16)
    assert gqa == 2 * 48 * 8 * 128 * 2 == 196608
    assert mha == 6 * gqa


def test_engine_cache_uses_config_kv_heads(model):
    c = model.config
    assert model.kv_bytes_per_token == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    assert model.kv_cache.keys[0].shape == (NUM_BLOCKS, BLOCK_SIZE, c.num_key_value_heads, c.head_dim)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_follow_float32(model, dtype, tmp_path_factory):
    path = model.model_dir
    half = get_model(path, dtype=dtype, device="cpu")
    half.allocate_kv_cache(64, BLOCK_SIZE)
    assert half.model.output.dtype == getattr(torch, dtype)
    prompt = random_prompts(1, seed=21)[0]
    allocator = BlockAllocator(64, BLOCK_SIZE)
    logits = half.forward(FlashCausalLMBatch.from_requests(0, [make_request(allocator, 0, prompt)], half))
    reference = model.forward(FlashCausalLMBatch.from_requests(0, [make_request(BlockAllocator(64, BLOCK_SIZE), 0, prompt)], model))
    assert logits.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(logits, reference).item() > 0.99


# ----- loading errors and dispatch ---------------------------------------------------------------------


@pytest.fixture()
def broken_copy(model, tmp_path):
    """A writable copy of the tiny checkpoint, as one safetensors file, to damage in each test."""
    from helpers import read_checkpoint
    from safetensors.torch import save_file

    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(model.model_dir / name, tmp_path / name)
    tensors = read_checkpoint(model.model_dir)

    def write(edit):
        edit(tensors)
        save_file(tensors, tmp_path / "model.safetensors")
        return tmp_path

    return write


def test_missing_tensor_is_named(broken_copy):
    path = broken_copy(lambda t: t.pop("model.layers.1.feed_forward.w3.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.feed_forward\.w3\.weight \(expected shape \[128, 64\]\)"):
        get_model(path, dtype="float32", device="cpu")


def test_wrong_shape_names_both_shapes(broken_copy):
    def shrink(t):
        t["model.layers.0.attention.wqkv.weight"] = t["model.layers.0.attention.wqkv.weight"][:-16]

    path = broken_copy(shrink)
    with pytest.raises(ValueError, match=r"wqkv\.weight has shape \[112, 64\] in the checkpoint but the config implies \[128, 64\]"):
        get_model(path, dtype="float32", device="cpu")


def test_unexpected_tensor_is_named(broken_copy):
    def extra(t):
        t["model.layers.0.attention.extra.weight"] = torch.zeros(3, 4)
        t["model.layers.0.attention.rotary_emb.inv_freq"] = torch.zeros(8)  # a known non-weight: ignored

    path = broken_copy(extra)
    with pytest.raises(ValueError, match=r"does not use: model\.layers\.0\.attention\.extra\.weight \[3, 4\]$"):
        get_model(path, dtype="float32", device="cpu")


def test_unknown_architecture_lists_supported(model, tmp_path):
    shutil.copytree(model.model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["QWenLMHeadModel"]
    config.pop("auto_map")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture QWenLMHeadModel; supported: InternLM2ForCausalLM, LlamaForCausalLM"):
        get_model(tmp_path / "m", dtype="float32", device="cpu")


def test_first_internlm2_config_with_model_type_internlm_loads(model, tmp_path):
    shutil.copytree(model.model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "internlm"
    config["auto_map"] = {"AutoConfig": "configuration_internlm.InternLMConfig", "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert isinstance(get_model(tmp_path / "m", dtype="float32", device="cpu"), FlashInternlm2)
    config.pop("architectures")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert isinstance(get_model(tmp_path / "m", dtype="float32", device="cpu"), FlashInternlm2)


def test_bin_checkpoint_is_converted_once_with_index(tmp_path_factory):
    path = make_tiny(tmp_path_factory, "engine-bin", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000, format="bin", shards=2)
    get_model(path, dtype="float32", device="cpu")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    bin_index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == set(bin_index["weight_map"])
    stamp = (path / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    get_model(path, dtype="float32", device="cpu")  # second load reads the converted files
    assert (path / "model-00001-of-00002.safetensors").stat().st_mtime_ns == stamp


def test_block_tables_grow_during_decode(model):
    """Blocks given for the prompt only, appended one at a time when a request fills them: same tokens."""
    prompts = [random_prompts(1, seed=30)[0][:14], random_prompts(1, seed=31)[0][:5]]
    expected = [tokens_of(alone(model, p, max_new_tokens=20)) for p in prompts]

    free = list(range(NUM_BLOCKS - 1, -1, -1))
    requests = [
        make_request(BlockAllocator(NUM_BLOCKS, BLOCK_SIZE), i, p, max_new_tokens=20) for i, p in enumerate(prompts)
    ]
    tables = [[free.pop() for _ in range(-(-len(p) // BLOCK_SIZE))] for p in prompts]
    requests = [r.__class__(**{**r.__dict__, "blocks": tuple(t), "slots": ()}) for r, t in zip(requests, tables)]
    batch = FlashCausalLMBatch.from_requests(0, requests, model)
    produced = {0: [], 1: []}
    grown = 0
    while batch is not None:
        # the next forward writes position len(ids) - 1 of each request: give it a block when it has none
        extensions = {}
        for rid, ids, table in zip(batch.request_ids, batch.all_input_ids, batch.block_tables):
            if not batch.is_prefill and len(ids) - 1 >= len(table) * BLOCK_SIZE:
                extensions[rid] = [free.pop()]
        grown += len(extensions)
        model.extend_block_tables(batch, extensions)
        generations, batch = model.generate_token(batch)
        for g in generations:
            produced[g.request_id].extend(g.tokens.ids)
    assert grown >= 2
    assert [produced[0], produced[1]] == expected


def test_decode_without_a_block_for_the_next_position_is_refused(model):
    prompt = list(range(3, 3 + BLOCK_SIZE))  # fills its only block exactly
    request = make_request(BlockAllocator(NUM_BLOCKS, BLOCK_SIZE), 0, prompt, max_new_tokens=4)
    request = request.__class__(**{**request.__dict__, "blocks": request.blocks[:1], "slots": ()})
    _, batch = model.generate_token(FlashCausalLMBatch.from_requests(0, [request], model))
    with pytest.raises(ValueError, match=f"request 0 has no KV block for position {BLOCK_SIZE}"):
        model.generate_token(batch)
    with pytest.raises(ValueError, match=f"request 0 has no KV block for position {BLOCK_SIZE}"):
        model.extend_block_tables(batch, {})
    with pytest.raises(ValueError, match="no request 5 to extend"):
        model.extend_block_tables(batch, {5: [1]})
    with pytest.raises(ValueError, match="block 100000 is outside"):
        model.extend_block_tables(batch, {0: [100000]})
    model.extend_block_tables(batch, {0: [7]})
    generations, _ = model.generate_token(batch)
    assert len(generations) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_attention_follows_float32(dtype):
    """Half-precision decode attention takes its own path (batched matmuls); it must agree with float32's."""
    from text_generation_server.layers.attention import _decode_attention

    generator = torch.Generator().manual_seed(0)
    key_cache = torch.randn(64, BLOCK_SIZE, 2, 32, generator=generator)
    value_cache = torch.randn(64, BLOCK_SIZE, 2, 32, generator=generator)
    query = torch.randn(3, 6, 32, generator=generator)
    block_tables = torch.tensor([[5, 9, 0], [1, 2, 3], [7, 0, 0]])
    context_lengths = torch.tensor([20, 48, 3])
    reference = _decode_attention(query, key_cache, value_cache, block_tables, context_lengths, 32**-0.5)
    half = _decode_attention(
        query.to(dtype), key_cache.to(dtype), value_cache.to(dtype), block_tables, context_lengths, 32**-0.5
    )
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), reference, atol=3e-2, rtol=3e-2)
