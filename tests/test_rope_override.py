"""The shard's rope overrides (--rope-scaling / --rope-factor, TGI's flags; env ROPE_SCALING / ROPE_FACTOR) for
checkpoints whose config has `rope_scaling: null` or an old factor: the override gives the same model as a
config that says the same, and the served stack uses it."""

from __future__ import annotations

import httpx
import pytest
from conftest import make_tiny
from helpers import greedy_tokens
from router_stack import start_stack
from text_generation_common.tokenizer import Tokenizer
from text_generation_server.models import get_model
from text_generation_server.models.config import RopeScaling, rope_override

MAX_POS = 32
PROMPT = list(range(5, 5 + 40))  # longer than max_position_embeddings: dynamic NTK stretches the base


def engine(model_dir, rope_scaling=None):
    model = get_model(model_dir, dtype="float32", device="cpu", rope_scaling=rope_scaling)
    model.allocate_kv_cache(16, 16)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    shape = dict(layers=1, max_pos=MAX_POS, shards=1)
    plain = make_tiny(tmp_path_factory, "rope-null", **shape)
    configured = {
        kind: make_tiny(tmp_path_factory, f"rope-{kind}2", rope_scaling={"type": kind, "factor": 2.0}, **shape)
        for kind in ("dynamic", "linear")
    }
    return plain, configured


def test_override_equals_the_same_config(checkpoints):
    plain, configured = checkpoints
    unscaled = greedy_tokens(engine(plain), [PROMPT], 8)
    for kind, model_dir in configured.items():
        overridden = engine(plain, RopeScaling(kind, 2.0))
        assert overridden.rotary.is_dynamic == (kind == "dynamic")
        expected = greedy_tokens(engine(model_dir), [PROMPT], 8)
        assert greedy_tokens(overridden, [PROMPT], 8) == expected
        assert expected != unscaled, f"{kind} scaling must change this run for the test to mean anything"


def test_override_rules():
    assert rope_override(None, None) is None
    assert rope_override(None, 2.0) == RopeScaling("linear", 2.0)  # a factor alone means linear (TGI)
    assert rope_override("dynamic", None) == RopeScaling("dynamic", 1.0)
    with pytest.raises(ValueError, match="--rope-scaling"):
        rope_override("yarn", 2.0)
    with pytest.raises(ValueError, match="--rope-factor"):
        rope_override("linear", 0.5)


def test_served_stack_uses_the_override(checkpoints, tmp_path):
    plain, configured = checkpoints
    text = "hello world " * 12  # 61 tokens: enough past max_position_embeddings to change the greedy run
    ids = Tokenizer.from_pretrained(plain).encode(text)
    assert MAX_POS < len(ids) <= 64
    expected = greedy_tokens(engine(configured["dynamic"]), [ids], 6)[0]
    assert expected != greedy_tokens(engine(plain), [ids], 6)[0]
    shard_args = ["--rope-scaling", "dynamic", "--rope-factor", "2"]
    router_args = ["--max-input-tokens", "64", "--max-total-tokens", "96"]
    with start_stack(plain, tmp_path, grpc=False, shard_args=shard_args, router_args=router_args) as stack:
        body = {"inputs": text, "parameters": {"max_new_tokens": 6, "details": True}}
        answer = httpx.post(f"{stack.http_url}/generate", json=body, timeout=60).json()
    assert [t["id"] for t in answer["details"]["tokens"]] == expected
