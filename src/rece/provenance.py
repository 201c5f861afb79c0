"""What rece's outputs record about where they came from: library versions, file checksums, UTC timestamps."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ._version import __version__


def library_versions() -> dict[str, str]:
    """Versions of rece and the libraries whose numerics an output depends on (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch  # here, not at the top: `import rece.provenance` stays light for the command line's parsers

    versions = {"rece": __version__, "torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_id(path: str | os.PathLike) -> dict:
    """Path and sha256 of an input file, for manifests."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def utc_now() -> str:
    """The current UTC time as every rece file writes it (ISO 8601, seconds, Z)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
