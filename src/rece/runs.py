"""The run-folder format that `rece generate` and `rece attack` write and `rece evaluate` / `rece report` read.

RUN_DIR/images/{case_number}_{k}.png   each written atomically
RUN_DIR/prompts.csv                     one line per image: case_number, k, seed, prompt, guidance, image, labels
RUN_DIR/manifest.json                   `settings` (what the images depend on, compared on reruns) and records
RUN_DIR/metrics.json, metrics_<m>.csv   what `rece evaluate` measured
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ReceError
from .io import atomic_file, check_folder_parent, stale_temporary
from .provenance import file_sha256

IMAGES = "images"
MANIFEST = "manifest.json"
PROMPTS = "prompts.csv"
METRICS_JSON = "metrics.json"
GENERATE_FORMAT = "rece-generate"
ATTACK_FORMAT = "rece-attack"
FORMAT_NAMES = {GENERATE_FORMAT: "rece generate", ATTACK_FORMAT: "rece attack"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Run:
    """A folder of images (`images/` of a run, or the folder itself) and, for runs, the rows of prompts.csv by file name."""

    path: Path
    image_dir: Path
    images: list[str]
    prompts: dict[str, dict[str, str]] | None = None


# -- image names ----------------------------------------------------------------------------------
def image_name(case_number: int, k: int) -> str:
    """File name of image k of a row, inside RUN_DIR/images."""
    return f"{case_number}_{k}.png"


def expected_images(rows: Sequence, images_per_prompt: int) -> list[str]:
    """File names of every image of `rows` (anything with a case_number), in order."""
    return [image_name(r.case_number, k) for r in rows for k in range(images_per_prompt)]


def finished_images(images_dir: Path) -> set[str]:
    """Names of the complete (non-empty) images in a run's image folder; temporary files do not count."""
    if not images_dir.is_dir():
        return set()
    with os.scandir(images_dir) as entries:
        return {e.name for e in entries if e.name.endswith(".png") and not e.name.startswith(".") and e.stat().st_size > 0}


def image_set_digest(image_dir: Path, names: Sequence[str]) -> str:
    """sha256 prefix of a run's image names and sizes: a metric records it, so a report knows when the images changed."""
    h = hashlib.sha256()
    for name in sorted(names):
        try:
            size = (image_dir / name).stat().st_size
        except OSError:
            size = -1
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def damaged_images(image_dir: Path, names: Sequence[str]) -> list[str]:
    """Those of `names` present in `image_dir` that are not complete images (a truncated or corrupt file)."""
    from PIL import Image

    bad = []
    for name in names:
        file = image_dir / name
        if not file.is_file():
            continue
        try:
            with Image.open(file) as image:
                image.verify()  # reads it through, checking every chunk's CRC
        except Exception:  # PIL raises many kinds for damaged files
            bad.append(name)
    return bad


def drop_damaged_images(image_dir: Path, names: Sequence[str]) -> list[str]:
    """Delete the damaged ones of `names` so that a resumed run makes them again (with a one-line warning)."""
    bad = damaged_images(image_dir, names)
    for name in bad:
        (image_dir / name).unlink(missing_ok=True)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"{len(bad)} damaged image(s) in '{image_dir}' will be made again: {shown}", stacklevel=2)
    return bad


def count_done(images_dir: Path, names: set[str]) -> int:
    """How many of `names` are in the image folder (a cheap listing, for progress bars)."""
    try:
        return len(names.intersection(os.listdir(images_dir)))
    except FileNotFoundError:
        return 0


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside a name numerically ('2_0' before '10_0')."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def image_files(folder: Path) -> list[str]:
    """Names of the non-empty image files directly in `folder`, sorted naturally."""
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith(".") and e.stat().st_size > 0
        ]
    return sorted(names, key=natural_key)


def remove_stale_temps(images_dir: Path, names: set[str]) -> None:
    """Delete temporary files a killed process left for images of `names` (atomic_file's `.NAME.PID.*.tmp`); those of
    a process still running (another generate in the same folder) are left alone."""
    with os.scandir(images_dir) as entries:
        for e in entries:
            image = e.name[1:].partition(".png.")[0] + ".png"
            if image in names and stale_temporary(e.name, image):
                Path(e.path).unlink(missing_ok=True)


