"""The tiny checkpoint generator writes the exact internlm2-chat-* layout, and the weights make sense."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
from safetensors.torch import load_file
from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2

from conftest import SCRIPTS_DIR, make_tiny

SPECIAL_PIECES = [f"[UNUSED_TOKEN_{n}]" for n in range(141, 147)]
SPECIAL_NAMES = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint in any of the four layouts (single/sharded x safetensors/bin)."""
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", lambda path: torch.load(path, weights_only=True)),
    ):
        index_path = model_dir / index_name
        if index_path.exists():
            state: dict[str, torch.Tensor] = {}
            for file_name in sorted(set(read_json(index_path)["weight_map"].values())):
                state.update(loader(str(model_dir / file_name)))
            return state
    if (model_dir / "model.safetensors").exists():
        return load_file(str(model_dir / "model.safetensors"))
    return torch.load(model_dir / "pytorch_model.bin", weights_only=True)


def expected_shapes(
    *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, bias: bool
) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.tok_embeddings.weight": (vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "attention_norm.weight"] = (hidden,)
        shapes[prefix + "attention.wqkv.weight"] = ((heads + 2 * kv_heads) * head_dim, hidden)
        shapes[prefix + "attention.wo.weight"] = (hidden, heads * head_dim)
        if bias:
            shapes[prefix + "attention.wqkv.bias"] = ((heads + 2 * kv_heads) * head_dim,)
            shapes[prefix + "attention.wo.bias"] = (hidden,)
        shapes[prefix + "ffn_norm.weight"] = (hidden,)
        shapes[prefix + "feed_forward.w1.weight"] = (intermediate, hidden)
        shapes[prefix + "feed_forward.w3.weight"] = (intermediate, hidden)
        shapes[prefix + "feed_forward.w2.weight"] = (hidden, intermediate)
    shapes["model.norm.weight"] = (hidden,)
    shapes["output.weight"] = (vocab, hidden)
    return shapes


DEFAULT_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000)


def test_default_files_and_config(tiny_internlm2_dir: Path) -> None:
    names = sorted(path.name for path in tiny_internlm2_dir.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert not list(tiny_internlm2_dir.glob("*.py"))
    config = read_json(tiny_internlm2_dir / "config.json")
    assert config["architectures"] == ["InternLM2ForCausalLM"]
    assert config["model_type"] == "internlm2"
    assert config["auto_map"]["AutoConfig"] == "configuration_internlm2.InternLM2Config"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (
        2,
        128,
        1000,
    )
    assert config["max_position_embeddings"] == 512
    assert config["rope_theta"] == 1e6 and config["rope_scaling"] is None
    assert config["bias"] is False and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["rms_norm_eps"] == 1e-5 and config["hidden_act"] == "silu"
    assert config["attn_implementation"] == "eager" and config["torch_dtype"] == "float32"


def test_default_weights_names_shapes_and_index(tiny_internlm2_dir: Path) -> None:
    index = read_json(tiny_internlm2_dir / "model.safetensors.index.json")
    state = load_state_dict(tiny_internlm2_dir)
    shapes = expected_shapes(**DEFAULT_SHAPE, bias=False)
    assert {name: tuple(tensor.shape) for name, tensor in state.items()} == shapes
    assert set(index["weight_map"]) == set(shapes)
    assert set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert all(tensor.dtype == torch.float32 for tensor in state.values())


@pytest.mark.parametrize("vocab", [1000, 92544])
def test_special_tokens_are_the_last_six_ids(tmp_path_factory: pytest.TempPathFactory, vocab: int) -> None:
    model_dir = make_tiny(tmp_path_factory, f"vocab{vocab}", vocab=vocab, layers=1, shards=1)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert processor.get_piece_size() == vocab
    assert [processor.id_to_piece(vocab - 6 + offset) for offset in range(6)] == SPECIAL_PIECES
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, -1)
    # USER_DEFINED: sentencepiece itself never splits them.
    assert processor.encode("[UNUSED_TOKEN_146]user") == [vocab - 1, processor.piece_to_id("user")]
    proto = sp_model_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    assert proto.trainer_spec.byte_fallback and not proto.normalizer_spec.add_dummy_prefix

    tokenizer_config = read_json(model_dir / "tokenizer_config.json")
    decoder = tokenizer_config["added_tokens_decoder"]
    assert [decoder[str(vocab - 6 + offset)]["content"] for offset in range(6)] == SPECIAL_NAMES
    assert all(decoder[str(vocab - 6 + offset)]["special"] for offset in range(6))
    assert [decoder[str(i)]["content"] for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tokenizer_config["additional_special_tokens"] == SPECIAL_NAMES
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["add_eos_token"] is False
    assert tokenizer_config["chat_template"].startswith("{{ bos_token }}{% for message in messages %}")
    assert read_json(model_dir / "special_tokens_map.json")["additional_special_tokens"] == SPECIAL_NAMES

    generation_config = read_json(model_dir / "generation_config.json")
    assert generation_config["eos_token_id"] == [2, vocab - 2]
    assert (generation_config["bos_token_id"], generation_config["pad_token_id"]) == (1, 2)


@pytest.mark.parametrize(
    "name, kwargs, files",
    [
        (
            "bin-sharded",
            dict(format="bin", shards=2),
            [
                "pytorch_model-00001-of-00002.bin",
                "pytorch_model-00002-of-00002.bin",
                "pytorch_model.bin.index.json",
            ],
        ),
        ("bin-single", dict(format="bin", shards=1), ["pytorch_model.bin"]),
        ("st-single", dict(format="safetensors", shards=1), ["model.safetensors"]),
        (
            "st-3shards-bias-bf16",
            dict(format="safetensors", shards=3, bias=True, dtype="bfloat16"),
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "model.safetensors.index.json",
            ],
        ),
    ],
)
def test_weight_layout_variants(
    tmp_path_factory: pytest.TempPathFactory, name: str, kwargs: dict, files: list[str]
) -> None:
    model_dir = make_tiny(tmp_path_factory, name, **kwargs)
    weight_files = sorted(
        p.name
        for p in model_dir.iterdir()
        if p.suffix in (".bin", ".safetensors") or p.name.endswith(".index.json")
    )
    assert weight_files == files
    state = load_state_dict(model_dir)
    bias = bool(kwargs.get("bias", False))
    assert {n: tuple(t.shape) for n, t in state.items()} == expected_shapes(**DEFAULT_SHAPE, bias=bias)
    expected_dtype = torch.bfloat16 if kwargs.get("dtype") == "bfloat16" else torch.float32
    assert all(tensor.dtype == expected_dtype for tensor in state.values())
    assert read_json(model_dir / "config.json")["bias"] is bias


