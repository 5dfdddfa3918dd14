"""The checkpoint converters (scripts/convert_internlm2_to_llama.py, scripts/convert_llama_to_internlm2.py).

* InternLM2 -> Llama: transformers' LlamaForCausalLM on DST gives our native InternLM2's logits on SRC.
* Round trips are bit-identical, tensor by tensor, in both directions (q/k/v spread over shards included).
* The Llama tokenizer written to DST gives the original ids and names `<|im_start|>`/`<|im_end|>` correctly.
* Bad inputs are refused with one clear line and leave nothing behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import sentencepiece
import torch
from conftest import REPO_ROOT, make_tiny
from helpers import prompt_logits, read_checkpoint
from safetensors.torch import save_file
from text_generation_server.models import get_model
from text_generation_server.utils.convert_checkpoint import (
    TO_INTERNLM2,
    TO_LLAMA,
    ConversionError,
    convert_checkpoint,
)
from text_generation_common.tokenizer import Tokenizer

VOCAB = 1000
IM_START, IM_END = VOCAB - 1, VOCAB - 2
TINY = dict(layers=2, intermediate=128, vocab=VOCAB, max_pos=512)

SHAPES = {
    "gqa": dict(hidden=96, heads=6, kv_heads=2, shards=2),
    "mha": dict(hidden=64, heads=4, kv_heads=4, shards=1),
    "single-kv": dict(hidden=64, heads=4, kv_heads=1, shards=2, bias=True),
    "bin-sharded": dict(hidden=64, heads=4, kv_heads=2, format="bin", shards=3),
}

ENGLISH = "Hello world! How are you today? The quick brown fox jumps over the lazy dog, 12 345 times."
CHINESE = "你好，世界！我是人工智能助手。龘鑫 are rare: 齉 and 𠀋."
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! 你好，世界"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "Tell me a story."},
]


def convert(direction, src: Path, dst: Path, **kwargs) -> Path:
    return convert_checkpoint(direction, src, dst, show_progress=False, **kwargs)


def listing(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}


def run_script(name: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


# --------------------------------------------------------------------------------- InternLM2 -> Llama


@pytest.fixture(scope="module", params=list(SHAPES))
def converted(request, tmp_path_factory):
    """(SRC, DST) for one shape; SRC is checked to be untouched by the conversion."""
    src = make_tiny(tmp_path_factory, f"convert-{request.param}", **TINY, **SHAPES[request.param])
    before = listing(src)
    dst = convert(TO_LLAMA, src, tmp_path_factory.mktemp(f"converted-{request.param}") / "llama")
    assert listing(src) == before, "the converter wrote into SRC"
    return src, dst


def native_logits(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    model = get_model(model_dir, dtype="float32", device="cpu")
    model.allocate_kv_cache(64, 16)
    return [prompt_logits(model, p) for p in prompts]


def test_transformers_llama_on_dst_matches_native_internlm2_on_src(converted, tmp_path):
    from transformers import LlamaForCausalLM

    src, dst = converted
    if not any(src.glob("*.safetensors")):  # get_model converts .bin in place: keep the shared SRC pristine
        src = Path(shutil.copytree(src, tmp_path / "src"))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (1, 7, 30)]
    reference = LlamaForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    for prompt, got in zip(prompts, native_logits(src, prompts), strict=True):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert expected.std() > 0.5, "logits too flat for a meaningful comparison"
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_round_trip_internlm2_llama_internlm2_is_bit_identical(converted, tmp_path):
    src, dst = converted
    back = convert(TO_INTERNLM2, dst, tmp_path / "back")
    original, returned = read_checkpoint(src), read_checkpoint(back)
    assert sorted(original) == sorted(returned)
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype, name
        assert torch.equal(returned[name], tensor), name
    assert json.loads((back / "config.json").read_text())["architectures"] == ["InternLM2ForCausalLM"]


def test_sharded_input_keeps_its_shards_and_index(converted):
    src, dst = converted
    source_files = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".safetensors"))
    written = sorted(p.name for p in dst.glob("*.safetensors"))
    if len(source_files) == 1:
        assert written == ["model.safetensors"] and not (dst / "model.safetensors.index.json").exists()
        return
    assert written == [name.removeprefix("pytorch_").replace(".bin", ".safetensors") for name in source_files]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_checkpoint(dst))
    assert set(index["weight_map"].values()) == set(written)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in read_checkpoint(dst).values()
    )


def test_config_and_generation_config_mapped(tmp_path_factory, tmp_path):
    src = make_tiny(
        tmp_path_factory,
        "convert-config",
        **TINY,
        hidden=64,
        heads=4,
        kv_heads=2,
        bias=True,
        rope_theta=5e4,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        dtype="bfloat16",
    )
    dst = convert(TO_LLAMA, src, tmp_path / "llama")
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "auto_map" not in config and "bias" not in config and config["attention_bias"] is True
    assert (config["rope_theta"], config["rope_scaling"]) == (5e4, {"type": "dynamic", "factor": 2.0})
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_checkpoint(dst).values())  # dtype kept
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == [2, IM_END]
    assert not list(dst.glob("*.py"))

    back = convert(TO_INTERNLM2, dst, tmp_path / "back", dtype=torch.float32)
    config = json.loads((back / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["bias"]) == (
        ["InternLM2ForCausalLM"],
        "internlm2",
        True,
    )
    assert config["rope_scaling"] == {"type": "dynamic", "factor": 2.0} and config["torch_dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in read_checkpoint(back).values())  # --dtype applied


def test_single_eos_generation_config_gains_im_end(tmp_path, tiny_internlm2_dir):
    src = Path(shutil.copytree(tiny_internlm2_dir, tmp_path / "src"))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    dst = convert(TO_LLAMA, src, tmp_path / "llama")
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == [2, IM_END]


# --------------------------------------------------------------------------------- Llama -> InternLM2


def write_llama_with_split_qkv(llama_dir: Path, out_dir: Path) -> Path:
    """Re-shard a Llama checkpoint so that each layer's q_proj sits in another shard than its k/v_proj."""
    tensors = read_checkpoint(llama_dir)
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for name, tensor in tensors.items():
        if ".k_proj." in name or ".v_proj." in name:
            shards[2 if "layers.0." in name else 0][name] = tensor
        else:
            shards[1][name] = tensor
    out_dir.mkdir()
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-00003.safetensors"
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    for path in llama_dir.iterdir():
        if not path.name.endswith((".safetensors", ".index.json")):
            shutil.copy(path, out_dir / path.name)
    return out_dir


