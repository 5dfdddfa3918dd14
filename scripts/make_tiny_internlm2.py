#!/usr/bin/env python
"""Write a tiny random-weight InternLM2 checkpoint in the exact layout of `internlm/internlm2-chat-*`.

The output directory holds config.json, generation_config.json, the weights (safetensors or torch .bin,
optionally sharded with an index), a locally trained SentencePiece `tokenizer.model` whose last six ids are
the InternLM2 special tokens, tokenizer_config.json and special_tokens_map.json. No .py files are written:
the server must load InternLM2 natively.

Usage: python scripts/make_tiny_internlm2.py OUT_DIR [--hidden 64 --layers 2 ... --vocab 92544]
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2

# The transformers version the released internlm2 chat repos were saved with; written verbatim, not detected.
TRANSFORMERS_VERSION = "4.41.0"

# (raw sentencepiece piece, name given by tokenizer_config.json), in id order: they occupy ids V-6 .. V-1.
INTERNLM2_SPECIAL_TOKENS: tuple[tuple[str, str], ...] = (
    ("[UNUSED_TOKEN_141]", "<|plugin|>"),
    ("[UNUSED_TOKEN_142]", "<|interpreter|>"),
    ("[UNUSED_TOKEN_143]", "<|action_end|>"),
    ("[UNUSED_TOKEN_144]", "<|action_start|>"),
    ("[UNUSED_TOKEN_145]", "<|im_end|>"),
    ("[UNUSED_TOKEN_146]", "<|im_start|>"),
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Upper bound on the number of pieces the BPE trainer is asked for: the corpus is small, so asking for more
# only costs time; everything between the trained pieces and the specials is filled with UNUSED pieces.
MAX_TRAINED_PIECES = 900

TRAINING_CORPUS_EN = """\
The quick brown fox jumps over the lazy dog while the small cat watches from the window.
A language model reads a sequence of tokens and predicts the next token, one step at a time.
The server receives a request, encodes the prompt, runs the model and streams the generated text back.
When the weather is good we walk along the river, talk about books, and drink tea in the garden.
Numbers like 12, 345 and 2024 appear in the text, and so do dates, prices and phone numbers.
Attention lets every position look at the positions before it; the cache keeps keys and values.
Hello world! How are you today? I am fine, thank you. What would you like to know about the model?
The assistant answers the user politely, explains its reasoning, and says when it does not know.
Rotary embeddings rotate pairs of features by an angle that grows with the position of the token.
She opened the door, looked at the sky, and decided that it was a perfect day for a long journey.
Please write a short story about a robot who learns to paint pictures of the sea and the mountains.
In the morning the market is full of people buying bread, fruit, vegetables, fish and fresh flowers.
The tokenizer splits words into pieces; common words stay whole while rare words break into bytes.
Good software is simple, tested and easy to read, and every function does one clear thing well.
user assistant system environment plugin interpreter function parameters name content role
"""

TRAINING_CORPUS_ZH = """\
你好，世界！今天天气很好，我们一起去公园散步吧。
语言模型根据前面的文字预测下一个词，一次生成一个词。
我是一个人工智能助手，很高兴为你提供帮助。
上海人工智能实验室开发了书生浦语大模型。
请用中文回答这个问题，并给出详细的解释。
春天来了，花开了，小鸟在树上唱歌。
"""


def build_corpus() -> list[str]:
    """Training sentences; the English block is repeated so its merges dominate the small vocabulary."""
    english = [line for line in TRAINING_CORPUS_EN.splitlines() if line.strip()]
    chinese = [line for line in TRAINING_CORPUS_ZH.splitlines() if line.strip()]
    return english * 4 + chinese * 2


def train_sentencepiece(num_pieces: int) -> sp_model_pb2.ModelProto:
    """Train a deterministic BPE model with at most `num_pieces` pieces (ids 0/1/2 = <unk>/<s>/</s>)."""
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(build_corpus()),
        model_writer=model_bytes,
        model_type="bpe",
        vocab_size=num_pieces,
        # A soft limit: the small corpus may support fewer merges than asked for; the gap is padded later.
        hard_vocab_limit=False,
        byte_fallback=True,
        # InternLM2 inserts no dummy prefix: a piece right after a special token carries no "▁".
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        # Below 1 so that rare Chinese characters of the corpus fall back to byte pieces.
        character_coverage=0.995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = sp_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes.getvalue())
    return proto


def build_tokenizer_model(vocab: int) -> bytes:
    """Serialized SentencePiece model with exactly `vocab` pieces, the InternLM2 specials at the last six ids.

    The specials are USER_DEFINED pieces: sentencepiece always extracts a user-defined symbol found in the
    input as one piece (a CONTROL piece would never be matched in text, so "[UNUSED_TOKEN_146]" written in a
    prompt would be split into characters) and decodes it back to its surface text. This is how the
    Jan-2024 InternLM2 code could write "[UNUSED_TOKEN_146]user" in plain prompt strings.
    """
    num_specials = len(INTERNLM2_SPECIAL_TOKENS)
    min_vocab = 512
    if vocab < min_vocab:
        raise ValueError(
            f"vocab={vocab} is too small: need at least {min_vocab} (256 byte pieces + merges + 6 specials)"
        )
    proto = train_sentencepiece(min(vocab - num_specials, MAX_TRAINED_PIECES))
    trained = len(proto.pieces)
    if trained > vocab - num_specials:
        raise ValueError(f"sentencepiece produced {trained} pieces, more than vocab-6={vocab - num_specials}")
    lowest_score = min(piece.score for piece in proto.pieces)
    # Filler pieces keep the specials at V-6..V-1 for any vocab (92544 included); type UNUSED means the
    # encoder never emits them.
    for filler_index in range(vocab - num_specials - trained):
        piece = proto.pieces.add()
        piece.piece = f"[UNUSED_FILLER_{filler_index}]"
        piece.score = lowest_score - 1.0
        piece.type = sp_model_pb2.ModelProto.SentencePiece.UNUSED
    for raw_piece, _ in INTERNLM2_SPECIAL_TOKENS:
        piece = proto.pieces.add()
        piece.piece = raw_piece
        piece.score = 0.0
        piece.type = sp_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    assert len(proto.pieces) == vocab
    return proto.SerializeToString()


def added_token_entry(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_config(vocab: int) -> dict[str, object]:
    """tokenizer_config.json of internlm2-chat-*: `<|...|>` names live only here, not in tokenizer.model."""
    first_special_id = vocab - len(INTERNLM2_SPECIAL_TOKENS)
    added_tokens_decoder = {
        "0": added_token_entry("<unk>"),
        "1": added_token_entry("<s>"),
        "2": added_token_entry("</s>"),
    }
    for offset, (_, name) in enumerate(INTERNLM2_SPECIAL_TOKENS):
        added_tokens_decoder[str(first_special_id + offset)] = added_token_entry(name)
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [name for _, name in INTERNLM2_SPECIAL_TOKENS],
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_internlm2.InternLM2Tokenizer",
                "tokenization_internlm2_fast.InternLM2TokenizerFast",
            ]
        },
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def special_tokens_map() -> dict[str, object]:
    return {
        "additional_special_tokens": [name for _, name in INTERNLM2_SPECIAL_TOKENS],
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
    }


def model_config(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    max_pos: int,
    rope_theta: float,
    rope_scaling: dict | None,
    bias: bool,
    dtype: str,
) -> dict[str, object]:
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_pos,
        "model_type": "internlm2",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab,
    }


def random_linear(generator: torch.Generator, out_features: int, in_features: int) -> torch.Tensor:
    # std 1/sqrt(in) keeps unit-scale activations at unit scale, so logits stay well spread.
    return torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)


def random_norm(generator: torch.Generator, size: int) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(size, generator=generator)


def random_bias(generator: torch.Generator, size: int) -> torch.Tensor:
    return 0.02 * torch.randn(size, generator=generator)


def random_weights(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    bias: bool,
    seed: int,
) -> dict[str, torch.Tensor]:
    """float32 tensors under the InternLM2 checkpoint names, in checkpoint order."""
    head_dim = hidden // heads
    # wqkv rows: KV groups of (G query heads, 1 key head, 1 value head), each head D rows.
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {
        "model.tok_embeddings.weight": torch.randn(vocab, hidden, generator=generator),
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        weights[prefix + "attention_norm.weight"] = random_norm(generator, hidden)
        weights[prefix + "attention.wqkv.weight"] = random_linear(generator, qkv_rows, hidden)
        if bias:
            weights[prefix + "attention.wqkv.bias"] = random_bias(generator, qkv_rows)
        weights[prefix + "attention.wo.weight"] = random_linear(generator, hidden, heads * head_dim)
        if bias:
            weights[prefix + "attention.wo.bias"] = random_bias(generator, hidden)
        weights[prefix + "ffn_norm.weight"] = random_norm(generator, hidden)
        weights[prefix + "feed_forward.w1.weight"] = random_linear(generator, intermediate, hidden)
        weights[prefix + "feed_forward.w3.weight"] = random_linear(generator, intermediate, hidden)
        weights[prefix + "feed_forward.w2.weight"] = random_linear(generator, hidden, intermediate)
    weights["model.norm.weight"] = random_norm(generator, hidden)
    weights["output.weight"] = random_linear(generator, vocab, hidden)
    return weights


def split_into_shards(weights: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of roughly equal byte size; every shard gets at least one tensor."""
    names = list(weights)
    if shards > len(names):
        raise ValueError(f"shards={shards} exceeds the number of tensors ({len(names)})")
    total_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    target_bytes = total_bytes / shards
    groups: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for index, name in enumerate(names):
        tensors_left = len(names) - index
        shards_left = shards - len(groups)
        must_start_new = tensors_left == shards_left
        # Start the next shard once this one is full (or when the remaining tensors are just enough).
        if groups[-1] and shards_left > 0 and (filled >= target_bytes or must_start_new):
            groups.append({})
            filled = 0
        groups[-1][name] = weights[name]
        filled += weights[name].numel() * weights[name].element_size()
    assert len(groups) == shards
    return groups


