"""Grammars for constrained decoding, compiled with llguidance against one model's vocabulary.

A constrained request carries one grammar text in llguidance's own format (a Lark grammar, or the JSON form
that `grammar_from_*` below write). The router builds it from what the client asked for (a JSON schema, a
regex, a forced tool call) and checks it compiles, so a bad grammar is the client's 422; every shard compiles
the same text and, each step, masks the logits of the request's row to the tokens the grammar allows next,
then advances on the token chosen. Nothing here imports torch: the router uses this module too.

The grammar's vocabulary is the model's: every id below the model's vocab_size, a special token spelled as
its content after a 0xFF byte (so `<|action_start|>` in a Lark grammar names InternLM2's special token, and no
plain text can produce it), and the model's EOS ids, which the grammar allows once it is complete.

JSON is generated compact, in json.dumps's default style (", " between items, ": " after keys, no other
whitespace): a model cannot fill a reply with whitespace, and InternLM2 writes its tool calls this way.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import llguidance

from .tokenizer import Tokenizer

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar that does not compile; the message says why."""


def grammar_from_json_schema(schema: Any) -> str:
    """The grammar of JSON documents valid under `schema` (a dict, True, or the schema's JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise GrammarError(f"the JSON schema is not valid JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except ValueError as error:
        raise GrammarError(f"the JSON schema is not valid: {error}") from None


def grammar_from_regex(pattern: str) -> str:
    """The grammar of texts that match `pattern` whole (Rust `regex` syntax)."""
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def grammar_from_lark(source: str) -> str:
    """A Lark grammar (llguidance's dialect: `%json {...}` embeds a JSON schema, `<|name|>` a special token);
    llama.cpp's GBNF is accepted too."""
    try:
        return llguidance.grammar_from("grammar", source)
    except ValueError as error:
        raise GrammarError(str(error)) from None


def grammar_from_choices(choices: list[str]) -> str:
    """The grammar of exactly one of `choices`."""
    if not choices:
        raise GrammarError("the list of choices is empty")
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


class _PieceVocabulary:
    """What llguidance.TokenizerWrapper reads from a tokenizer that is not a tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int]):
        self.tokens = tokenizer.token_bytes()
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.special_token_ids)
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def grammar_vocabulary(tokenizer: Tokenizer, eos_token_ids: Iterable[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the model's vocabulary (vocab_size ids; these EOS ids end a complete grammar)."""
    eos = sorted(set(eos_token_ids))
    if not eos:
        raise ValueError("constrained decoding needs at least one EOS id")
    source = tokenizer.tokenizers_json()
    if source is not None:
        return llguidance.LLTokenizer(source, n_vocab=tokenizer.vocab_size, eos_token=eos)
    wrapper = llguidance.TokenizerWrapper(_PieceVocabulary(tokenizer, eos))
    return llguidance.LLTokenizer(wrapper, n_vocab=tokenizer.vocab_size, eos_token=eos)


class GrammarCompiler:
    """Compiled grammars of one vocabulary, the most recently used `capacity` of them kept by grammar text.

    `matcher(grammar)` compiles a grammar once and hands out fresh copies of it: the copy of a compiled matcher
    starts where it did and costs far less than compiling. Safe to call from several threads.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Iterable[int], capacity: int = 128):
        self._tokenizer = tokenizer
        self._eos_token_ids = tuple(eos_token_ids)
        self._vocabulary: llguidance.LLTokenizer | None = None  # built on first use: 0.12 s for 92544 pieces
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    @property
    def vocabulary(self) -> llguidance.LLTokenizer:
        if self._vocabulary is None:
            self._vocabulary = grammar_vocabulary(self._tokenizer, self._eos_token_ids)
        return self._vocabulary

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A matcher at the start of `grammar`; GrammarError naming the problem if it does not compile."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
            vocabulary = self.vocabulary
        compiled = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        if compiled.is_error():
            raise GrammarError(compiled.get_error())
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def check(self, grammar: str) -> None:
        """Raise GrammarError if `grammar` does not compile against this vocabulary."""
        self.matcher(grammar)
