"""A native tokenizer for the server: no transformers, no trust_remote_code.

Two backends, chosen by what the model directory holds:

* `tokenizer.json` -> the `tokenizers` library, which handles its own added tokens when encoding and decoding;
* `tokenizer.model` -> `sentencepiece`; added tokens (from tokenizer_config.json) are split out of the
  text here, longest match first, and the text between them goes to sentencepiece unchanged. This is what
  InternLM2's own slow tokenizer does (`sp_model.encode` on each piece of text; no dummy prefix from us).

tokenizer_config.json (falling back to special_tokens_map.json) supplies what the raw model files lack: the
`<|im_end|>`-style names of InternLM2's special tokens (raw sentencepiece calls them `[UNUSED_TOKEN_145]`),
special flags, bos/eos strings, add_bos_token / add_eos_token and the chat template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

REPLACEMENT_CHARACTER = "\ufffd"
SENTENCEPIECE_SPACE = "\u2581"  # "▁": sentencepiece's spelling of a space inside a piece


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in text and rendered verbatim in output."""

    id: int
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False


class _Backend(Protocol):
    # True when encode() already recognises added tokens in text (tokenizers does; sentencepiece does not).
    handles_added_tokens: bool

    @property
    def size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def piece_to_id(self, piece: str) -> int | None: ...


class _SentencePieceBackend:
    handles_added_tokens = False

    def __init__(self, model_file: Path) -> None:
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    @property
    def size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text, out_type=int))

    def decode(self, ids: list[int]) -> str:
        # sentencepiece joins byte-fallback pieces into UTF-8 and turns "▁" into spaces; an incomplete byte
        # sequence becomes U+FFFD.
        return self.processor.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        # piece_to_id answers the unk id for unknown pieces; only a round trip proves the piece exists.
        token_id = self.processor.piece_to_id(piece)
        return token_id if self.processor.id_to_piece(token_id) == piece else None

    def piece_bytes(self, token_id: int) -> bytes:
        """What the piece adds to a text: its bytes with "▁" as a space, a byte piece's one byte, and nothing
        for pieces that never reach a text (control, unknown and unused pieces)."""
        processor = self.processor
        if processor.is_byte(token_id):
            return bytes([int(processor.id_to_piece(token_id)[3:5], 16)])  # "<0x0A>"
        if processor.is_control(token_id) or processor.is_unknown(token_id) or processor.is_unused(token_id):
            return b""
        return processor.id_to_piece(token_id).replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")

    def control_tokens(self) -> list[AddedToken]:
        """unk/bos/eos as sentencepiece defines them (ids < 0 mean absent)."""
        tokens = []
        for token_id in (self.processor.unk_id(), self.processor.bos_id(), self.processor.eos_id()):
            if token_id >= 0:
                tokens.append(AddedToken(token_id, self.processor.id_to_piece(token_id), special=True))
        return tokens


class _TokenizersBackend:
    handles_added_tokens = True

    def __init__(self, tokenizer_file: Path) -> None:
        import tokenizers

        self.tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))

    @property
    def size(self) -> int:
        # Ids may have holes; the size is what an embedding table must cover.
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    def encode(self, text: str) -> list[int]:
        # bos/eos are added by Tokenizer.encode from the config flags, never by the post-processor.
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in tokenizer.json")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self.tokenizer.token_to_id(piece)

    def register(self, token: AddedToken) -> None:
        """Make tokenizers match `token` in text; its id must come out as the config says."""
        import tokenizers

        known_id = self.tokenizer.token_to_id(token.content)
        if known_id is None:
            added = tokenizers.AddedToken(
                token.content,
                special=token.special,
                normalized=False,
                lstrip=token.lstrip,
                rstrip=token.rstrip,
            )
            self.tokenizer.add_tokens([added])
            known_id = self.tokenizer.token_to_id(token.content)
        if known_id != token.id:
            raise ValueError(
                f"tokenizer_config.json gives {token.content!r} id {token.id}, "
                f"but tokenizer.json maps it to {known_id}"
            )

    def serialized(self) -> str:
        """tokenizer.json as it is now, with the added tokens registered from tokenizer_config.json."""
        return self.tokenizer.to_str()

    def probe_post_processor(self) -> list[int]:
        """Ids the post-processor adds around an empty text (e.g. [bos] for Llama-style tokenizer.json)."""
        return list(self.tokenizer.encode("", add_special_tokens=True).ids)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        payload = json.load(handle)
    if not isinstance(payload, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(payload).__name__}")
    return payload