# -- reading ----------------------------------------------------------------------------------------
def read_prompts(path: Path) -> dict[str, dict[str, str]]:
    """Rows of a run's prompts.csv keyed by image file name."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReceError(f"cannot read '{path}' ({exc}); rerun `rece generate` on that folder to rewrite it") from None
    out = {}
    for row in rows:
        name = Path(row.get("image") or "").name or f"{row.get('case_number')}_{row.get('k', 0)}.png"
        out[name] = row
    return out


def load_run(path: str | os.PathLike, what: str = "run folder") -> Run:
    """A run folder (images/ + prompts.csv) or a plain folder of images."""
    path = Path(path)
    if not path.is_dir():
        raise ReceError(f"{what} '{path}' does not exist or is not a folder; pass a `rece generate` output folder")
    image_dir = path / IMAGES if (path / IMAGES).is_dir() else path
    images = image_files(image_dir)
    if not images:
        raise ReceError(f"{what} '{path}' has no images (looked in '{image_dir}'); generate them first with `rece generate`")
    prompts = read_prompts(path / PROMPTS) if (path / PROMPTS).is_file() else None
    return Run(path=path, image_dir=image_dir, images=images, prompts=prompts)


def read_manifest(run_dir: Path) -> dict:
    """A run's manifest.json ({} when it has none or it is unreadable)."""
    path = Path(run_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- writing ----------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as a CSV file atomically; columns default to every key, in first-seen order."""
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def edit_record(path: Path, edit, allow_other_base: bool) -> dict:
    """What a manifest records about one applied edit file."""
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "method": edit.method,
        "concepts": edit.concepts,
        "base_fingerprint": edit.base_fingerprint,
        "created": edit.metadata.get("created"),
        "allow_other_base": allow_other_base,
    }


# -- opening a run folder ----------------------------------------------------------------------------
def check_output_folder(output: str | os.PathLike) -> Path:
    """RUN_DIR as a Path after checking that it is not a file, nor inside one (missing parents are created later)."""
    path = Path(output)
    check_folder_parent(path)
    if path.exists() and not path.is_dir():
        raise ReceError(f"output '{path}' is a file; -o names a run folder, choose another path")
    return path


def _differences(old: dict, new: dict, partial: bool = False) -> list[str]:
    """Human-readable differences between two settings dicts (only `new`'s keys when `partial`)."""
    out = []
    for key in list(new) + ([] if partial else [k for k in old if k not in new]):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            out.append(f"{key} differ")
        else:
            out.append(f"{key} {a} → now {b}")
    return out


def check_manifest(run_dir: Path, settings: dict, partial: bool = False) -> dict:
    """The manifest of an existing run (empty if none); a ReceError if its settings differ from `settings`."""
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        return {}
    try:
        old = json.loads(manifest_path.read_text())
        old_settings = old["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ReceError(f"'{manifest_path}' is damaged; choose a new -o path or pass --overwrite") from None
    diff = _differences(old_settings, json.loads(json.dumps(settings)), partial)
    if diff:
        raise ReceError(
            f"settings differ from the manifest of '{run_dir}' ({'; '.join(diff[:3])}); choose a new -o path or pass --overwrite"
        )
    return old


def replaceable(run_dir: Path, settings: dict, fmt: str) -> bool:
    """Whether a run folder of format `fmt` has a manifest of other settings but no finished image yet (a run refused
    or stopped before its first image), so that a rerun with other settings may replace it."""
    if finished_images(Path(run_dir) / IMAGES):
        return False
    old = read_manifest(run_dir)
    if not isinstance(old.get("settings"), dict) or old.get("format", GENERATE_FORMAT) != fmt:
        return False
    return bool(_differences(old["settings"], json.loads(json.dumps(settings))))


def check_overwrite_keeps(output: Path, inputs: Sequence[str | os.PathLike | None], outputs: Sequence[str] = ()) -> None:
    """Refuse, before any work, an --overwrite that would delete one of the command's inputs: a file inside RUN_DIR
    named like what it removes (images/, the manifest, prompts.csv, the `outputs` patterns)."""
    root = Path(output).resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if root not in source.parents:
            continue
        relative = source.relative_to(root)
        removed = relative.parts[0] == IMAGES or any(relative.match(n) for n in (MANIFEST, PROMPTS, *outputs))
        if removed:
            raise ReceError(f"--overwrite would delete the input {given} inside '{output}'; move it out of the run folder first")


def open_run_folder(output: Path, settings: dict, fmt: str, overwrite: bool = False, outputs: Sequence[str] = ()) -> dict:
    """Create or check RUN_DIR for a run of format `fmt` with `settings`; return the existing manifest ({} for a new run).

    `overwrite` first removes images/, the manifest, prompts.csv and the other `outputs` (names or glob patterns) and
    keeps any other file; without it a folder holding other files, or a run of other settings or format, is refused.
    """
    path = check_output_folder(output)
    if not overwrite and replaceable(path, settings, fmt):
        overwrite = True  # a run stopped before its first image: nothing depends on its settings, this run's replace them
    if path.is_dir() and overwrite:
        shutil.rmtree(path / IMAGES, ignore_errors=True)
        for name in (MANIFEST, PROMPTS, *outputs):
            for stale in path.glob(name):
                stale.unlink()
    old = check_manifest(path, settings) if (path / MANIFEST).is_file() else {}
    what = FORMAT_NAMES[fmt]
    if old and old.get("format", GENERATE_FORMAT) != fmt:
        raise ReceError(f"'{path}' is a {old.get('format', 'different')} run, not a {what} run; choose a new -o path")
    # a run killed between making images/ and writing its manifest left only an empty images/: resume it
    started = (
        [e for e in path.iterdir() if not (e.name == IMAGES and e.is_dir() and not any(e.iterdir()))] if path.is_dir() else []
    )
    if not old and not overwrite and started:
        raise ReceError(f"'{path}' exists and is not a {what} run (no {MANIFEST}); choose a new -o or pass --overwrite")
    (path / IMAGES).mkdir(parents=True, exist_ok=True)
    return old
