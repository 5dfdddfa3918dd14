"""Two ranks (gloo, two processes) give the logits and greedy tokens of one rank."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from helpers import internlm2_to_llama, run_ranks

from text_generation_server.models import get_model
from text_generation_server.utils.dist import TensorParallelGroup

SHAPES = {
    "kv2": dict(hidden=64, heads=4, kv_heads=2, vocab=1000),
    "kv4": dict(hidden=64, heads=8, kv_heads=4, vocab=1001, bias=True),  # a vocabulary that does not split evenly
}


@pytest.fixture(scope="module", params=[(shape, arch) for shape in SHAPES for arch in ("internlm2", "llama")],
                ids=lambda p: f"{p[1]}-{p[0]}")
def model_dir(request, tmp_path_factory):
    shape, arch = request.param
    path = make_tiny(tmp_path_factory, f"tp-{shape}", layers=2, intermediate=128, **SHAPES[shape])
    if arch == "llama":
        path = internlm2_to_llama(path, tmp_path_factory.mktemp(f"tp-llama-{shape}"))
    return path


def test_two_ranks_equal_one(model_dir, tmp_path):
    single = run_ranks(model_dir, 1, tmp_path / "single.pt")
    sharded = run_ranks(model_dir, 2, tmp_path / "sharded.pt")
    assert sharded["kv_heads"] * 2 == single["kv_heads"]  # each rank caches half of the KV heads
    torch.testing.assert_close(sharded["logits"], single["logits"], atol=1e-4, rtol=0)
    assert sharded["tokens"] == single["tokens"]


def test_world_size_must_divide_the_heads(tiny_internlm2_dir):
    """The default tiny model has 4 heads and 2 KV heads: 3 ranks cannot split them."""
    message = r"world size 3 does not divide the model's 2 KV heads and 4 attention heads .*valid world sizes: 1, 2"
    with pytest.raises(ValueError, match=message):
        get_model(tiny_internlm2_dir, dtype="float32", device="cpu", tp=TensorParallelGroup(rank=0, world_size=3))
