"""TextStream, the router's text owner: generated ids to text pieces, stop sequences matched on the text."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from text_generation_router.text import PROMPT_CONTEXT, TextStream
from text_generation_common.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
CHAT_PROMPT = "<s><|im_start|>user\nTell me.<|im_end|>\n<|im_start|>assistant\n"
ENGLISH = " The quick brown fox jumps over the lazy dog. Hello world! How are you today?"
CHINESE = "你好，世界！龘鑫齉 and 𠀋 mixed with English words."


@pytest.fixture(scope="module")
def tokenizer(tiny_internlm2_dir: Path) -> Tokenizer:
    vocab = json.loads((tiny_internlm2_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    return Tokenizer.from_pretrained(tiny_internlm2_dir, vocab_size=vocab)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def is_byte_piece(tokenizer: Tokenizer, token_id: int) -> bool:
    return re.fullmatch(r"<0x[0-9A-F]{2}>", tokenizer.id_to_token(token_id)) is not None


def run(tokenizer: Tokenizer, prompt: list[int], generated: list[int], stops: tuple[str, ...] = ()):
    """(pieces pushed, piece flushed, stream), checking after every push that .text is the pieces joined."""
    stream = TextStream(tokenizer, prompt, stops)
    pieces = []
    for token_id in generated:
        pieces.append(stream.push(token_id))
        assert stream.text == "".join(pieces)
    flushed = stream.flush()
    assert stream.text == "".join(pieces) + flushed
    return pieces, flushed, stream


def added_in_context(tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> str:
    """What the ordinary generated ids add to the decode of the prompt's tail."""
    tail = list(prompt[-PROMPT_CONTEXT:])
    ordinary = [token_id for token_id in generated if token_id not in tokenizer.special_token_ids]
    before, after = tokenizer.decode(tail), tokenizer.decode(tail + ordinary)
    assert after.startswith(before)
    return after[len(before) :]


def first_stop(tokenizer: Tokenizer, generated: list[int], stops: tuple[str, ...], prompt=(1,)) -> int | None:
    """Index of the push after which `stopped` first became True (None if never); it never goes back."""
    stream = TextStream(tokenizer, list(prompt), stops)
    found = None
    for index, token_id in enumerate(generated):
        stream.push(token_id)
        if found is None and stream.stopped:
            found = index
        assert stream.stopped == (found is not None)
    return found


def reference_stop(pieces: list[str], stops: tuple[str, ...]) -> int | None:
    """The first index whose piece completes a stop sequence in the joined text (brute force)."""
    for index in range(len(pieces)):
        if any(stop in "".join(pieces[: index + 1]) for stop in stops):
            return index
    return None


# ------------------------------------------------------------------------------------------ pieces


def test_prompt_context_is_five_tokens():
    assert PROMPT_CONTEXT == 5


@pytest.mark.parametrize("generated_text", [ENGLISH, CHINESE, "answer<|im_end|>\n", "  two  spaces\n\n\tx "])
@pytest.mark.parametrize("prompt_text", [CHAT_PROMPT, "Hello", ""])
def test_text_derived_pieces_join_to_what_the_tokens_add(tokenizer: Tokenizer, prompt_text, generated_text):
    prompt, generated = encode(tokenizer, prompt_text), encode(tokenizer, generated_text)
    pieces, flushed, stream = run(tokenizer, prompt, generated)
    assert flushed == "" and not stream.stopped
    assert stream.text == added_in_context(tokenizer, prompt, generated)
    assert stream.text == tokenizer.decode(generated, skip_special_tokens=True)
    assert not any(REPLACEMENT in piece for piece in pieces)


def test_random_ids_join_to_what_they_add_in_context(tokenizer: Tokenizer):
    """Any ids, bytes and specials included: pieces + flush are what the ids add after the prompt's tail."""
    rng = random.Random(1234)
    every_id = range(tokenizer.vocab_size)
    # A prompt ending inside a UTF-8 character has no well-defined "added text": prompts have no byte pieces.
    whole_pieces = [i for i in every_id if not is_byte_piece(tokenizer, i)]
    for _ in range(150):
        prompt = [rng.choice(whole_pieces) for _ in range(rng.randrange(0, 9))]
        generated = [rng.choice(every_id) for _ in range(rng.randrange(1, 30))]
        pieces, flushed, stream = run(tokenizer, prompt, generated)
        assert stream.text == added_in_context(tokenizer, prompt, generated), (prompt, generated)


