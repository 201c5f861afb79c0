"""Atomic file output: write to a temporary name beside the target, rename when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import ReceError


def check_parent(path: Path) -> Path:
    """The folder `path` goes in, refused in one line unless it is an existing folder."""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ReceError(f"output folder '{parent}' is a file; choose an -o path inside a folder")
    if not parent.is_dir():
        raise ReceError(f"output folder '{parent}' does not exist; create it first or choose another -o path")
    return parent


def check_folder_parent(path: Path) -> Path:
    """The folder a folder output `path` goes in, refused in one line if a file stands in the way; folders that do
    not exist yet are fine (`make_parent` creates them when the output is written)."""
    parent = path.parent if str(path.parent) else Path(".")
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ReceError(f"output folder '{folder}' is a file; choose an -o path inside a folder")
            break
    return parent


def make_parent(path: Path) -> Path:
    """Create the folders a folder output `path` goes in (only `path` itself is checked for overwriting)."""
    parent = check_folder_parent(path)
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def check_output_path(
    path: str | os.PathLike, *, overwrite: bool = True, inputs: Sequence[str | os.PathLike | None] = ()
) -> Path:
    """Return `path` as a Path after checking, before any work, that it can be written: its folder exists, it is not a
    folder, it is none of the command's `inputs`, and it does not exist unless `overwrite` (nothing is created)."""
    path = Path(path)
    check_parent(path)
    if path.is_dir():
        raise ReceError(f"output path '{path}' is a folder; give a file name such as '{path / 'edit.safetensors'}'")
    check_not_input(path, inputs)
    if path.exists() and not overwrite:
        raise ReceError(f"{path} already exists; choose a new -o path or pass --overwrite to replace it")
    return path


def check_not_input(path: Path, inputs: Sequence[str | os.PathLike | None]) -> None:
    """Refuse an output that is (or, for a folder, holds) one of the command's input files."""
    target = Path(path).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if source == target or target in source.parents:
            raise ReceError(f"the output {path} would replace the input {given}; write to another -o path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_prefix(path: Path) -> str:
    """Temporary names beside `path` carry the writing process's pid: `.NAME.PID.RANDOM.tmp`."""
    return f".{path.name}.{os.getpid()}."


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries that a killed writer of `path` left beside it (`stale_temporary`); those of a live
    process are kept. Returns what was removed."""
    removed = []
    parent = path.parent if str(path.parent) else Path(".")
    for tmp in parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        if stale_temporary(tmp.name, path.name):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def stale_temporary(name: str, target: str) -> bool:
    """Whether `name` is a temporary of `target` (`.TARGET.PID.RANDOM.tmp`) that no running process owns: its pid no
    longer runs, or it has none (written before temporaries carried one)."""
    prefix = f".{target}."
    if not (name.startswith(prefix) and name.endswith(".tmp")):
        return False
    pid = name[len(prefix) :].split(".", 1)[0]
    return not (pid.isdigit() and process_running(int(pid)))


def glob_escape(name: str) -> str:
    """`name` with glob's special characters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def process_running(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over `path`, else delete it."""
    path = check_output_path(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
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
    parent = check_parent(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ReceError(f"output '{path}' already exists; choose a new -o path or pass --overwrite")
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the permissions mkdir would
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error is the disk (or the user's quota) running out: ENOSPC / EDQUOT itself, or a message that holds
    it (shutil.copytree's list of (source, target, reason) strings, safetensors' wrapped I/O error)."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, OSError) and exc.errno in codes:
        return True
    return any(os.strerror(code) in str(exc) for code in codes) or "StorageFull" in str(exc)


@contextlib.contextmanager
def disk_full_reported(output: str | os.PathLike, needed_bytes: Callable[[], int]) -> Iterator[None]:
    """Turn the disk filling up while writing `output` into one line saying so and how much the output needs."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        needed = max(1, round(needed_bytes() / 1e6))
        raise ReceError(
            f"no space left on device writing {output} ({needed} MB needed); free some space or choose another -o"
        ) from None


def folder_bytes(folder: Path) -> int:
    """The bytes a copy of `folder` takes (linked files counted at their targets' size, as copytree copies them)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


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


LOCK_ENV = "RECE_RUN_LOCK"  # the run folder whose lock this process (or its launcher) holds


@contextlib.contextmanager
def run_folder_lock(output: Path) -> Iterator[None]:
    """Hold RUN_DIR for this process: a second rece process on it is refused, naming the pid that holds it.

    The lock is a file beside the folder, `.NAME.rece-lock`, holding the pid; one left by a killed process (its pid no
    longer runs) is taken over. Processes this one starts (--num-processes) inherit it through $RECE_RUN_LOCK.
    """
    output = Path(output)
    if os.environ.get(LOCK_ENV) == str(output.resolve()):
        yield
        return
    lock = make_parent(output) / f".{output.name}.rece-lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock.read_text().strip() if lock.is_file() else ""
            if holder.isdigit() and process_running(int(holder)):
                raise ReceError(
                    f"'{output}' is in use by another rece process (pid {holder}); wait for it or choose another -o"
                ) from None
            lock.unlink(missing_ok=True)  # left by a killed process
    else:
        raise ReceError(f"cannot lock '{output}' ({lock} keeps reappearing); another process is starting on it")
    try:
        os.write(fd, str(os.getpid()).encode())
    except OSError:  # a full disk: no empty lock left behind
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise
    os.close(fd)
    previous = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = str(output.resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous
        lock.unlink(missing_ok=True)
