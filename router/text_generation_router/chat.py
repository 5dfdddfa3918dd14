"""Chat prompts: the model's own `chat_template`, rendered the way transformers renders it.

transformers compiles the template in an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
with the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text, and the globals
`raise_exception` and `strftime_now`; it renders with `messages`, `add_generation_prompt` and the special
tokens (`bos_token`, `eos_token`, ...). The rendered text already holds the template's `bos_token`, so it is
encoded with `add_special_tokens=False`: encoding it with special tokens would give InternLM2 two BOS tokens,
which changes its answers.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from text_generation_common.tokenizer import Tokenizer

from .tools import Tool, internlm2_turns
from .types import RouterError

IM_END = "<|im_end|>"


class TemplateError(RouterError):
    status = 422
    error_type = "template_error"

    def __init__(self, message: str):
        super().__init__(f"Template error: {message}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def check_template(source: str) -> None:
    """Raise TemplateError if `source` does not compile."""
    try:
        compile_template(source)
    except jinja2.exceptions.TemplateError as error:
        raise TemplateError(str(error)) from error


def flatten_content(content: Any) -> str:
    """OpenAI content: a string, or a list of parts; text parts are joined, images become `![](url)` (as TGI)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict):
            if part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = part.get("image_url") or {}
                parts.append(f"![]({url.get('url', '') if isinstance(url, dict) else url})")
        else:
            parts.append(str(part))
    return "".join(parts)


TOOLS_PROBE = "probe_function_7c1f"


@lru_cache(maxsize=8)
def renders_tools(source: str) -> bool:
    """Whether a chat template writes the `tools` it is given into the prompt (the stock InternLM2 template
    does not: it renders role and content only). Probed once per template, with one made-up tool; a template
    that fails on the probe does not render tools."""
    tools = [{"type": "function", "function": {"name": TOOLS_PROBE, "parameters": {"type": "object"}}}]
    try:
        text = compile_template(source).render(
            messages=[{"role": "user", "content": "hello"}], add_generation_prompt=True, bos_token="",
            eos_token="", tools=tools,
        )
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, AttributeError):
        return False
    return TOOLS_PROBE in text


def render_chat(
    tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[Tool] | None = None
) -> str:
    """The prompt text for `messages` (dicts with role/content) and the tools shown to the model. A template
    that renders tools gets them and the messages as they are; any other gets InternLM2's tool turns
    (`tools.internlm2_turns`). Raises TemplateError (422)."""
    source = tokenizer.chat_template
    if not source:
        raise TemplateError("the model has no chat template (chat_template in tokenizer_config.json)")
    normalized = []
    for message in messages:
        item = dict(message)
        item["content"] = flatten_content(item.get("content"))
        normalized.append(item)
    extra: dict[str, Any] = {}
    if renders_tools(source):
        if tools:
            extra["tools"] = [tool.model_dump(exclude_none=True) for tool in tools]
    else:
        normalized = internlm2_turns(normalized, tools)
    try:
        template = compile_template(source)
        return template.render(
            messages=normalized,
            add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
            **extra,
        )
    except jinja2.exceptions.TemplateError as error:
        raise TemplateError(str(error)) from error
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise TemplateError(f"{type(error).__name__}: {error}") from error


def encode_chat(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of a rendered chat prompt: no second BOS (the template wrote its own)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def turn_end_id(tokenizer: Tokenizer, eos_token_ids: tuple[int, ...]) -> int | None:
    """The id of `<|im_end|>` when the tokenizer knows it and it is not already an EOS id, else None.

    InternLM2 chat models end their turn with `<|im_end|>`; the shard counts its id among the EOS ids for
    InternLM2, so this only matters for other models served with a ChatML template.
    """
    token_id = tokenizer.token_to_id(IM_END)
    if token_id is None or token_id in set(eos_token_ids):
        return None
    return token_id
