"""The engine's steps, sampling, stopping and bookkeeping, on a tiny InternLM2."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import make_tiny
from helpers import new_request

from text_generation_server.models import get_model
from text_generation_server.models.flash_internlm2 import FlashInternlm2
from text_generation_server.models.local import LocalRunner, generate
from text_generation_server.models.types import FinishReason, NewRequest, SamplingParameters, ScheduledRequest, Step
from text_generation_server.ops.reference import ReferenceOps

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


def alone(model, prompt, max_new_tokens=8, **kwargs):
    """The LocalResult of one request run by itself."""
    return generate(model, [new_request(prompt, max_new_tokens, **kwargs)])[0]


class Driver:
    """Steps the engine by hand: requests join at chosen steps, prompts go in chunks, some are released."""

    def __init__(self, model):
        self.model = model
        self.free = list(range(NUM_BLOCKS))
        self.pending: dict[int, dict] = {}
        self.tokens: dict[int, list[int]] = {}

    def add(self, request_id: int, new: NewRequest, chunk: int) -> None:
        count = -(-(len(new.token_ids) + new.stopping.max_new_tokens) // BLOCK_SIZE)
        blocks = tuple(self.free.pop() for _ in range(count))  # descending ids: neither contiguous nor ascending
        self.pending[request_id] = dict(new=new, blocks=blocks, chunk=chunk, computed=new.num_cached_tokens, sent=False)
        self.tokens[request_id] = []

    def step(self, released=()) -> list:
        for request_id in released:
            self.pending.pop(request_id)
        scheduled = []
        for request_id, p in self.pending.items():
            known = len(p["new"].token_ids) + len(self.tokens[request_id])
            n = min(known - p["computed"], p["chunk"])
            first = not p["sent"]
            scheduled.append(ScheduledRequest(request_id, n, p["blocks"] if first else (), p["new"] if first else None))
            p["sent"], p["computed"] = True, p["computed"] + n
        generations = self.model.step(Step(requests=tuple(scheduled), released=tuple(released)))
        for g in generations:
            if g.token_id is not None:
                self.tokens[g.request_id].append(g.token_id)
            if g.finish_reason is not None:
                self.pending.pop(g.request_id)
        return generations


def test_tokens_are_the_same_alone_and_in_a_changing_batch(model):
    """8 requests of different lengths join in three waves, some prompts in chunks, while others decode; they
    leave at different steps and one is released (cancelled) midway."""
    prompts = random_prompts(8)
    budgets = [3, 9, 14, 6, 11, 2, 8, 12]
    chunks = [1000, 5, 1000, 3, 7, 1000, 4, 1000]
    params = [SamplingParameters()] * 6 + [SamplingParameters(do_sample=True, seed=7), SamplingParameters(top_k=5, seed=3)]
    expected = [alone(model, p, n, parameters=s).token_ids for p, n, s in zip(prompts, budgets, params)]

    driver = Driver(model)
    waves = {0: [0, 1, 2], 2: [3, 4], 5: [5, 6, 7]}
    cancel_step, cancelled = 7, 2
    for step in range(60):
        for i in waves.get(step, []):
            driver.add(i, new_request(prompts[i], budgets[i], parameters=params[i]), chunks[i])
        driver.step(released=(cancelled,) if step == cancel_step else ())
        if not driver.pending and step > max(waves):
            break
    assert not driver.pending and not model.requests
    for i, tokens in enumerate(expected):
        got = driver.tokens[i]
        if i == cancelled:
            assert got == tokens[: len(got)] and len(got) < len(tokens)
        else:
            assert got == tokens, f"request {i}"


def test_a_recomputed_request_continues_where_it_was(model):
    """After a preemption the router sends the prompt + the tokens generated so far (prompt_length unchanged):
    greedy and seeded sampled requests continue with exactly the tokens they would have produced."""
    prompt = random_prompts(1, seed=3)[0]
    for params in (SamplingParameters(), SamplingParameters(do_sample=True, temperature=1.3, seed=11, repetition_penalty=1.3)):
        full = alone(model, prompt, 12, parameters=params).token_ids
        resumed = generate(
            model,
            [NewRequest(token_ids=tuple(prompt + full[:5]), prompt_length=len(prompt), parameters=params,
                        stopping=new_request(prompt, 12).stopping)],
            chunk_size=4,
        )[0]
        assert resumed.token_ids == full[5:]


def test_a_cached_prefix_is_not_computed_again(model):
    """A request whose first blocks already hold its prefix (a prefix-cache hit) computes only the rest, with
    the same tokens as a request that computes everything."""
    prefix = random_prompts(1, seed=40, low=40, high=41)[0]  # 40 tokens: two full blocks and a part
    prompt = prefix + [7, 8, 9]
    expected = alone(model, prompt, 6).token_ids
    driver = Driver(model)
    driver.add(0, new_request(prefix, 1), chunk=1000)
    first_owner_blocks = driver.pending[0]["blocks"]
    driver.step()  # computes the prefix into request 0's blocks; it then finishes, the blocks keep their contents
    assert not model.requests
    blocks = first_owner_blocks[:2] + (driver.free.pop(), driver.free.pop())
    cached = 2 * BLOCK_SIZE
    new = NewRequest(token_ids=tuple(prompt), prompt_length=len(prompt), num_cached_tokens=cached,
                     stopping=new_request(prompt, 6).stopping)
    tokens = [model.step(Step(requests=(ScheduledRequest(1, len(prompt) - cached, blocks, new),)))[0].token_id]
    while model.requests:
        tokens += [g.token_id for g in model.step(Step(requests=(ScheduledRequest(1, 1),)))]
    assert tokens == expected


def test_seeded_sampling_is_reproducible(model):
    prompt = random_prompts(1, seed=5)[0]
    sampled = SamplingParameters(do_sample=True, temperature=1.5, seed=1234)
    first = alone(model, prompt, 16, parameters=sampled).token_ids
    second = alone(model, prompt, 16, parameters=sampled).token_ids
    other_seed = alone(model, prompt, 16, parameters=SamplingParameters(do_sample=True, temperature=1.5, seed=99)).token_ids
    greedy = alone(model, prompt, 16).token_ids
    assert first == second
    assert first != other_seed
    assert first != greedy
    assert alone(model, prompt, 16, parameters=SamplingParameters(do_sample=True, top_k=1, seed=5)).token_ids == greedy


def test_logprobs_top_n_and_prefill_tokens(model):
    prompt = random_prompts(1, seed=8)[0]
    runner = LocalRunner(model, chunk_size=4)
    runner.add(new_request(prompt, 4, top_n_tokens=3, prefill_logprobs=True))
    steps = []
    while runner.running:
        steps.append(runner.step())
    result = runner.results[0]
    assert result.prefill.ids == prompt
    assert math.isnan(result.prefill.logprobs[0])
    assert all(lp <= 0 for lp in result.prefill.logprobs[1:])
    # the prompt's chunks came over several steps, each with its own prompt tokens and no token until the last
    prefill_steps = [g for gens in steps for g in gens if g.prefill is not None]
    assert len(prefill_steps) == math.ceil(len(prompt) / 4) and all(g.token_id is None for g in prefill_steps[:-1])
    for token, logprob, top in zip(result.token_ids, result.logprobs, result.top_tokens):
        # greedy: the chosen token is the best alternative, with the same logprob
        assert top.ids[0] == token and top.logprobs[0] == pytest.approx(logprob)
        assert len(top.ids) == 3 and top.logprobs == sorted(top.logprobs, reverse=True)
    # the prompt logprobs are those of a whole-prompt forward
    whole = alone(model, prompt, 1, prefill_logprobs=True)
    assert result.prefill.logprobs[1:] == pytest.approx(whole.prefill.logprobs[1:], abs=1e-5)


def test_logprobs_are_skipped_only_where_not_wanted(model):
    """token_logprobs False: the same tokens, NaN logprobs; with top tokens asked the logprobs are there anyway.
    The three requests share each step, so a log-softmax over some rows of a batch is checked too."""
    prompts = random_prompts(3, seed=11)
    runner = LocalRunner(model, chunk_size=64)
    runner.add(new_request(prompts[0], 5))
    runner.add(new_request(prompts[1], 5, token_logprobs=False))
    runner.add(new_request(prompts[2], 5, token_logprobs=False, top_n_tokens=2))
    while runner.running:
        runner.step()
    asked, skipped, top = (runner.results[i] for i in range(3))
    assert skipped.token_ids == alone(model, prompts[1], 5).token_ids
    assert all(math.isnan(logprob) for logprob in skipped.logprobs) and not any(skipped.top_tokens)
    assert all(logprob <= 0 for logprob in asked.logprobs + top.logprobs)
    for token, logprob, alternatives in zip(top.token_ids, top.logprobs, top.top_tokens):
        assert alternatives.ids[0] == token and alternatives.logprobs[0] == logprob
    assert top.logprobs == pytest.approx(alone(model, prompts[2], 5).logprobs, abs=1e-5)


def test_stops_on_every_eos_id_and_reports_why(model):
    prompt = random_prompts(1, seed=11)[0]
    free_run = alone(model, prompt, 10).token_ids
    eos_like = free_run[4]
    # the model's own generation_config lists [2, <|im_end|>]; make the 5th greedy token one of them
    assert model.tokenizer.token_to_id("<|im_end|>") in model.eos_token_ids and 2 in model.eos_token_ids
    original = model.eos_token_ids
    model.eos_token_ids = frozenset({eos_like})
    try:
        stopped = alone(model, prompt, 10, ignore_eos=False)
        ignored = alone(model, prompt, 10, ignore_eos=True)
    finally:
        model.eos_token_ids = original
    assert stopped.token_ids == free_run[: free_run.index(eos_like) + 1]
    assert stopped.finish_reason == FinishReason.EOS_TOKEN
    assert ignored.finish_reason == FinishReason.LENGTH and len(ignored.token_ids) == 10
    # a request's own stop_token_ids end it the same way (the chat route's <|im_end|> for other models)
    own = alone(model, prompt, 10, ignore_eos=False, stopping={"stop_token_ids": (free_run[2],)})
    assert own.token_ids == free_run[: free_run.index(free_run[2]) + 1] and own.finish_reason == FinishReason.EOS_TOKEN
    # the last allowed token reports LENGTH even when it is an EOS id
    last = alone(model, prompt, 3, ignore_eos=False, stopping={"stop_token_ids": (free_run[2],)})
    assert last.finish_reason == FinishReason.LENGTH


def test_bad_plans_are_refused_with_the_value_and_change_nothing(model):
    driver = Driver(model)
    driver.add(0, new_request([5, 6, 7], 4), chunk=1000)
    driver.step()
    held = {rid: (list(s.token_ids), s.num_computed, list(s.block_table)) for rid, s in model.requests.items()}
    good = new_request([5, 6, 7], 4)
    bad_steps = {
        "token id 1000 is outside": Step(requests=(ScheduledRequest(9, 2, (1,), new_request([5, 1000], 4)),)),
        "is not held": Step(requests=(ScheduledRequest(9, 1),)),
        "already holds it": Step(requests=(ScheduledRequest(0, 1, (3,), good),)),
        "num_tokens 4 is not in": Step(requests=(ScheduledRequest(9, 4, (1,), good),)),
        "num_tokens 0 is not in": Step(requests=(ScheduledRequest(0, 0),)),
        "block 99999 is outside": Step(requests=(ScheduledRequest(9, 3, (99999,), good),)),
        "its blocks hold 0 positions": Step(requests=(ScheduledRequest(9, 3, (), good),)),
        "cannot release request 9": Step(released=(9,)),
        "released twice": Step(released=(0, 0)),
        "scheduled twice": Step(requests=(ScheduledRequest(0, 1), ScheduledRequest(0, 1))),
        "token_ids is empty": Step(requests=(ScheduledRequest(9, 1, (1,), NewRequest(token_ids=(), prompt_length=0)),)),
        "temperature must be": Step(
            requests=(ScheduledRequest(9, 3, (1,), new_request([5, 6, 7], 4, parameters=SamplingParameters(temperature=0))),)
        ),
        "must leave at least one": Step(
            requests=(ScheduledRequest(9, 1, (1,), NewRequest(token_ids=(5, 6), prompt_length=2, num_cached_tokens=2)),)
        ),
    }
    for message, step in bad_steps.items():
        with pytest.raises(ValueError, match=message):
            model.step(step)
        assert {rid: (list(s.token_ids), s.num_computed, list(s.block_table)) for rid, s in model.requests.items()} == held
    while driver.pending:
        driver.step()
    assert driver.tokens[0] == alone(model, [5, 6, 7], 4).token_ids


def test_kv_cache_is_sized_by_kv_heads():
    """internlm2-chat-20b: 48 layers, 48 heads but 8 KV heads of 128 -> 6× less cache than with 48 KV heads."""
    ops = ReferenceOps()
    gqa = ops.kv_bytes_per_token(48, 8, 128, torch.bfloat16)
    mha = ops.kv_bytes_per_token(48, 48, 128, torch.bfloat16)
    assert gqa == 2 * 48 * 8 * 128 * 2 == 196608
    assert mha == 6 * gqa


def test_engine_cache_uses_config_kv_heads(model):
    c = model.config
    assert model.kv_bytes_per_token == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    assert model.kv_cache.keys[0].shape == (NUM_BLOCKS, BLOCK_SIZE, c.num_key_value_heads, c.head_dim)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_follow_float32(model, dtype):
    half = get_model(model.model_dir, dtype=dtype, device="cpu")
    half.allocate_kv_cache(64, BLOCK_SIZE)
    assert half.model.output.dtype == getattr(torch, dtype)
    prompt = random_prompts(1, seed=21)[0]
    ours = alone(half, prompt, 1, prefill_logprobs=True).prefill.logprobs[1:]
    reference = alone(model, prompt, 1, prefill_logprobs=True).prefill.logprobs[1:]
    assert torch.nn.functional.cosine_similarity(torch.tensor(ours), torch.tensor(reference), dim=0).item() > 0.99


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


def test_block_tables_grow_across_steps(model):
    """Blocks given for the prompt only, then appended one at a time (`new_blocks`) as a request fills them."""
    prompts = [random_prompts(1, seed=30)[0][:14], random_prompts(1, seed=31)[0][:5]]
    expected = [alone(model, p, 20).token_ids for p in prompts]
    free = list(range(NUM_BLOCKS - 1, -1, -1))
    tables = {i: [free.pop() for _ in range(-(-len(p) // BLOCK_SIZE))] for i, p in enumerate(prompts)}
    computed = {i: 0 for i in tables}
    produced = {i: [] for i in tables}
    grown = 0
    first = True
    while model.requests or first:
        scheduled = []
        for i, prompt in enumerate(prompts):
            if not first and i not in model.requests:
                continue
            n = len(prompt) if first else 1
            new_blocks = tuple(tables[i]) if first else ()
            if not first and computed[i] >= len(tables[i]) * BLOCK_SIZE:  # this step writes past its blocks
                tables[i].append(free.pop())
                new_blocks, grown = (tables[i][-1],), grown + 1
            scheduled.append(ScheduledRequest(i, n, new_blocks, new_request(prompt, 20) if first else None))
            computed[i] += n
        for g in model.step(Step(requests=tuple(scheduled))):
            produced[g.request_id].append(g.token_id)
        first = False
    assert grown >= 2
    assert [produced[0], produced[1]] == expected


def test_a_step_writing_past_the_blocks_is_refused(model):
    prompt = list(range(3, 3 + BLOCK_SIZE))  # fills its only block exactly
    model.step(Step(requests=(ScheduledRequest(0, BLOCK_SIZE, (5,), new_request(prompt, 4)),)))
    with pytest.raises(ValueError, match=f"request 0: its blocks hold {BLOCK_SIZE} positions but this step writes up to position {BLOCK_SIZE}"):
        model.step(Step(requests=(ScheduledRequest(0, 1),)))
    with pytest.raises(ValueError, match="block 100000 is outside"):
        model.step(Step(requests=(ScheduledRequest(0, 1, (100000,)),)))
    generations = model.step(Step(requests=(ScheduledRequest(0, 1, (7,)),)))
    assert len(generations) == 1
    model.step(Step(released=(0,)))
    assert not model.requests


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile_bytes", [64 << 20, 2048])  # one tile, and contexts split over many tiles
def test_half_precision_decode_attention_follows_float32(dtype, tile_bytes, monkeypatch):
    """Half-precision decode attention takes its own path (batched matmuls); it must agree with float32's, both
    when every context fits one tile and when the online softmax merges many."""
    from text_generation_server.ops import reference

    monkeypatch.setattr(reference, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(reference, "MIN_TILE_TOKENS", BLOCK_SIZE)
    generator = torch.Generator().manual_seed(0)
    key_cache = torch.randn(64, BLOCK_SIZE, 2, 32, generator=generator)
    value_cache = torch.randn(64, BLOCK_SIZE, 2, 32, generator=generator)
    query = torch.randn(3, 6, 32, generator=generator)
    block_tables = torch.tensor([[5, 9, 0], [1, 2, 3], [7, 0, 0]])
    lengths = [20, 48, 3]
    expected = reference._single_token_attention(query, key_cache, value_cache, block_tables, lengths, 32**-0.5)
    half = reference._single_token_attention(
        query.to(dtype), key_cache.to(dtype), value_cache.to(dtype), block_tables, lengths, 32**-0.5
    )
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), expected, atol=3e-2, rtol=3e-2)
