"""What comes from outside: hub snapshots, the offline switch, and rece's own cache folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ReceError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CACHE_ENV = "RECE_CACHE"
SKIPPED_WEIGHTS = ("*.bin", "*.ckpt", "*.msgpack", "*.onnx*")  # rece reads safetensors only


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no downloads (1, true, yes or on, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repository id ('owner/name'), not a relative or absolute path."""
    return bool(HUB_ID.match(name)) and not name.startswith((".", "/"))


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cache_root() -> Path:
    """rece's cache folder: $RECE_CACHE, default ~/.cache/rece (grams, prompt sets made from hub files, `tiny`)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rece").expanduser()


def snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """A local snapshot of a hub repository (the files matching `allow_patterns`; all when None), safetensors only."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, ignore_patterns=list(SKIPPED_WEIGHTS)))
    except Exception as exc:  # the hub client raises many types: offline, not found, gated, network
        raise ReceError(
            f"cannot fetch '{repo_id}' from the hub ({first_line(exc)}); check the id and your connection, "
            "or download it once and pass the local folder"
        ) from None


def fetch_for(source, repo_id: str, allow_patterns: list[str], needs: str, fix: str) -> Path:
    """`snapshot`, or one line: `source` needs `needs` (what, from `repo_id`), which are not cached, offline or why
    fetching failed, and `fix` (the option that takes a local copy)."""
    try:
        return snapshot(repo_id, allow_patterns)
    except ReceError as exc:  # offline, gated (SD3.5, FLUX.1 [dev] need the licence accepted), no connection
        state = "the hub is offline (HF_HUB_OFFLINE)" if hub_offline() else f"fetching failed: {str(exc).split(';')[0]}"
        raise ReceError(f"'{source}' needs {needs}, which are not cached and {state}; {fix}") from None
