"""Shared pytest fixtures: tiny random InternLM2 checkpoints built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# scripts/ is not a package: tests import make_tiny_internlm2 from it directly.
SCRIPTS_DIR = REPO_ROOT / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import make_tiny_internlm2  # noqa: E402

_TINY_CHECKPOINTS: dict[str, Path] = {}


def make_tiny(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: object) -> Path:
    """Build (once per session and name) a tiny checkpoint with make_tiny_internlm2's keyword arguments.

    The cache is keyed by name only: reuse a name only with the same kwargs.
    """
    if name not in _TINY_CHECKPOINTS:
        out_dir = tmp_path_factory.mktemp(f"tiny-{name}")
        _TINY_CHECKPOINTS[name] = make_tiny_internlm2.make_tiny_internlm2(out_dir, **kwargs)
    return _TINY_CHECKPOINTS[name]


@pytest.fixture(scope="session")
def tiny_internlm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default tiny InternLM2: hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128, vocab 1000."""
    return make_tiny(
        tmp_path_factory,
        "default",
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=128,
        vocab=1000,
        max_pos=512,
    )
