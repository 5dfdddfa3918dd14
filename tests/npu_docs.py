"""Read Huawei's torch-npu 2.13.0 wheel as reference data, without importing it.

Our NPU backend calls ``torch_npu`` ops that we cannot run here: importing
``torch_npu`` needs the Ascend CANN runtime.  The wheel itself, however, ships
plain Python files that describe those ops, and this module reads them straight
out of the wheel (a zip archive) so that tests can check our code against the
vendor's own description:

* ``torch_npu/_op_plugin_docs.py`` -- one docstring per op, each holding a
  prototype line such as ``torch_npu.npu_rms_norm(Tensor self, ...) -> ...``.
  We take op names, parameter names and types, defaults and the keyword-only
  split from it.
* ``torch_npu/op_plugin/atb/_atb_api_docs.py`` -- the same for the ATB ops
  (``torch_npu.atb.*``), wrapped in a function and using another helper name.
* ``torch_npu/op_plugin/meta/_meta_registrations.py`` and
  ``torch_npu/op_plugin/atb/_atb_meta_registrations.py`` -- the "meta" shape
  rules: Python functions that compute output shapes and dtypes.  We execute
  only their function definitions, constant tables and ``if`` blocks (with the
  ``torch_npu`` imports replaced by small stand-ins) so that tests can compare
  our CPU stand-ins' outputs with the vendor's rules on "meta" tensors.

The files are parsed with ``ast``; nothing is extracted to disk and nothing from
the wheel is imported as a module.  The wheel is expected in ``.venv/vendor/``
(``make install`` downloads it there).
"""

from __future__ import annotations

import ast
import inspect
import linecache
import re
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

WHEEL_GLOB = "torch_npu-2.13.0-*.whl"

OP_DOCS = "torch_npu/_op_plugin_docs.py"
ATB_DOCS = "torch_npu/op_plugin/atb/_atb_api_docs.py"
META_REGISTRATIONS = "torch_npu/op_plugin/meta/_meta_registrations.py"
ATB_META_REGISTRATIONS = "torch_npu/op_plugin/atb/_atb_meta_registrations.py"

# Values the meta rules see for the environment they think they run in.
# Atlas A2 (Ascend910B1..B4) parts report SoC versions 220..224; the meta file
# only compares against 260 (Ascend950), so any A2 value selects the A2 paths.
SOC_VERSION = 223  # Ascend910B3
# The meta file compares CANN versions as plain strings (>= "8.5.0",
# >= "9.2.0") and asks for >= "8.5.0.alpha003"; "9.2.0" passes all of them, i.e.
# it selects the newest code paths.  (A two-digit major would break the string
# comparisons, so stay on 9.x.)
CANN_VERSION = "9.2.0"
# torch_npu's own dtype enum values for dtypes PyTorch lacks; the meta file
# compares integer dtype arguments against these (they match the file's own
# enum tables, e.g. TORCH_NPU_DTYPE_TO_STRING_MAP).
NPU_DTYPE_CODES = {
    "int4": 285,
    "hifloat8": 290,
    "float8_e5m2": 291,
    "float8_e4m3fn": 292,
    "float8_e8m0fnu": 293,
    "float4_e2m1fn_x2": 296,
    "float4_e1m2fn_x2": 297,
}

# Names of the helper calls that attach a docstring to an op, per docs file.
_DOC_HELPERS = {
    OP_DOCS: "_add_torch_npu_docstr",
    ATB_DOCS: "_add_torch_npu_atb_docstr",
}
# Prefix of the prototype line in each docs file.
_DOC_PREFIXES = {OP_DOCS: "torch_npu.", ATB_DOCS: "torch_npu.atb."}
_DOC_SOURCES = {OP_DOCS: "op docs", ATB_DOCS: "atb docs"}
# Modules whose imports the meta files may keep: everything else is torch_npu
# or torch pieces replaced by stand-ins below.
_KEPT_IMPORTS = {"math", "os", "warnings", "torch"}


def find_wheel(root: Path) -> Path:
    """The torch-npu wheel under ``root/.venv/vendor`` (root = repo root)."""
    vendor = Path(root) / ".venv" / "vendor"
    wheels = sorted(vendor.glob(WHEEL_GLOB))
    if not wheels:
        raise FileNotFoundError(f"no {WHEEL_GLOB} in {vendor}; `make install` downloads it there")
    return wheels[0]


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # "" when the prototype gives no type (Python-style prototypes)
    default: str | None  # the default's source text; None when there is none
    keyword_only: bool