def _token_content(value: object) -> str | None:
    """bos_token & co. are a string or, in older configs, an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token entry {value!r} is neither a string nor a dict with 'content'")


def _added_tokens_from_config(config: dict) -> list[AddedToken]:
    entries = config.get("added_tokens_decoder") or {}
    tokens = []
    for raw_id, entry in entries.items():
        try:
            token_id = int(raw_id)
        except ValueError as error:
            raise ValueError(f"added_tokens_decoder key {raw_id!r} is not an integer id") from error
        content = _token_content(entry)
        if content is None:
            raise ValueError(f"added_tokens_decoder[{raw_id!r}] has no content")
        flags = entry if isinstance(entry, dict) else {}
        tokens.append(
            AddedToken(
                id=token_id,
                content=content,
                special=bool(flags.get("special", False)),
                lstrip=bool(flags.get("lstrip", False)),
                rstrip=bool(flags.get("rstrip", False)),
            )
        )
    return tokens


def _read_chat_template(model_dir: Path, config: dict) -> str | None:
    """Raw template string: chat_template.jinja wins over the config entry (as in transformers)."""
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        # Newer configs store named templates: [{"name": "default", "template": "..."}, ...].
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default")
    raise ValueError(f"chat_template has unexpected type {type(template).__name__}")


class Tokenizer:
    """Text <-> ids for one model; every id it returns is < `vocab_size` (the model's embedding rows)."""

    def __init__(
        self,
        backend: _Backend,
        added_tokens: Sequence[AddedToken],
        *,
        vocab_size: int | None,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool,
        add_eos_token: bool,
        chat_template: str | None,
        extra_special_ids: Sequence[int] = (),
    ) -> None:
        self._backend = backend
        self._added_by_id: dict[int, AddedToken] = {token.id: token for token in added_tokens}
        self._added_by_content: dict[str, AddedToken] = {token.content: token for token in added_tokens}
        # Alternatives longest first: at a given position the regex takes the first alternative that matches,
        # so "<|im_start|>" wins over any added token that is a prefix of it.
        longest_first = sorted(self._added_by_content, key=len, reverse=True)
        self._added_pattern: re.Pattern[str] | None = (
            re.compile("|".join(re.escape(content) for content in longest_first)) if longest_first else None
        )
        own_size = max([backend.size, *(token.id + 1 for token in added_tokens)])
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size} must be positive")
        self._own_size = own_size
        self.vocab_size: int = own_size if vocab_size is None else vocab_size
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: int | None = self.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id: int | None = self.token_to_id(eos_token) if eos_token is not None else None
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        special = {token.id for token in added_tokens if token.special} | set(extra_special_ids)
        special |= {token_id for token_id in (self.bos_token_id, self.eos_token_id) if token_id is not None}
        self.special_token_ids: frozenset[int] = frozenset(special)

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, model_dir: Path, vocab_size: int | None = None, chat_template: str | None = None
    ) -> Tokenizer:
        """`chat_template`: a template that replaces the model's own (the router's --chat-template)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"tokenizer directory {model_dir} does not exist")
        config = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")

        def setting(key: str) -> object:
            return config[key] if key in config else special_map.get(key)

        added_tokens = _added_tokens_from_config(config)
        tokenizer_json = model_dir / "tokenizer.json"
        sentencepiece_model = model_dir / "tokenizer.model"
        if tokenizer_json.is_file():
            backend: _Backend = _TokenizersBackend(tokenizer_json)
            for token in added_tokens:
                backend.register(token)
            # tokenizer.json's own added tokens (names, special flags) count too; the config wins conflicts.
            from_json = [
                AddedToken(
                    token_id, added.content, special=added.special, lstrip=added.lstrip, rstrip=added.rstrip
                )
                for token_id, added in backend.tokenizer.get_added_tokens_decoder().items()
            ]
            added_tokens = _merge_added_tokens(from_json, added_tokens)
        elif sentencepiece_model.is_file():
            backend = _SentencePieceBackend(sentencepiece_model)
            added_tokens = _merge_added_tokens(backend.control_tokens(), added_tokens)
        else:
            raise FileNotFoundError(f"{model_dir} has neither tokenizer.json nor tokenizer.model")

        bos_token = _token_content(setting("bos_token"))
        eos_token = _token_content(setting("eos_token"))
        if isinstance(backend, _SentencePieceBackend):
            # Without a config, sentencepiece's own control pieces are bos/eos (ids 1/2 for Llama/InternLM2).
            processor = backend.processor
            if bos_token is None and processor.bos_id() >= 0:
                bos_token = processor.id_to_piece(processor.bos_id())
            if eos_token is None and processor.eos_id() >= 0:
                eos_token = processor.id_to_piece(processor.eos_id())

        add_bos_token, add_eos_token = cls._special_token_flags(config, backend, bos_token, eos_token)
        extra_special_ids = cls._additional_special_ids(
            setting("additional_special_tokens"), backend, added_tokens
        )
        tokenizer = cls(
            backend,
            added_tokens,
            vocab_size=vocab_size,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            chat_template=chat_template if chat_template is not None else _read_chat_template(model_dir, config),
            extra_special_ids=extra_special_ids,
        )
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} from {model_dir} is not in the vocabulary")
        return tokenizer

    @staticmethod
    def _special_token_flags(
        config: dict, backend: _Backend, bos_token: str | None, eos_token: str | None
    ) -> tuple[bool, bool]:
        """add_bos_token / add_eos_token: the config when it says; otherwise what the backend implies.

        A sentencepiece (Llama-style) tokenizer adds bos by default. A tokenizer.json says it through its
        post-processor, which is probed on an empty text.
        """
        if isinstance(backend, _TokenizersBackend):
            probe = backend.probe_post_processor()
            bos_id = backend.piece_to_id(bos_token) if bos_token is not None else None
            eos_id = backend.piece_to_id(eos_token) if eos_token is not None else None
            default_bos = bos_id is not None and probe[:1] == [bos_id]
            default_eos = eos_id is not None and probe[-1:] == [eos_id]
        else:
            default_bos, default_eos = True, False
        add_bos = config.get("add_bos_token", default_bos)
        add_eos = config.get("add_eos_token", default_eos)
        for name, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} in tokenizer_config.json must be true or false")
        return add_bos, add_eos

    @staticmethod
    def _additional_special_ids(
        names: object, backend: _Backend, added_tokens: Sequence[AddedToken]
    ) -> list[int]:
        if names is None:
            return []
        if not isinstance(names, list):
            raise ValueError(f"additional_special_tokens must be a list, got {names!r}")
        by_content = {token.content: token.id for token in added_tokens}
        ids = []
        for entry in names:
            content = _token_content(entry)
            token_id = by_content.get(content) if content in by_content else backend.piece_to_id(content)
            if token_id is None:
                raise ValueError(f"additional special token {content!r} is not in the vocabulary")
            ids.append(token_id)
        return ids

    # ------------------------------------------------------------------------------------- lookups

    def token_to_id(self, token: str) -> int | None:
        added = self._added_by_content.get(token)
        if added is not None:
            return added.id
        return self._backend.piece_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        self._check_known_id(token_id)
        added = self._added_by_id.get(token_id)
        return added.content if added is not None else self._backend.id_to_piece(token_id)

    def _check_known_id(self, token_id: int) -> None:
        if not 0 <= token_id < self._own_size:
            raise ValueError(
                f"token id {token_id} is outside the tokenizer's vocabulary of {self._own_size} ids"
            )

    # -------------------------------------------------------------------------- for grammar engines

    def tokenizers_json(self) -> str | None:
        """The whole tokenizer as tokenizer.json (added tokens included) when the `tokenizers` library backs it."""
        return self._backend.serialized() if isinstance(self._backend, _TokenizersBackend) else None

    def token_bytes(self) -> list[bytes]:
        """For a sentencepiece tokenizer: per id, the bytes the token adds to a text. A special token is its
        content after a 0xFF byte (a byte no UTF-8 text holds, so no text can spell it); ids the model has
        beyond the tokenizer's own, and pieces that never reach a text, are b""."""
        if not isinstance(self._backend, _SentencePieceBackend):
            raise ValueError("token_bytes needs a sentencepiece tokenizer; use tokenizers_json() for tokenizer.json")
        pieces = []
        for token_id in range(self.vocab_size):
            added = self._added_by_id.get(token_id)
            if token_id in self.special_token_ids:
                pieces.append(b"\xff" + self.id_to_token(token_id).encode("utf-8"))
            elif added is not None:
                pieces.append(added.content.encode("utf-8"))
            elif token_id < self._backend.size:
                pieces.append(self._backend.piece_bytes(token_id))
            else:
                pieces.append(b"")
        return pieces

    # ------------------------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if self._backend.handles_added_tokens:
            ids = self._backend.encode(text)
        else:
            ids = self._encode_splitting_added_tokens(text)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        for token_id in ids:
            if token_id >= self.vocab_size:
                raise ValueError(
                    f"encoding produced token id {token_id}, outside the model vocab_size {self.vocab_size}"
                )
        return ids

    def _encode_splitting_added_tokens(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment in self._split_on_added_tokens(text):
            if isinstance(segment, AddedToken):
                ids.append(segment.id)
            elif segment:
                ids.extend(self._backend.encode(segment))
        return ids

    def _split_on_added_tokens(self, text: str) -> list[str | AddedToken]:
        """Text segments and added tokens in order, scanning left to right, longest token first at each spot.

        lstrip/rstrip on an added token eat the whitespace on that side of it (as transformers does).
        """
        if self._added_pattern is None:
            return [text]
        segments: list[str | AddedToken] = []
        start = 0  # beginning of the pending plain-text segment
        for match in self._added_pattern.finditer(text):
            token = self._added_by_content[match.group()]
            pending = text[start : match.start()]
            segments.append(pending.rstrip() if token.lstrip else pending)
            segments.append(token)
            start = match.end()
            if token.rstrip:
                while start < len(text) and text[start].isspace():
                    start += 1
        segments.append(text[start:])
        return segments

    # ------------------------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        for token_id in ids:
            self._check_known_id(token_id)
        if skip_special_tokens:
            ids = [token_id for token_id in ids if token_id not in self.special_token_ids]
        ids = list(ids)
        if self._backend.handles_added_tokens:
            return self._backend.decode(ids)
        return self._decode_runs(ids)

    def _decode_runs(self, ids: list[int]) -> str:
        """Runs of ordinary ids go to the backend together (so byte-fallback pieces join into UTF-8);
        added tokens are rendered by their content ("<|im_end|>", not "[UNUSED_TOKEN_145]")."""
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            added = self._added_by_id.get(token_id)
            if added is None:
                run.append(token_id)
                continue
            if run:
                parts.append(self._backend.decode(run))
                run = []
            parts.append(added.content)
        if run:
            parts.append(self._backend.decode(run))
        return "".join(parts)

    def decode_incremental(
        self, ids: Sequence[int], prefix_offset: int, read_offset: int
    ) -> tuple[str, int, int]:
        """Text that ids[read_offset:] add to the stream, and the offsets for the next call.

        Decoding a window that starts a few tokens back (prefix_offset) keeps the spaces that sentencepiece
        derives from context; text ending in U+FFFD is an incomplete UTF-8 sequence and is held back until
        the next ids complete it. Special tokens are not skipped.
        """
        if not 0 <= prefix_offset <= read_offset <= len(ids):
            raise ValueError(
                f"need 0 <= prefix_offset ({prefix_offset}) <= read_offset ({read_offset}) "
                f"<= len(ids) ({len(ids)})"
            )
        previous_text = self.decode(ids[prefix_offset:read_offset])
        new_text = self.decode(ids[prefix_offset:])
        if len(new_text) > len(previous_text) and not new_text.endswith(REPLACEMENT_CHARACTER):
            return new_text[len(previous_text) :], read_offset, len(ids)
        return "", prefix_offset, read_offset


def _merge_added_tokens(base: Sequence[AddedToken], overrides: Sequence[AddedToken]) -> list[AddedToken]:
    """Union by id; an override replaces the base token with the same id."""
    merged = {token.id: token for token in base}
    merged.update({token.id: token for token in overrides})
    return [merged[token_id] for token_id in sorted(merged)]
