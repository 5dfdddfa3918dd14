"""Request parameters (TGI's `GenerateParameters`) and their validation into a `GenerationRequest`.

Independent of any web framework: the HTTP front end and the public gRPC front end both build a
`GenerateParameters` and call `Validation.validate`. The rules and messages follow TGI's router;
each message names the field and the allowed range, and every error is a
`ValidationError` (HTTP 422, `error_type` "validation") whose text starts with "Input validation error: ".

Validation also records TGI's validation metrics (duration, input length, max_new_tokens).
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

from pydantic import BaseModel, ConfigDict
from text_generation_common.grammar import (
    GrammarCompiler,
    GrammarError,
    grammar_from_json_schema,
    grammar_from_regex,
)
from text_generation_common.tokenizer import Tokenizer

from . import metrics
from .types import GenerationRequest, RouterLimits, SamplingParams, ValidationError

PREFIX = "Input validation error: "
MAX_SEED = 2**64 - 1
# Each stop sequence is matched against the text's tail as long as the longest one after every token: a
# megabyte-long one would cost a megabyte of comparisons per token. Real stop sequences are a few words.
MAX_STOP_SEQUENCE_CHARS = 1024


def invalid(message: str) -> ValidationError:
    return ValidationError(PREFIX + message)


class GenerateParameters(BaseModel):
    """TGI's `GenerateParameters`: field names, types and defaults as the router's JSON accepts them."""

    model_config = ConfigDict(extra="ignore")

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: list[str] = []
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Any | None = None
    adapter_id: str | None = None

    @classmethod
    def absent(cls) -> GenerateParameters:
        """What TGI uses when a request has no `parameters` object at all: `do_sample` is then true."""
        return cls(do_sample=True)

    @property
    def sampling(self) -> bool:
        """TGI's notion of "sampling is on", used by the best_of rules."""
        return (
            self.do_sample
            or self.temperature is not None
            or self.top_k is not None
            or self.top_p is not None
            or self.typical_p is not None
        )