@dataclass(frozen=True)
class Signature:
    op: str
    parameters: tuple[Parameter, ...]
    returns: str  # text after "->", stripped; "" when the prototype has none
    source: str  # "op docs", "atb docs" or "meta registration"

    def positional(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters if not p.keyword_only)

    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)


# --------------------------------------------------------------------------
# Prototype parsing


def _scan(text: str, start: int = 0) -> Iterator[tuple[int, str, int]]:
    """(index, character, bracket depth after it) for the characters of ``text`` from ``start`` that lie outside
    quotes (the quote characters themselves are skipped)."""
    depth, quote = 0, None
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        yield i, ch, depth


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split ``text`` on ``separator`` where it is outside brackets and quotes."""
    parts, start = [], 0
    for i, ch, depth in _scan(text):
        if ch == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _balanced_end(text: str, open_at: int) -> int | None:
    """Index just past the bracket closing the one at ``open_at``.

    Gives up (None) at a blank line, so a typo in one prototype cannot swallow
    the rest of the docstring.
    """
    for i, ch, depth in _scan(text, open_at):
        if ch in ")]}" and depth == 0:
            return i + 1
        if ch == "\n" and text[i + 1 : i + 2] == "\n":
            return None
    return None
    return None


def _parse_parameter(text: str, keyword_only: bool) -> Parameter:
    """``Tensor? name=None`` / ``int[] name`` / ``name=1`` -> Parameter."""
    declaration, *default = _split_top_level(text, "=")
    words = declaration.split()
    # The name is the last word; whatever precedes it is the type, e.g.
    # "Tensor(a!)", "SymInt[]?" or "bool[2]".
    name, type_ = words[-1], " ".join(words[:-1])
    value = "=".join(default).strip() if default else None
    return Parameter(name, type_, value, keyword_only)


def _parse_parameters(text: str) -> tuple[Parameter, ...]:
    parameters, keyword_only = [], False
    for piece in _split_top_level(text, ","):
        piece = piece.strip()
        if not piece:  # "f()" or a trailing comma
            continue
        if piece == "*":  # everything after a bare * is keyword-only
            keyword_only = True
            continue
        parameters.append(_parse_parameter(piece, keyword_only))
    return tuple(parameters)


def _parse_returns(rest: str) -> str:
    """The return annotation from the text that follows the parameter list."""
    rest = rest.lstrip(" \t")
    if not rest.startswith("->"):
        return ""
    rest = rest[2:].lstrip()
    if rest.startswith("("):  # a tuple may continue onto following lines
        end = _balanced_end(rest, 0)
        if end is not None:
            return " ".join(rest[:end].split())
    return rest.split("\n", 1)[0].strip()


def _prototype_starts(doc: str, op: str, prefix: str) -> Iterator[int]:
    """Offsets in ``doc`` of the "(" opening each prototype-looking line.

    Lines of the form ``torch_npu.OP(`` come first.  A few docstrings spell the
    prototype differently ("torch_npu. OP(", "custom.OP(", "torch_npu.npu.OP(",
    a bare "OP(" after a label line, "func: OP("), so those follow as a
    fallback.
    """
    strict = re.compile(r"^[ \t]*" + re.escape(prefix + op) + r"\(", re.MULTILINE)
    # Any dotted qualifier ("custom.", "torch_npu.npu.", "torch_npu. ") or none.
    relaxed = re.compile(r"^[ \t]*(?:func:[ \t]*)?(?:\w+\.[ \t]*)*" + re.escape(op) + r"\(", re.MULTILINE)
    seen = set()
    for pattern in (strict, relaxed):
        for match in pattern.finditer(doc):
            if match.end() not in seen:
                seen.add(match.end())
                yield match.end() - 1


def _parse_prototype(doc: str, op: str, prefix: str, source: str) -> Signature | None:
    """The op's signature from its docstring, or None if it has no prototype.

    A docstring may repeat the op's name in usage examples, or give both an
    untyped and a typed form.  Prefer a line with a return annotation ("->"),
    then one with parameter types; among equals the earliest wins.
    """
    candidates = []
    for open_at in _prototype_starts(doc, op, prefix):
        end = _balanced_end(doc, open_at)
        if end is None:
            continue
        parameters = _parse_parameters(" ".join(doc[open_at + 1 : end - 1].split()))
        returns = _parse_returns(doc[end:])
        candidates.append(Signature(op, parameters, returns, source))

    def rank(signature: Signature) -> tuple[bool, bool]:
        return bool(signature.returns), any(p.type for p in signature.parameters)

    # max() keeps the first of equally ranked candidates.
    return max(candidates, key=rank) if candidates else None


def _signature_from_function(op: str, fn: Callable) -> Signature:
    parameters = []
    for p in inspect.signature(fn).parameters.values():
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        keyword_only = p.kind is inspect.Parameter.KEYWORD_ONLY
        parameters.append(Parameter(p.name, "", default, keyword_only))
    return Signature(op, tuple(parameters), "", "meta registration")


# --------------------------------------------------------------------------
# Reading the docs files


def _parse(source_text: str, filename: str = "<wheel>") -> ast.Module:
    """ast.parse, quiet about the vendor files' invalid escape sequences (warnings of theirs, not ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(source_text, filename)


def _doc_blocks(source_text: str, helper: str) -> Iterator[tuple[str, str]]:
    """(op, docstring) for every ``helper("op", doc)`` call, in source order.

    The ATB file nests its calls inside a function, so walk the whole tree.
    """
    calls = [
        node
        for node in ast.walk(_parse(source_text))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == helper
        and len(node.args) == 2
        and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)
    ]
    for call in sorted(calls, key=lambda c: c.lineno):
        yield call.args[0].value, call.args[1].value