def test_same_seed_same_weights(tmp_path: Path) -> None:
    import make_tiny_internlm2

    first = make_tiny_internlm2.make_tiny_internlm2(tmp_path / "a", layers=1, shards=1, seed=3)
    second = make_tiny_internlm2.make_tiny_internlm2(tmp_path / "b", layers=1, shards=1, seed=3)
    assert (first / "tokenizer.model").read_bytes() == (second / "tokenizer.model").read_bytes()
    for name, tensor in load_state_dict(first).items():
        assert torch.equal(tensor, load_state_dict(second)[name]), name


def test_rejects_bad_shapes(tmp_path: Path) -> None:
    import make_tiny_internlm2

    with pytest.raises(ValueError, match="kv_heads=3"):
        make_tiny_internlm2.make_tiny_internlm2(tmp_path, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="vocab=100"):
        make_tiny_internlm2.make_tiny_internlm2(tmp_path, vocab=100)
    with pytest.raises(ValueError, match="'gguf'"):
        make_tiny_internlm2.make_tiny_internlm2(tmp_path, format="gguf")


def test_cli_writes_rope_scaling(tmp_path: Path) -> None:
    out_dir = tmp_path / "cli"
    subprocess.run(
        [
            sys.executable,
            str(SCRIPTS_DIR / "make_tiny_internlm2.py"),
            str(out_dir),
            "--layers",
            "1",
            "--rope-scaling",
            "dynamic:2.0",
            "--shards",
            "1",
            "--dtype",
            "float16",
        ],
        check=True,
        capture_output=True,
    )
    config = read_json(out_dir / "config.json")
    assert config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert config["num_hidden_layers"] == 1 and config["torch_dtype"] == "float16"
    assert load_file(str(out_dir / "model.safetensors"))["output.weight"].dtype == torch.float16


# -------------------------------------------------------------------------------- Llama reference


def internlm2_to_llama(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """InternLM2 checkpoint names/layout -> transformers Llama, from the reference table (§2, §3.2)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    head_dim = hidden // heads
    group = heads // kv_heads
    renames = {
        "attention_norm.weight": "input_layernorm.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "attention.wo.bias": "self_attn.o_proj.bias",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
    }
    llama: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["model.tok_embeddings.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for name, tensor in state.items():
        if not name.startswith("model.layers."):
            continue
        layer, _, suffix = name.removeprefix("model.layers.").partition(".")
        prefix = f"model.layers.{layer}."
        if suffix.startswith("attention.wqkv."):
            kind = suffix.rsplit(".", 1)[1]  # weight or bias
            # Rows grouped per KV head: (KV, G query slots + key + value, D, in_features).
            grouped = tensor.reshape(kv_heads, group + 2, head_dim, -1)
            llama[prefix + f"self_attn.q_proj.{kind}"] = (
                grouped[:, :group].reshape(heads * head_dim, -1).squeeze(-1)
            )
            llama[prefix + f"self_attn.k_proj.{kind}"] = (
                grouped[:, group].reshape(kv_heads * head_dim, -1).squeeze(-1)
            )
            llama[prefix + f"self_attn.v_proj.{kind}"] = (
                grouped[:, group + 1].reshape(kv_heads * head_dim, -1).squeeze(-1)
            )
        else:
            llama[prefix + renames[suffix]] = tensor
    return llama


@pytest.mark.parametrize("name, kwargs", [("default", None), ("llama-bias", dict(bias=True))])
def test_loads_into_transformers_llama_with_spread_logits(
    tmp_path_factory: pytest.TempPathFactory, tiny_internlm2_dir: Path, name: str, kwargs: dict | None
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tiny_internlm2_dir if kwargs is None else make_tiny(tmp_path_factory, name, **kwargs)
    config = read_json(model_dir / "config.json")
    llama_config = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
        attention_bias=config["bias"],
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(llama_config).eval()
    missing, unexpected = model.load_state_dict(
        internlm2_to_llama(load_state_dict(model_dir), config), strict=False
    )
    assert not unexpected
    assert [key for key in missing if "rotary" not in key] == []

    prompt = torch.randint(0, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(prompt).logits[0]
    assert torch.isfinite(logits).all()
    assert logits.std().item() > 0.5
    # Greedy choices must not be near-ties: the top-2 gap is far above float noise at every position.
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-4
