"""Where a model's files are: a local directory as is, or a hub id through huggingface_hub's cache.

`resolve_model` never runs code from the repository; it only finds (or downloads) files. Offline
(`HF_HUB_OFFLINE=1`, or `local_files_only=True`) it reads the cache alone; online it asks the hub first and
falls back to the cache when the hub cannot be reached.
"""

from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

from text_generation_server.utils.weights import weight_files

# What the server reads: config, generation config, tokenizer files and weights. Never *.py.
_METADATA_PATTERNS = ["*.json", "tokenizer.model", "*.tiktoken", "*.txt"]
_SAFETENSORS_PATTERNS = ["*.safetensors"]
_BIN_PATTERNS = ["pytorch_model*.bin"]


class ModelNotFound(Exception):
    """Neither a local directory nor found on the hub or in the cache; the message says why."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    # read at call time: huggingface_hub reads its environment once, at import
    return os.environ.get("HF_HUB_CACHE") or None


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or model_id in (".", "..") or model_id.count("/") > 1


def resolve_model(
    model_id: str,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_only_hint: str = "",
) -> Path:
    """The local directory holding `model_id`'s files.

    `local_files_only=None` follows HF_HUB_OFFLINE. Raises `ModelNotFound` with a one-line explanation
    (`cache_only_hint` says why only the cache was read, when `local_files_only` is True).
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path.resolve()
    if _looks_like_path(model_id) or path.exists():
        raise ModelNotFound(f"model directory {model_id} does not exist (or is not a directory)")
    cache_only_reason = cache_only_hint or "only the local cache is read"
    if local_files_only is None:
        local_files_only = hub_offline()
        cache_only_reason = "HF_HUB_OFFLINE=1, so the hub is not asked"

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = _cache_dir()
    where = f"{model_id!r} (revision {revision or 'main'})"
    online_error = None
    if not local_files_only:
        try:
            return _download(model_id, revision, cache)
        except HFValidationError as e:
            raise ModelNotFound(
                f"{model_id!r} is neither a local directory nor a valid hub id: {e}"
            ) from None
        except Exception as e:  # noqa: BLE001 - no network, gated, unknown repo...: try the cache, then report both
            online_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning(f"cannot fetch {where} from the hub ({online_error}); trying the local cache")
    try:
        snapshot = Path(
            snapshot_download(model_id, revision=revision, cache_dir=cache, local_files_only=True)
        )
    except HFValidationError as e:
        raise ModelNotFound(f"{model_id!r} is neither a local directory nor a valid hub id: {e}") from None
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        from huggingface_hub import constants

        cache_name = f"the Hugging Face cache {cache or constants.HF_HUB_CACHE}"
        reason = f"the hub could not be reached ({online_error})" if online_error else cache_only_reason
        raise ModelNotFound(
            f"model {where} is not a local directory and is not in {cache_name}; {reason} "
            f"[{type(e).__name__}]. Download it where the hub is reachable, or pass a local directory."
        ) from None
    if not (snapshot / "config.json").exists():
        raise ModelNotFound(f"the cached snapshot of {where} at {snapshot} has no config.json")
    return snapshot


def _download(model_id: str, revision: str | None, cache: str | None) -> Path:
    """Fetch config, tokenizer and weights (.safetensors, else pytorch_model*.bin) into the cache."""
    from huggingface_hub import snapshot_download

    logger.info(f"fetching {model_id} (revision {revision or 'main'}) from the hub")
    snapshot = Path(
        snapshot_download(
            model_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=_METADATA_PATTERNS + _SAFETENSORS_PATTERNS,
        )
    )
    if not any(snapshot.glob("*.safetensors")):
        logger.info(f"{model_id} has no .safetensors; fetching pytorch_model*.bin to convert")
        snapshot = Path(
            snapshot_download(
                model_id,
                revision=revision,
                cache_dir=cache,
                allow_patterns=_METADATA_PATTERNS + _BIN_PATTERNS,
            )
        )
    return snapshot


def download_weights(model_id: str, revision: str | None = None) -> Path:
    """Resolve `model_id` (downloading when online), convert .bin weights to .safetensors; its directory."""
    model_dir = resolve_model(model_id, revision)
    if not (model_dir / "config.json").exists():
        raise ModelNotFound(f"{model_dir} has no config.json")
    try:
        files = weight_files(model_dir)
    except FileNotFoundError as e:
        raise ModelNotFound(str(e)) from None
    logger.info(f"{model_id}: {len(files)} safetensors file(s) in {model_dir}")
    return model_dir