# --------------------------------------------------------------------------
# Loading the meta registrations without torch_npu


class _ErrCode:
    """Stand-in for torch_npu's ErrCode enum: any attribute is its own name."""

    def __getattr__(self, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return name


def _ops_error(*args: Any, **kwargs: Any) -> str:
    return ""


def _version_key(version: str) -> tuple[int, ...]:
    """Leading numeric components: "8.5.0.alpha003" -> (8, 5, 0)."""
    numbers = []
    for part in version.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def _is_gte_cann_version(version: str, module: str = "CANN") -> bool:
    return _version_key(CANN_VERSION) >= _version_key(version)


def _torch_npu_stand_in() -> types.SimpleNamespace:
    """Just the ``torch_npu`` attributes the meta files touch."""
    npu = types.SimpleNamespace(
        utils=types.SimpleNamespace(
            get_cann_version=lambda: CANN_VERSION,
            _is_gte_cann_version=_is_gte_cann_version,
        ),
        _backends=types.SimpleNamespace(get_soc_version=lambda: SOC_VERSION),
    )
    utils = types.SimpleNamespace(_error_code=types.SimpleNamespace(ErrCode=_ErrCode(), ops_error=_ops_error))
    # The meta file uses torch_npu.uint8 as a fallback torch dtype.
    return types.SimpleNamespace(npu=npu, utils=utils, uint8=torch.uint8, **NPU_DTYPE_CODES)


class _Library:
    """Stand-in for torch.library.Library: only remembers its namespace."""

    def __init__(self, namespace: str, kind: str = "", dispatch_key: str = "") -> None:
        self.namespace = namespace


def _meta_namespace(registry: dict[tuple[str, str], Callable]) -> dict[str, Any]:
    """Globals for executing a meta file; ``impl`` records into ``registry``."""

    def impl(lib: _Library, name: str) -> Callable[[Callable], Callable]:
        def record(fn: Callable) -> Callable:
            registry[(lib.namespace, name)] = fn
            return fn

        return record

    torch_npu = _torch_npu_stand_in()
    return {
        "__name__": "torch_npu_meta_registrations",
        "__builtins__": __builtins__,
        "torch_npu": torch_npu,
        "Library": _Library,
        "impl": impl,
        "ErrCode": torch_npu.utils._error_code.ErrCode,
        "ops_error": _ops_error,
        "get_cann_version": torch_npu.npu.utils.get_cann_version,
        "get_soc_version": torch_npu.npu._backends.get_soc_version,
    }


def _kept_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements worth executing: defs, assignments, ifs, plain imports.

    ``if`` blocks are kept (with their bodies filtered the same way) because
    some registrations live inside them, e.g. one per torch version; their
    conditions are evaluated against the real torch and environment.
    """
    kept = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.Assign)):
            kept.append(node)
        elif isinstance(node, ast.Import):
            if all(alias.name.split(".")[0] in _KEPT_IMPORTS for alias in node.names):
                kept.append(node)
        elif isinstance(node, ast.If):
            node.body = _kept_statements(node.body) or [ast.Pass()]
            node.orelse = _kept_statements(node.orelse)
            kept.append(ast.fix_missing_locations(node))
    return kept


def _exec_meta_file(source_text: str, filename: str, namespace: dict[str, Any]) -> None:
    """Execute the kept statements one by one; drop assignments that fail.

    Each statement is compiled with the file's own name and line numbers, and
    the text is put in ``linecache``, so a traceback through a vendor meta rule
    shows the vendor's line.
    """
    linecache.cache[filename] = (len(source_text), None, source_text.splitlines(True), filename)
    for node in _kept_statements(_parse(source_text, filename).body):
        code = compile(ast.Module([node], type_ignores=[]), filename, "exec")
        try:
            exec(code, namespace)  # noqa: S102 -- vendor meta rules, filtered above
        except Exception:
            if not isinstance(node, ast.Assign):
                raise  # a def or an if block failing means our stand-ins are wrong


# --------------------------------------------------------------------------
# Public entry point


@dataclass(frozen=True)
class _DocBlock:
    op: str
    text: str
    prefix: str  # how the prototype line starts, e.g. "torch_npu.atb."
    source: str


class VendorDocs:
    """Op docs, prototypes and meta shape rules from one torch-npu wheel."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = Path(wheel)
        self._blocks: dict[str, _DocBlock] = {}
        with zipfile.ZipFile(self.wheel) as archive:
            # Op docs first, so an ATB block never shadows an op-docs one.
            for member in (OP_DOCS, ATB_DOCS):
                text = archive.read(member).decode("utf-8")
                blocks: dict[str, _DocBlock] = {}
                for op, doc in _doc_blocks(text, _DOC_HELPERS[member]):
                    # A later block for the same op wins, as it does at import
                    # time (each call overwrites the op's __doc__).
                    blocks[op] = _DocBlock(op, doc, _DOC_PREFIXES[member], _DOC_SOURCES[member])
                for op, block in blocks.items():
                    self._blocks.setdefault(op, block)

    def ops(self, source: str | None = None) -> tuple[str, ...]:
        """Documented op names, optionally only those from one source."""
        return tuple(op for op, block in self._blocks.items() if source in (None, block.source))

    def documented(self, op: str) -> bool:
        return op in self._blocks

    def doc_text(self, op: str) -> str:
        return self._blocks[op].text

    def signature(self, op: str) -> Signature:
        block = self._blocks.get(op)
        if block is not None:
            parsed = _parse_prototype(block.text, op, block.prefix, block.source)
            if parsed is not None:
                return parsed
        try:
            fn = self.meta(op)
        except KeyError:
            raise KeyError(f"{op}: no documented prototype and no meta registration") from None
        return _signature_from_function(op, fn)

    def meta(self, op: str) -> Callable:
        """The vendor's meta function for ``op`` (npu library, then atb)."""
        for namespace in ("npu", "atb"):
            fn = self._meta_registry.get((namespace, op))
            if fn is not None:
                return fn
        raise KeyError(f"{op}: no meta registration")

    @cached_property
    def _meta_registry(self) -> dict[tuple[str, str], Callable]:
        """(library namespace, op) -> meta function; loaded on first use."""
        registry: dict[tuple[str, str], Callable] = {}
        with zipfile.ZipFile(self.wheel) as archive:
            for member in (META_REGISTRATIONS, ATB_META_REGISTRATIONS):
                text = archive.read(member).decode("utf-8")
                # Each file gets its own globals, as each is its own module.
                _exec_meta_file(text, member, _meta_namespace(registry))
        return registry


# --------------------------------------------------------------------------
# Running meta rules


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(item) for item in value)
    return value


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, (list, tuple)):
        return tuple(_describe(item) for item in value)
    return value


def meta_outputs(fn: Callable, *args: Any, **kwargs: Any) -> tuple:
    """Call a meta rule on "meta" copies of the tensors; describe its outputs.

    Returns one ``(shape, dtype)`` pair per output: a single tensor gives a
    one-element tuple, None gives ``()``.  Within a tuple of outputs a None
    stays None and a list of tensors becomes a tuple of pairs, so positions
    line up with the documented returns.
    """
    outputs = fn(*_to_meta(args), **{k: _to_meta(v) for k, v in kwargs.items()})
    if outputs is None:
        return ()
    if isinstance(outputs, torch.Tensor):
        return (_describe(outputs),)
    return tuple(_describe(item) for item in outputs)