def write_weights(out_dir: Path, weights: dict[str, torch.Tensor], *, format: str, shards: int) -> None:
    if format == "safetensors":
        stem, suffix, index_name = "model", "safetensors", "model.safetensors.index.json"
    elif format == "bin":
        stem, suffix, index_name = "pytorch_model", "bin", "pytorch_model.bin.index.json"
    else:
        raise ValueError(f"format={format!r} is not one of 'safetensors', 'bin'")
    if shards < 1:
        raise ValueError(f"shards={shards} must be >= 1")

    def save(tensors: dict[str, torch.Tensor], file_name: str) -> None:
        if format == "safetensors":
            save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        else:
            torch.save(tensors, out_dir / file_name)

    if shards == 1:
        save(weights, f"{stem}.{suffix}")
        return
    weight_map: dict[str, str] = {}
    for shard_index, group in enumerate(split_into_shards(weights, shards), start=1):
        file_name = f"{stem}-{shard_index:05d}-of-{shards:05d}.{suffix}"
        save(group, file_name)
        weight_map.update({name: file_name for name in group})
    total_size = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    write_json(out_dir / index_name, index)


def write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def validate_shape(*, hidden: int, heads: int, kv_heads: int, rope_scaling: dict | None) -> None:
    if hidden % heads != 0:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    if heads % kv_heads != 0:
        raise ValueError(f"heads={heads} is not divisible by kv_heads={kv_heads}")
    if (hidden // heads) % 2 != 0:
        raise ValueError(f"head_dim={hidden // heads} must be even for rotary embeddings")
    if rope_scaling is not None:
        if rope_scaling.get("type") not in ("dynamic", "linear"):
            raise ValueError(f"rope_scaling type {rope_scaling.get('type')!r} is not 'dynamic' or 'linear'")
        if float(rope_scaling.get("factor", 0.0)) < 1.0:
            raise ValueError(f"rope_scaling factor {rope_scaling.get('factor')!r} must be >= 1.0")


def make_tiny_internlm2(
    out_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 1000,
    max_pos: int = 512,
    rope_theta: float = 1e6,
    rope_scaling: dict | None = None,
    bias: bool = False,
    dtype: str = "float32",
    format: str = "safetensors",
    shards: int = 2,
    seed: int = 0,
) -> Path:
    """Write the checkpoint into `out_dir` (created if needed) and return it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    validate_shape(hidden=hidden, heads=heads, kv_heads=kv_heads, rope_scaling=rope_scaling)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    (out_dir / "tokenizer.model").write_bytes(build_tokenizer_model(vocab))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(vocab))
    write_json(out_dir / "special_tokens_map.json", special_tokens_map())
    im_end_id = vocab - 2
    write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": 1,
            "eos_token_id": [2, im_end_id],
            "pad_token_id": 2,
            "transformers_version": TRANSFORMERS_VERSION,
        },
    )
    config = model_config(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        max_pos=max_pos,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        bias=bias,
        dtype=dtype,
    )
    write_json(out_dir / "config.json", config)

    weights = random_weights(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        bias=bias,
        seed=seed,
    )
    weights = {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in weights.items()}
    write_weights(out_dir, weights, format=format, shards=shards)
    return out_dir


def parse_rope_scaling(text: str) -> dict | None:
    """'none' -> None; 'dynamic:2.0' -> {"type": "dynamic", "factor": 2.0}."""
    if text.lower() in ("none", "null", ""):
        return None
    kind, separator, factor = text.partition(":")
    if not separator:
        raise argparse.ArgumentTypeError(
            f"--rope-scaling {text!r}: expected none, dynamic:FACTOR or linear:FACTOR"
        )
    try:
        factor_value = float(factor)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--rope-scaling {text!r}: factor {factor!r} is not a number"
        ) from error
    return {"type": kind, "factor": factor_value}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--max-pos", type=int, default=512)
    parser.add_argument("--rope-theta", type=float, default=1e6)
    parser.add_argument("--rope-scaling", type=parse_rope_scaling, default=None)
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    out_dir = make_tiny_internlm2(
        args.out_dir,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        max_pos=args.max_pos,
        rope_theta=args.rope_theta,
        rope_scaling=args.rope_scaling,
        bias=args.bias,
        dtype=args.dtype,
        format=args.format,
        shards=args.shards,
        seed=args.seed,
    )
    print(out_dir)


if __name__ == "__main__":
    main()