def test_only_the_last_prompt_tokens_are_context(tokenizer: Tokenizer):
    prompt = encode(tokenizer, "Hello world! How are you today? The quick brown")
    assert len(prompt) > PROMPT_CONTEXT
    generated = encode(tokenizer, " fox jumps")
    long_context, _, _ = run(tokenizer, prompt, generated)
    short_context, _, _ = run(tokenizer, prompt[-PROMPT_CONTEXT:], generated)
    assert long_context == short_context == [" fox", " jumps"]


def test_a_word_keeps_its_leading_space(tokenizer: Tokenizer):
    pieces, _, _ = run(tokenizer, encode(tokenizer, "Hello"), encode(tokenizer, " world the lazy dog"))
    assert pieces[0] == " world" and pieces[-1] == " dog"


# ------------------------------------------------------------------------------------------ UTF-8


@pytest.mark.parametrize("character", ["龘", "𠀋"])
def test_a_character_split_over_byte_pieces_comes_out_whole(tokenizer: Tokenizer, character: str):
    ids = encode(tokenizer, character)
    assert len(ids) == len(character.encode("utf-8")) and all(is_byte_piece(tokenizer, i) for i in ids)
    pieces, flushed, stream = run(tokenizer, [1], ids)
    assert pieces == [""] * (len(ids) - 1) + [character]
    assert flushed == "" and stream.text == character


def test_no_replacement_character_mid_stream(tokenizer: Tokenizer):
    generated = encode(tokenizer, "a龘b 𠀋c 鑫齉")
    assert sum(is_byte_piece(tokenizer, i) for i in generated) >= 10
    pieces, _, stream = run(tokenizer, encode(tokenizer, "Hello"), generated)
    assert not any(REPLACEMENT in piece for piece in pieces)
    assert stream.text == "a龘b 𠀋c 鑫齉"


def test_a_special_token_between_bytes_does_not_break_the_character(tokenizer: Tokenizer):
    first, *rest = encode(tokenizer, "龘")
    pieces, _, stream = run(tokenizer, [1], [first, tokenizer.token_to_id("<|im_end|>"), *rest])
    assert pieces == ["", "", "", "龘"] and stream.text == "龘"


def test_an_incomplete_character_at_the_end_comes_out_of_flush(tokenizer: Tokenizer):
    ids = encode(tokenizer, "ok龘")
    stream = TextStream(tokenizer, [1])
    assert [stream.push(i) for i in ids[:-1]] == ["ok", "", ""]
    flushed = stream.flush()
    assert flushed == tokenizer.decode(ids[-3:-1]) and flushed and set(flushed) == {REPLACEMENT}
    assert stream.text == "ok" + flushed == tokenizer.decode(ids[:-1])
    assert stream.flush() == "" and stream.text == "ok" + flushed  # nothing is held back twice


def test_flush_without_anything_held_back_is_empty(tokenizer: Tokenizer):
    stream = TextStream(tokenizer, [1])
    assert stream.flush() == ""
    assert [stream.push(i) for i in encode(tokenizer, "Hello world")] == ["Hello", " world"]
    assert stream.flush() == "" and stream.text == "Hello world"


# ------------------------------------------------------------------------------------------ special tokens


def test_special_tokens_carry_no_text(tokenizer: Tokenizer):
    specials = sorted(tokenizer.special_token_ids)
    assert {tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_token_id} <= set(specials)
    stream = TextStream(tokenizer, encode(tokenizer, CHAT_PROMPT))
    assert [stream.push(i) for i in specials] == [""] * len(specials)
    assert stream.flush() == "" and stream.text == ""


def test_special_tokens_do_not_appear_in_the_text(tokenizer: Tokenizer):
    generated = encode(tokenizer, "Hi there<|im_end|>\n<|im_start|>user") + [tokenizer.eos_token_id]
    pieces, _, stream = run(tokenizer, encode(tokenizer, CHAT_PROMPT), generated)
    assert [p for i, p in zip(generated, pieces) if i in tokenizer.special_token_ids] == ["", "", ""]
    assert stream.text == "Hi there\nuser"
    assert not any(name in stream.text for name in ("<|im_end|>", "</s>", "<|im_start|>", "<s>"))


