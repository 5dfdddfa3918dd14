"""The native tokenizer against transformers' sentencepiece-backed (slow) tokenizer, same tokenizer.model.

Reference: transformers 5.x removed the slow `LlamaTokenizer` (the name now means the tokenizers-backed
class). What is left of the slow path is `SentencePieceBackend`, a `PreTrainedTokenizer` that calls
`sp_model.encode` on the text between added tokens, exactly as InternLM2's remote `InternLM2Tokenizer` does.
It is loaded with `legacy=True` (no "▁" prefix trick), `special_tokens_pattern="bos"` (prepend bos, as
add_bos_token=True) and the same tokenizer_config.json, so the `<|...|>` added tokens keep their ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
import sentencepiece

from conftest import make_tiny
from text_generation_common.tokenizer import Tokenizer

VOCAB = 1000
IM_START, IM_END = VOCAB - 1, VOCAB - 2

ENGLISH = "Hello world! How are you today? The quick brown fox jumps over the lazy dog, 12 345 times."
CHINESE = "你好，世界！我是人工智能助手。龘鑫 are rare characters: 齉 and 𠀋."
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! 你好，世界龘"},
    {"role": "assistant", "content": "Hi, how can I help you today?"},
    {"role": "user", "content": "Tell me a story about the sea."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_internlm2_dir)


@pytest.fixture(scope="module")
def reference(tiny_internlm2_dir: Path):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    # sp_model_kwargs: the InternLM2 config says null, which SentencePieceBackend cannot take.
    return SentencePieceBackend.from_pretrained(
        str(tiny_internlm2_dir), legacy=True, special_tokens_pattern="bos", sp_model_kwargs={}
    )


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    return (
        jinja2.Environment()
        .from_string(template)
        .render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
        )
    )


def byte_fallback_count(model_dir: Path, ids: list[int]) -> int:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return sum(processor.is_byte(token_id) for token_id in ids)


# ---------------------------------------------------------------------------------------- loading


def test_loads_config_values(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert tokenizer.chat_template is not None and tokenizer.chat_template.startswith("{{ bos_token }}")
    assert tokenizer.special_token_ids == frozenset({0, 1, 2, *range(VOCAB - 6, VOCAB)})
    assert tokenizer.token_to_id("<|im_end|>") == IM_END
    assert tokenizer.token_to_id("<|im_start|>") == IM_START
    assert tokenizer.id_to_token(IM_END) == "<|im_end|>"
    assert tokenizer.id_to_token(VOCAB - 6) == "<|plugin|>"
    assert tokenizer.token_to_id("no such piece") is None


def test_missing_files_are_named(tmp_path: Path, tiny_internlm2_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json nor tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path / "empty")


def test_without_tokenizer_config_falls_back_to_sentencepiece(
    tmp_path: Path, tiny_internlm2_dir: Path
) -> None:
    shutil.copy(tiny_internlm2_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    bare = Tokenizer.from_pretrained(tmp_path)
    assert (bare.bos_token_id, bare.eos_token_id, bare.chat_template) == (1, 2, None)
    # Without the config the specials only have their raw sentencepiece names.
    assert bare.id_to_token(IM_END) == "[UNUSED_TOKEN_145]"
    assert bare.encode("[UNUSED_TOKEN_145]", add_special_tokens=False) == [IM_END]


# --------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    "text", [ENGLISH, CHINESE, "  leading and  double spaces\n\nnew lines\tand tab ", ""]
)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_equal_transformers_reference(
    tokenizer: Tokenizer, reference, text: str, add_special_tokens: bool
) -> None:
    assert tokenizer.encode(text, add_special_tokens) == reference.encode(
        text, add_special_tokens=add_special_tokens
    )


def test_tokenizers_backed_llama_tokenizer_agrees_on_plain_text(
    tokenizer: Tokenizer, tiny_internlm2_dir: Path
) -> None:
    """transformers' LlamaTokenizer (tokenizers backend, converted from tokenizer.model) agrees on plain text
    once its dummy prefix is turned off. It is not the reference for added tokens: the conversion gives
    `<|im_start|>` a new id past the vocabulary instead of the id from added_tokens_decoder."""
    from transformers import LlamaTokenizer

    converted = LlamaTokenizer.from_pretrained(str(tiny_internlm2_dir), add_prefix_space=False)
    for text in (ENGLISH, CHINESE, "  two  spaces\n\n"):
        assert tokenizer.encode(text) == converted.encode(text)


def test_chinese_rare_characters_fall_back_to_bytes(tokenizer: Tokenizer, tiny_internlm2_dir: Path) -> None:
    ids = tokenizer.encode("龘鑫𠀋", add_special_tokens=False)
    assert byte_fallback_count(tiny_internlm2_dir, ids) == len(ids) == 3 + 3 + 4
    assert tokenizer.decode(ids) == "龘鑫𠀋"


def test_chat_template_matches_reference_without_double_bos(tokenizer: Tokenizer, reference) -> None:
    assert tokenizer.chat_template is not None
    text = render_chat(tokenizer.chat_template, MESSAGES)
    assert text.startswith("<s><|im_start|>system\nYou are")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ids[:2] == [1, IM_START] and ids[2] != 1
    assert ids.count(IM_START) == len(MESSAGES) + 1 and ids.count(IM_END) == len(MESSAGES)
    # Pieces after a special token carry no "▁": "<|im_start|>user" starts with the piece for "user".
    user_at = ids.index(IM_START, 2)
    assert not tokenizer.id_to_token(ids[user_at + 1]).startswith("▁")
    generation_prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert generation_prompt[0] == IM_START and ids[-len(generation_prompt) :] == generation_prompt
    assert tokenizer.decode(ids) == text


def test_im_end_is_one_id_and_round_trips(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [IM_END]
    ids = tokenizer.encode("done<|im_end|>\n<|im_start|>user", add_special_tokens=False)
    assert IM_END in ids and IM_START in ids
    assert tokenizer.decode([IM_END]) == "<|im_end|>"
    assert tokenizer.decode(ids) == "done<|im_end|>\n<|im_start|>user"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "done\nuser"
    assert (
        tokenizer.decode([1, *ids, 2], skip_special_tokens=False) == "<s>done<|im_end|>\n<|im_start|>user</s>"
    )
    assert tokenizer.decode([1, *ids, 2], skip_special_tokens=True) == "done\nuser"


def test_decode_matches_sentencepiece_and_round_trips(tokenizer: Tokenizer, tiny_internlm2_dir: Path) -> None:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tiny_internlm2_dir / "tokenizer.model"))
    for text in (ENGLISH, CHINESE, " leading space"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == processor.decode(ids) == text


def test_no_id_beyond_model_vocab(tiny_internlm2_dir: Path) -> None:
    # A model with fewer embedding rows than the tokenizer has pieces: the specials would be out of range.
    small = Tokenizer.from_pretrained(tiny_internlm2_dir, vocab_size=VOCAB - 6)
    assert small.encode(ENGLISH)  # ordinary text stays in range
    with pytest.raises(ValueError, match=rf"{IM_START}.*vocab_size {VOCAB - 6}"):
        small.encode("<|im_start|>user")
    with pytest.raises(ValueError, match="vocab_size=0"):
        Tokenizer.from_pretrained(tiny_internlm2_dir, vocab_size=0)


def test_decode_rejects_unknown_ids(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=f"token id {VOCAB}"):
        tokenizer.decode([5, VOCAB])
    with pytest.raises(ValueError, match="token id -1"):
        tokenizer.id_to_token(-1)


def test_vocab_92544_special_ids(tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir = make_tiny(tmp_path_factory, "vocab92544", vocab=92544, layers=1, shards=1)
    big = Tokenizer.from_pretrained(model_dir)
    assert big.vocab_size == 92544
    assert big.encode("<s><|im_start|>user\n", add_special_tokens=False)[:2] == [1, 92543]
    assert big.encode("<|im_end|>", add_special_tokens=False) == [92542]
    assert [big.id_to_token(i) for i in range(92538, 92544)] == [
        "<|plugin|>",
        "<|interpreter|>",
        "<|action_end|>",
        "<|action_start|>",
        "<|im_end|>",
        "<|im_start|>",
    ]


# -------------------------------------------------------------------------------------- streaming


def stream(tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> list[str]:
    """Feed generated ids one at a time the way the server does; return every emitted chunk."""
    ids = list(prompt)
    prefix_offset, read_offset = max(len(prompt) - 5, 0), len(prompt)
    chunks = []
    for token_id in generated:
        ids.append(token_id)
        text, prefix_offset, read_offset = tokenizer.decode_incremental(ids, prefix_offset, read_offset)
        chunks.append(text)
    return chunks


@pytest.mark.parametrize(
    "generated_text",
    [
        " The quick brown fox jumps over the lazy dog. Hello world!",
        "你好，世界！龘鑫齉 and 𠀋 mixed with English words.",
        "answer<|im_end|>\n",
    ],
)
@pytest.mark.parametrize(
    "prompt_text", ["<s><|im_start|>user\nTell me.<|im_end|>\n<|im_start|>assistant\n", ""]
)
def test_streaming_concatenation_equals_decode(
    tokenizer: Tokenizer, prompt_text: str, generated_text: str
) -> None:
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    generated = tokenizer.encode(generated_text, add_special_tokens=False)
    chunks = stream(tokenizer, prompt, generated)
    assert "".join(chunks) == tokenizer.decode(generated) == generated_text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_streaming_keeps_spaces_and_holds_partial_utf8(
    tokenizer: Tokenizer, tiny_internlm2_dir: Path
) -> None:
    words = tokenizer.encode(" the lazy dog", add_special_tokens=False)
    assert stream(tokenizer, [1], words)[-1].startswith(" ")
    rare = tokenizer.encode("龘", add_special_tokens=False)  # three byte pieces
    assert byte_fallback_count(tiny_internlm2_dir, rare) == 3
    assert stream(tokenizer, [1], rare) == ["", "", "龘"]


def test_decode_incremental_rejects_bad_offsets(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="prefix_offset"):
        tokenizer.decode_incremental([1, 2, 3], 3, 2)


# --------------------------------------------------------------------------------- tokenizer.json


def build_tokenizer_json(model_dir: Path, extra_added: dict[str, int] | None = None) -> dict:
    """A tokenizers BPE equivalent of tokenizer.model, with the `<|...|>` names at the special ids.

    Vocab and merges come from transformers' SentencePieceExtractor (the same extraction its converters use).
    """
    import tokenizers
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    vocab, _, merges = SentencePieceExtractor(str(model_dir / "tokenizer.model")).extract()
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    names = {int(token_id): entry["content"] for token_id, entry in config["added_tokens_decoder"].items()}
    # Rename raw pieces ([UNUSED_TOKEN_145] -> <|im_end|>) so the added tokens reuse the same ids.
    by_id = {token_id: piece for piece, token_id in vocab.items()}
    vocab = {names.get(token_id, piece): token_id for token_id, piece in by_id.items()}
    backend = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    # No dummy prefix, like the sentencepiece model: spaces become "▁", nothing is prepended.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(
        [tokenizers.AddedToken(names[token_id], special=True, normalized=False) for token_id in sorted(names)]
    )
    for content, expected_id in (extra_added or {}).items():
        backend.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])
        assert backend.token_to_id(content) == expected_id
    return json.loads(backend.to_str())


@pytest.fixture(scope="module")
def json_dir(tiny_internlm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("with-tokenizer-json")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_internlm2_dir / name, copy / name)
    (copy / "tokenizer.json").write_text(
        json.dumps(build_tokenizer_json(tiny_internlm2_dir)), encoding="utf-8"
    )
    return copy


def test_tokenizer_json_backend_gives_same_ids(tokenizer: Tokenizer, json_dir: Path) -> None:
    from_json = Tokenizer.from_pretrained(json_dir)
    assert from_json.vocab_size == VOCAB
    assert (from_json.bos_token_id, from_json.eos_token_id) == (1, 2)
    assert from_json.special_token_ids == tokenizer.special_token_ids
    chat = render_chat(tokenizer.chat_template or "", MESSAGES)
    for text in (ENGLISH, CHINESE, chat, "  two  spaces\n\n"):
        for add_special_tokens in (True, False):
            assert from_json.encode(text, add_special_tokens) == tokenizer.encode(text, add_special_tokens), (
                text
            )
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert from_json.decode(ids) == tokenizer.decode(ids) == text
        assert from_json.decode(ids, skip_special_tokens=True) == tokenizer.decode(
            ids, skip_special_tokens=True
        )
    generated = tokenizer.encode(CHINESE, add_special_tokens=False)
    assert "".join(stream(from_json, [1], generated)) == CHINESE


def test_tokenizer_json_id_beyond_model_vocab_raises(tiny_internlm2_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_internlm2_dir / name, tmp_path / name)
    payload = build_tokenizer_json(tiny_internlm2_dir, extra_added={"<|extra|>": VOCAB})
    (tmp_path / "tokenizer.json").write_text(json.dumps(payload), encoding="utf-8")
    extended = Tokenizer.from_pretrained(tmp_path, vocab_size=VOCAB)
    assert extended.encode("hello", add_special_tokens=False)
    with pytest.raises(ValueError, match=rf"token id {VOCAB}, outside the model vocab_size {VOCAB}"):
        extended.encode("hello <|extra|>")


def test_tokenizer_json_conflicting_config_id_raises(tiny_internlm2_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_internlm2_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text(
        json.dumps(build_tokenizer_json(tiny_internlm2_dir)), encoding="utf-8"
    )
    config = json.loads((tiny_internlm2_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"][str(VOCAB - 3)]["content"] = "<|im_end|>"  # clashes with id VOCAB-2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="<|im_end|>"):
        Tokenizer.from_pretrained(tmp_path)
