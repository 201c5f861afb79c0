"""Atomic file output: write to a temporary name beside the target, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ReceError


def check_output_path(path: str | os.PathLike) -> Path:
    """Return `path` as a Path after checking that its folder exists (nothing is created)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ReceError(f"output folder '{parent}' does not exist; create it first or choose another -o path")
    if path.is_dir():
        raise ReceError(f"output path '{path}' is a folder; give a file name such as '{path / 'edit.safetensors'}'")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over `path`, else delete it."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success move it to `path`, else delete it."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ReceError(f"output folder '{parent}' does not exist; create it first or choose another -o path")
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ReceError(f"output '{path}' already exists; choose a new -o path or pass --overwrite")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_prompt_file(path: str | os.PathLike, option: str = "--concept-prompts") -> list[str]:
    """Prompts from a file: a CSV's `prompt` column, else one prompt per line (blank lines and '#' comments skipped)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise ReceError(f"{option} '{path}' does not exist; pass a text file with one prompt per line or a CSV")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReceError(f"{option} '{path}' is not readable UTF-8 text ({type(exc).__name__}); pass a text or CSV file") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "prompt" not in [c.strip() for c in reader.fieldnames or []]:
            raise ReceError(f"{option} '{path}' has no 'prompt' column; name the column of prompts 'prompt'")
        prompts = [(row.get("prompt") or row.get(" prompt") or "").strip() for row in reader]
    else:
        prompts = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ReceError(f"{option} '{path}' holds no prompt; put one prompt per line")
    return prompts