class Validation:
    """Turns (inputs, parameters) into a `GenerationRequest`, with TGI's checks and messages."""

    def __init__(self, tokenizer: Tokenizer, limits: RouterLimits, eos_token_ids: tuple[int, ...] = ()):
        """eos_token_ids: the shards' EOS ids (a complete grammar allows them); default: the tokenizer's EOS."""
        self.tokenizer = tokenizer
        self.limits = limits
        if not eos_token_ids and tokenizer.eos_token_id is not None:
            eos_token_ids = (tokenizer.eos_token_id,)
        self.grammars = GrammarCompiler(tokenizer, eos_token_ids)

    # ----------------------------------------------------------------------------------- pieces

    def tokenize(
        self, inputs: str, add_special_tokens: bool = True, truncate: int | None = None
    ) -> list[int]:
        try:
            ids = list(self.tokenizer.encode(inputs, add_special_tokens=add_special_tokens))
        except ValueError as error:
            raise invalid(f"tokenizer error {error}") from error
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]  # TGI truncates from the left: the end of the prompt is kept
        return ids

    def validate_best_of(self, best_of: int | None) -> int:
        """best_of ≤ --max-best-of (TGI's `validate_best_of`); returns the effective value."""
        value = 1 if best_of is None else best_of
        if self.limits.max_best_of == 1 and value != 1:
            raise invalid("`best_of` != 1 is not allowed for this endpoint")
        if value <= 0 or value > self.limits.max_best_of:
            raise invalid(f"`best_of` must be > 0 and <= {self.limits.max_best_of}. Given: {value}")
        return value

    def checked_grammar(self, build: Any, *args: Any, what: str = "grammar", fail: Any = invalid) -> str:
        """The grammar `build(*args)` makes, checked to compile against the model's vocabulary; otherwise (or
        when grammar support is off) `fail(message)` is raised: a 422 naming `what` and the problem."""
        if not self.limits.grammar_support:
            raise fail(f"{what} needs grammar support, which is off (--disable-grammar-support)")
        try:
            grammar = build(*args)
            self.grammars.check(grammar)
        except GrammarError as error:
            raise fail(f"{what} is not valid: {error}") from None
        return grammar

    def tgi_grammar(self, grammar: Any) -> str:
        """TGI's `parameters.grammar`: {"type": "json" (or "json_object"), "value": a JSON schema or its text},
        {"type": "json_schema", "value": {"schema": ...}} or {"type": "regex", "value": "..."}."""
        if not isinstance(grammar, dict) or set(grammar) != {"type", "value"}:
            raise invalid(f'`grammar` must be {{"type": ..., "value": ...}}. Given: {grammar!r:.200}')
        kind, value = grammar["type"], grammar["value"]
        if kind in ("json", "json_object"):
            return self.checked_grammar(grammar_from_json_schema, value, what="`grammar` (json)")
        if kind == "json_schema":
            if not isinstance(value, dict) or "schema" not in value:
                raise invalid('`grammar` of type "json_schema" needs a value {"schema": ...}')
            return self.checked_grammar(grammar_from_json_schema, value["schema"], what="`grammar` (json_schema)")
        if kind == "regex":
            if not isinstance(value, str) or not value:
                raise invalid("`grammar` of type \"regex\" needs a non-empty regular expression string")
            return self.checked_grammar(grammar_from_regex, value, what="`grammar` (regex)")
        raise invalid(f'`grammar` type must be "json", "json_object", "json_schema" or "regex". Given: {kind!r}')

    # ----------------------------------------------------------------------------------- main

    def validate(
        self,
        inputs: str,
        parameters: GenerateParameters | None = None,
        add_special_tokens: bool = True,
        stream: bool = False,
        max_top_n_tokens: int | None = None,
        token_logprobs: bool = True,
    ) -> GenerationRequest:
        """Raise `ValidationError` or return the request to queue. `stream`: the request streams tokens.
        `max_top_n_tokens`: the route's own cap on top_n_tokens (OpenAI's 20), instead of --max-top-n-tokens.
        `token_logprobs`: the route reports each chosen token's logprob (TGI's always do)."""
        start = time.perf_counter()
        p = parameters if parameters is not None else GenerateParameters.absent()
        self._check_modes(p, stream)
        sampling = self._sampling(p)
        limits = self.limits
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            raise invalid(f"`max_new_tokens` must be strictly positive (> 0). Given: {p.max_new_tokens}")
        if len(p.stop) > limits.max_stop_sequences:
            raise invalid(
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        if any(s == "" for s in p.stop):
            raise invalid("`stop` sequences must not be empty strings")
        longest = max((len(s) for s in p.stop), default=0)
        if longest > MAX_STOP_SEQUENCE_CHARS:
            raise invalid(f"`stop` sequences must be at most {MAX_STOP_SEQUENCE_CHARS} characters. Given: {longest}")
        top_n_tokens = 0 if p.top_n_tokens is None else p.top_n_tokens
        top_n_cap = limits.max_top_n_tokens if max_top_n_tokens is None else max_top_n_tokens
        if not 0 <= top_n_tokens <= top_n_cap:
            raise invalid(f"`top_n_tokens` must be >= 0 and <= {top_n_cap}. Given: {top_n_tokens}")

        input_ids = self._input_ids(inputs, p.truncate, add_special_tokens)
        input_length = len(input_ids)
        max_new_tokens = (
            p.max_new_tokens if p.max_new_tokens is not None else limits.max_total_tokens - input_length
        )
        if max_new_tokens <= 0 or input_length + max_new_tokens > limits.max_total_tokens:
            raise invalid(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        request = GenerationRequest(
            input_ids=tuple(input_ids),
            parameters=sampling,
            max_new_tokens=max_new_tokens,
            stop_sequences=tuple(p.stop),
            top_n_tokens=top_n_tokens,
            prefill_logprobs=p.decoder_input_details,
            token_logprobs=token_logprobs,
            grammar=self.tgi_grammar(p.grammar) if p.grammar is not None else "",
        )
        metrics.request_validation_duration.observe(time.perf_counter() - start)
        metrics.request_input_length.observe(input_length)
        metrics.request_max_new_tokens.observe(max_new_tokens)
        return request

    def _check_modes(self, p: GenerateParameters, stream: bool) -> None:
        """best_of, streaming and the features this server does not have."""
        best_of = self.validate_best_of(p.best_of)
        if best_of > 1:
            if stream:
                raise invalid("`best_of` != 1 is not supported when streaming tokens")
            if not p.sampling:
                raise invalid(
                    "you must use sampling when `best_of` is > 1 "
                    "(set `do_sample`, `temperature`, `top_k`, `top_p` or `typical_p`)"
                )
            if p.seed is not None:
                raise invalid("`seed` must not be set when `best_of` > 1")
        if stream and p.decoder_input_details:
            raise invalid("`decoder_input_details` == true is not supported when streaming tokens")
        if p.watermark:
            raise invalid("`watermark` is not supported: it must be false")
        if p.adapter_id is not None:
            raise invalid(f"`adapter_id` is not supported (no adapters are loaded). Given: {p.adapter_id!r}")

    @staticmethod
    def _sampling(p: GenerateParameters) -> SamplingParams:
        """TGI's sampling parameters, checked; a random seed when none is given."""
        temperature = 1.0 if p.temperature is None else p.temperature
        if not temperature > 0:
            raise invalid(f"`temperature` must be strictly positive (> 0). Given: {temperature}")
        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if not repetition_penalty > 0:
            raise invalid(
                f"`repetition_penalty` must be strictly positive (> 0). Given: {repetition_penalty}"
            )
        frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        if not -2.0 <= frequency_penalty <= 2.0:
            raise invalid(f"`frequency_penalty` must be >= -2.0 and <= 2.0. Given: {frequency_penalty}")
        if p.top_p is not None and not 0.0 < p.top_p < 1.0:
            raise invalid(f"`top_p` must be > 0.0 and < 1.0. Given: {p.top_p}")
        if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
            raise invalid(f"`typical_p` must be > 0.0 and < 1.0. Given: {p.typical_p}")
        if p.top_k is not None and p.top_k <= 0:
            raise invalid(f"`top_k` must be strictly positive (> 0). Given: {p.top_k}")
        if p.seed is not None and not 0 <= p.seed <= MAX_SEED:
            raise invalid(f"`seed` must be >= 0 and <= {MAX_SEED}. Given: {p.seed}")
        return SamplingParams(
            temperature=temperature,
            top_k=0 if p.top_k is None else p.top_k,
            top_p=1.0 if p.top_p is None else p.top_p,
            typical_p=1.0 if p.typical_p is None else p.typical_p,
            do_sample=p.do_sample,
            seed=p.seed if p.seed is not None else random.randrange(2**63),
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
        )

    def truncated_ids(self, inputs: str, truncate: int | None, add_special_tokens: bool = True) -> list[int]:
        """The ids of non-empty `inputs`, truncated from the left to `truncate` (0 < truncate ≤ max_input_tokens)
        if given: what /tokenize returns."""
        max_input_tokens = self.limits.max_input_tokens
        if not inputs:
            raise invalid("`inputs` cannot be empty")
        if truncate is not None and not 0 < truncate <= max_input_tokens:
            raise invalid(
                f"`truncate` must be strictly positive and less than {max_input_tokens}. Given: {truncate}"
            )
        return self.tokenize(inputs, add_special_tokens, truncate)

    def _input_ids(self, inputs: str, truncate: int | None, add_special_tokens: bool) -> list[int]:
        """The prompt's ids, truncated as asked; never empty, never longer than max_input_tokens."""
        max_input_tokens = self.limits.max_input_tokens
        input_ids = self.truncated_ids(inputs, truncate, add_special_tokens)
        if not input_ids:
            raise invalid("`inputs` cannot be empty (it encodes to no tokens)")
        if len(input_ids) > max_input_tokens:
            raise invalid(f"`inputs` must have less than {max_input_tokens} tokens. Given: {len(input_ids)}")
        return input_ids

    def with_openai_sampling(
        self,
        request: GenerationRequest,
        presence_penalty: float | None,
        frequency_penalty: float | None,
        logit_bias: dict[str, float] | None,
    ) -> GenerationRequest:
        """`request` with OpenAI's penalties (over the generated tokens; 0 or absent: none) and logit bias
        (token id as a string -> a bias in [-100, 100], added to the logits)."""
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if value is not None and not -2.0 <= value <= 2.0:
                raise invalid(f"`{name}` must be >= -2.0 and <= 2.0. Given: {value}")
        bias: list[tuple[int, float]] = []
        vocab_size = self.tokenizer.vocab_size
        for key, value in (logit_bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise invalid(f"`logit_bias` keys must be token ids, got {key!r}") from None
            if not 0 <= token_id < vocab_size:
                raise invalid(f"`logit_bias` names token id {token_id}, outside [0, {vocab_size})")
            if not -100.0 <= value <= 100.0:
                raise invalid(f"`logit_bias` values must be >= -100 and <= 100. Given: {value} for {token_id}")
            bias.append((token_id, float(value)))
        params = dataclasses.replace(
            request.parameters,
            presence_penalty=presence_penalty or 0.0,
            output_frequency_penalty=frequency_penalty or 0.0,
            logit_bias=tuple(sorted(bias)),
        )
        return dataclasses.replace(request, parameters=params)

    @staticmethod
    def choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
        """`n` copies of `request`, each sampling on its own: the i-th gets seed + i (greedy copies are equal)."""
        seed = request.parameters.seed
        return [
            dataclasses.replace(request, parameters=dataclasses.replace(request.parameters, seed=(seed + i) % 2**64))
            for i in range(n)
        ]