# ------------------------------------------------------------------------------------------ stop sequences


def test_stop_sequence_spanning_two_tokens(tokenizer: Tokenizer):
    generated = encode(tokenizer, "Hello world! How are you")
    assert [tokenizer.decode([i]) for i in generated[:3]] == ["Hello", " world", "!"]
    assert first_stop(tokenizer, generated, ("lo wo",)) == 1
    assert first_stop(tokenizer, generated, ("d!",)) == 2


def test_stop_sequence_ending_inside_a_token(tokenizer: Tokenizer):
    generated = encode(tokenizer, " The quick brown fox")
    quick = [tokenizer.decode([i]) for i in generated].index(" quick")
    assert first_stop(tokenizer, generated, ("qu",)) == quick
    assert first_stop(tokenizer, generated, ("zzz", "uic")) == quick  # any of the stop sequences


def test_stop_text_stays_in_the_text_and_stopped_is_sticky(tokenizer: Tokenizer):
    generated = encode(tokenizer, "Hello world! How are you")
    pieces, _, stream = run(tokenizer, [1], generated, stops=("world",))
    assert stream.stopped and stream.text == "Hello world! How are you"
    assert first_stop(tokenizer, generated, ("world",)) == 1


def test_stop_sequence_with_a_character_split_over_bytes(tokenizer: Tokenizer):
    generated = encode(tokenizer, "a龘b")
    assert first_stop(tokenizer, generated, ("a龘",)) == 3  # the third byte of 龘 completes it


def test_stop_sequence_found_after_a_lot_of_text(tokenizer: Tokenizer):
    text = "the quick brown dog " * 300 + "and then STOP here"
    generated = encode(tokenizer, text)
    assert len(generated) > 1000

    def last_index_of(prefix: str) -> int:
        ids = encode(tokenizer, prefix)
        assert generated[: len(ids)] == ids
        return len(ids) - 1

    assert first_stop(tokenizer, generated, ("STOP",)) == last_index_of(text[: text.index("STOP") + 4])
    assert first_stop(tokenizer, generated, ("then ST",)) == last_index_of(text[: text.index("then ST") + 7])


def test_stop_sequence_not_found(tokenizer: Tokenizer):
    generated = encode(tokenizer, ENGLISH * 5 + CHINESE)
    pieces, flushed, stream = run(tokenizer, [1], generated, stops=("zebra", "lazy cat", "STOP"))
    assert not stream.stopped
    assert stream.text == "".join(pieces) + flushed == ENGLISH * 5 + CHINESE


def test_stop_sequence_longer_than_the_pieces_before_it(tokenizer: Tokenizer):
    generated = encode(tokenizer, "the quick brown fox jumps")
    assert [tokenizer.decode([i]) for i in generated] == ["t", "he", " quick", " brown", " fox", " jumps"]
    assert first_stop(tokenizer, generated, ("quick brown fox",)) == 4


def test_random_stop_sequences_are_found_where_they_first_appear(tokenizer: Tokenizer):
    rng = random.Random(7)
    words = ENGLISH.split() + ["龘", "鑫", "世界", "12", "345"]
    for _ in range(60):
        generated = encode(tokenizer, " ".join(rng.choice(words) for _ in range(rng.randrange(3, 25))))
        pieces, _, _ = run(tokenizer, [1], generated)
        text = "".join(pieces)
        start = rng.randrange(len(text))
        stop = text[start : start + rng.randrange(1, 30)]
        stops = (stop, "never there")
        assert first_stop(tokenizer, generated, stops) == reference_stop(pieces, stops), (generated, stop)


@pytest.mark.parametrize("stops, shown", [(("",), "''"), (("ok", ""), "''"), ((None,), "None")])
def test_empty_stop_sequences_are_rejected(tokenizer: Tokenizer, stops, shown: str):
    with pytest.raises(ValueError, match=shown):
        TextStream(tokenizer, [1], stops)