def test_round_trip_llama_internlm2_llama_is_bit_identical_with_qkv_across_shards(converted, tmp_path):
    _, llama = converted
    llama = write_llama_with_split_qkv(llama, tmp_path / "llama-split")
    internlm2 = convert(TO_INTERNLM2, llama, tmp_path / "internlm2")
    back = convert(TO_LLAMA, internlm2, tmp_path / "back")
    original, returned = read_checkpoint(llama), read_checkpoint(back)
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(returned[name], tensor) for name, tensor in original.items())


def test_transformers_saved_tied_llama_converts(tmp_path, tiny_internlm2_dir):
    """A Llama written by transformers itself (tied head, no lm_head tensor) is served by our InternLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "llama")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_internlm2_dir / name, tmp_path / "llama" / name)
    internlm2 = convert(TO_INTERNLM2, tmp_path / "llama", tmp_path / "internlm2")
    prompt = list(range(3, 40))
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(native_logits(internlm2, [prompt])[0], expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_pair(tmp_path_factory, tiny_internlm2_dir):
    dst = convert(TO_LLAMA, tiny_internlm2_dir, tmp_path_factory.mktemp("tokenizer") / "llama")
    return tiny_internlm2_dir, dst


def chat_text(template: str) -> str:
    return (
        jinja2.Environment()
        .from_string(template)
        .render(messages=MESSAGES, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    )


def test_converted_tokenizer_gives_the_original_ids(tokenizer_pair):
    from transformers import AutoTokenizer, LlamaTokenizer

    src, dst = tokenizer_pair
    original = Tokenizer.from_pretrained(src)
    chat = chat_text(original.chat_template)
    for tokenizer in (
        Tokenizer.from_pretrained(dst),
        LlamaTokenizer.from_pretrained(str(dst)),
        AutoTokenizer.from_pretrained(str(dst)),
    ):
        for text in (ENGLISH, CHINESE, "  two  spaces\n\n"):
            assert tokenizer.encode(text) == original.encode(text), (type(tokenizer).__name__, text)
        assert tokenizer.encode(chat, add_special_tokens=False) == original.encode(
            chat, add_special_tokens=False
        )


def test_llama_tokenizer_names_the_chat_tokens(tokenizer_pair):
    from transformers import AutoTokenizer

    src, dst = tokenizer_pair
    tokenizer = AutoTokenizer.from_pretrained(str(dst))
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [IM_START]
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [IM_END]
    assert tokenizer.decode([IM_START, IM_END]) == "<|im_start|><|im_end|>"
    assert tokenizer.convert_ids_to_tokens(IM_END) == "<|im_end|>"
    original_template = json.loads((src / "tokenizer_config.json").read_text())["chat_template"]
    assert tokenizer.chat_template == original_template
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == chat_text(original_template)
    # Raw sentencepiece (what llama.cpp's converter reads) sees the real names too.
    processor = sentencepiece.SentencePieceProcessor(model_file=str(dst / "tokenizer.model"))
    assert processor.id_to_piece(IM_END) == "<|im_end|>" and processor.id_to_piece(VOCAB - 6) == "<|plugin|>"
    assert processor.encode("x<|im_end|>") == processor.encode("x") + [IM_END]
    config = json.loads((dst / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and config["tokenizer_class"] == "LlamaTokenizer"


# --------------------------------------------------------------------------------- refusals (CLI)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".converting-" in p.name)


def test_cli_refuses_bad_inputs_and_leaves_nothing(tmp_path, tiny_internlm2_dir):
    llama = convert(TO_LLAMA, tiny_internlm2_dir, tmp_path / "llama")
    other = Path(shutil.copytree(tiny_internlm2_dir, tmp_path / "mistral"))
    (other / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    no_weights = Path(shutil.copytree(tiny_internlm2_dir, tmp_path / "no-weights"))
    for path in no_weights.glob("model*.safetensors*"):
        path.unlink()
    wrong_shape = Path(shutil.copytree(tiny_internlm2_dir, tmp_path / "wrong-shape"))
    config = json.loads((wrong_shape / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    cases = [
        ("convert_internlm2_to_llama.py", llama, "holds LlamaForCausalLM, not InternLM2ForCausalLM"),
        (
            "convert_llama_to_internlm2.py",
            tiny_internlm2_dir,
            "holds InternLM2ForCausalLM, not LlamaForCausalLM",
        ),
        ("convert_internlm2_to_llama.py", other, "unsupported architecture MistralForCausalLM"),
        ("convert_internlm2_to_llama.py", tmp_path / "absent", "is not a directory"),
        ("convert_internlm2_to_llama.py", no_weights, "has no weights"),
        # Fails half-way, while writing weights: the temporary directory must be gone too.
        (
            "convert_internlm2_to_llama.py",
            wrong_shape,
            "attention.wqkv.weight has shape [128, 64], but config.json implies [96, 64]",
        ),
    ]
    for script, src, message in cases:
        dst = tmp_path / f"out-{src.name}"
        result = run_script(script, src, dst, "--quiet")
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # one line, no traceback
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_missing_tensor_is_named(tmp_path, tiny_internlm2_dir):
    src = Path(shutil.copytree(tiny_internlm2_dir, tmp_path / "src"))
    tensors = read_checkpoint(src)
    for path in src.glob("model*.safetensors*"):
        path.unlink()
    del tensors["model.layers.1.ffn_norm.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"lacks tensor model\.layers\.1\.ffn_norm\.weight"):
        convert(TO_LLAMA, src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_existing_dst_needs_force_and_verify_runs(tmp_path, tiny_internlm2_dir):
    src = make_tiny_bin_copy(tmp_path, tiny_internlm2_dir)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    refused = run_script("convert_internlm2_to_llama.py", src, dst)
    assert refused.returncode == 1 and "already exists (pass --force to replace it)" in refused.stderr
    assert (dst / "stale.txt").exists()

    before = listing(src)
    result = run_script("convert_internlm2_to_llama.py", src, dst, "--force", "--verify")
    assert result.returncode == 0, result.stderr
    assert "verify: max |logit difference|" in result.stderr
    assert "tensors" in result.stderr  # the progress bar
    assert not (dst / "stale.txt").exists() and (dst / "config.json").exists()
    assert listing(src) == before, "--verify wrote into SRC"
    assert leftovers(tmp_path) == []


def make_tiny_bin_copy(tmp_path: Path, tiny_internlm2_dir: Path) -> Path:
    """The default tiny checkpoint as a single pytorch_model.bin (the format get_model would rewrite)."""
    src = tmp_path / "src-bin"
    src.mkdir()
    for path in tiny_internlm2_dir.iterdir():
        if not path.name.startswith("model"):
            shutil.copy(path, src / path.name)
    torch.save(read_checkpoint(tiny_internlm2_dir), src / "pytorch_model.bin")
    return src


def test_failed_verification_leaves_no_dst(tmp_path, tiny_internlm2_dir, monkeypatch):
    from text_generation_server.utils import convert_checkpoint as module

    monkeypatch.setattr(module, "verify_tolerance", lambda src, out_dir: -1.0)  # nothing can pass
    with pytest.raises(ConversionError, match="verification failed"):
        convert(TO_LLAMA, tiny_internlm2_dir, tmp_path / "dst", verify=True)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []
