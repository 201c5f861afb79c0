"""Prompt sets: the published benchmark CSVs (I2P, COCO-30k, Imagenette, artists) or a known name, read as rows.

A row has a case number (its image files' names), a prompt, a seed (`evaluation_seed`, else `default_seed`), an
optional guidance and the set's other columns as labels. `i2p` and `i2p-nudity` can come from the hub.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ReceError
from .hub import cache_root, first_line, hub_offline
from .io import atomic_file
from .provenance import file_sha256

BENCHMARKS_ENV = "RECE_BENCHMARKS"
KNOWN_SETS = {
    "i2p": "i2p.csv",
    "i2p-nudity": "nudity.csv",
    "coco-30k": "coco_30k.csv",
    "imagenette": "imagenette.csv",
    "artists": "big_artist_prompts.csv",
}
I2P_DATASET = ("AIML-TUDA/i2p", "i2p_benchmark.csv")  # the I2P authors' hub dataset (4703 prompts)
HUB_SETS = {"i2p": I2P_DATASET, "i2p-nudity": I2P_DATASET}  # known names with a public hub source
HUB_COLUMNS = {"sd_seed": "evaluation_seed", "sd_guidance_scale": "evaluation_guidance"}  # hub I2P → ESD/UCE/RECE names
NUDITY_CATEGORY = "sexual"  # i2p-nudity from the hub: the I2P rows whose categories include it
INDEX_COLUMNS = ("", "Unnamed: 0")  # the unnamed index column pandas writes
SEED_COLUMNS = ("evaluation_seed", "seed")
MAPPED_COLUMNS = ("prompt", "case_number", "evaluation_guidance") + SEED_COLUMNS


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a set: case number, text, seed, guidance (None: the run's) and the set's other columns."""

    case_number: int
    prompt: str
    seed: int
    guidance: float | None = None
    labels: dict[str, str] = field(default_factory=dict)


def resolve_prompt_set(name_or_path: str | os.PathLike) -> Path:
    """The CSV file of a prompt set: a path, or a known name from $RECE_BENCHMARKS, else (i2p, i2p-nudity) from the hub."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if text in KNOWN_SETS:
        file = KNOWN_SETS[text]
        folder = os.environ.get(BENCHMARKS_ENV)
        if folder and (Path(folder).expanduser() / file).is_file():
            return (Path(folder).expanduser() / file).resolve()
        local = f"{BENCHMARKS_ENV} is '{folder}' but it has no {file}" if folder else f"{BENCHMARKS_ENV} is not set"
        if text not in HUB_SETS:
            raise ReceError(
                f"prompt set '{text}' is a known name but {local}, and it has no public hub source; "
                f"set {BENCHMARKS_ENV} to the folder holding the published {file} (and the other benchmark CSVs), "
                "or pass the CSV's path"
            )
        return hub_prompt_set(text, local)
    if path.is_dir():
        raise ReceError(f"prompt set '{text}' is a folder; pass a CSV file")
    if path.suffix or os.sep in text:
        raise ReceError(f"prompt set '{text}' does not exist; check the path of the CSV file")
    raise ReceError(
        f"prompt set '{text}' is neither a CSV file nor a known name ({', '.join(KNOWN_SETS)}); "
        f"pass a CSV path, or a known name with {BENCHMARKS_ENV} set (i2p and i2p-nudity also load from the hub)"
    )


def benchmarks_cache() -> Path:
    """Where prompt sets made from hub files are kept: $RECE_CACHE/benchmarks (default ~/.cache/rece/benchmarks)."""
    return cache_root() / "benchmarks"


def hub_prompt_set(name: str, local: str = f"{BENCHMARKS_ENV} is not set") -> Path:
    """A known set made from its hub file, in the published format, kept in the benchmarks cache (once per hub version).

    The hub's I2P names its columns sd_seed / sd_guidance_scale and has no case_number; the published i2p.csv
    (ESD, UCE, RECE) calls them evaluation_seed / evaluation_guidance and numbers the rows from 0. i2p-nudity
    is the rows whose categories include 'sexual', with their I2P case numbers. Offline (HF_HUB_OFFLINE=1) only
    the Hugging Face cache is read. `local` says why no local copy was used (for the error messages).
    """
    from huggingface_hub import hf_hub_download

    repo_id, filename = HUB_SETS[name]
    offline = hub_offline()
    try:
        source = Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_files_only=offline))
    except Exception as exc:  # the hub client raises many types: offline, not found, network
        if offline:
            raise ReceError(
                f"prompt set '{name}' is a known name but {local}, and HF_HUB_OFFLINE=1 stops the download of {filename} "
                f"from the hub dataset {repo_id}; set {BENCHMARKS_ENV} to the folder holding {KNOWN_SETS[name]}, "
                "pass the CSV's path, or unset HF_HUB_OFFLINE"
            ) from None
        raise ReceError(
            f"cannot fetch {filename} of the hub dataset {repo_id} for prompt set '{name}' ({first_line(exc)}); check your "
            f"connection, or set {BENCHMARKS_ENV} to a folder holding {KNOWN_SETS[name]}, or pass the CSV's path"
        ) from None
    target = benchmarks_cache() / f"{name}.{repo_id.replace('/', '--')}.{file_sha256(source)[:16]}.csv"
    if not target.is_file():
        _write_published_format(name, source, target)
    return target


def _write_published_format(name: str, source: Path, target: Path) -> None:
    """Write the hub file `source` as the published CSV of set `name` (renamed columns, case numbers, rows kept)."""
    header, records = _read_csv(source)
    if "prompt" not in header:
        raise ReceError(f"the hub file '{source}' of prompt set '{name}' has no 'prompt' column; pass a local CSV of the set")
    renamed = {c: HUB_COLUMNS[c] for c in header if c in HUB_COLUMNS and HUB_COLUMNS[c] not in header}
    add_case = "case_number" not in header
    rows = []
    for index, (_, rec) in enumerate(records):
        categories = [c.strip() for c in (rec.get("categories") or "").split(",")]
        if name == "i2p-nudity" and NUDITY_CATEGORY not in categories:
            continue
        rows.append([rec[c] for c in header] + ([str(index)] if add_case else []))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([renamed.get(c, c) for c in header] + (["case_number"] if add_case else []))
        writer.writerows(rows)


def default_seed(case_number: int) -> int:
    """The seed of a row without evaluation_seed: the first 4 bytes of sha256 of its case number."""
    return int.from_bytes(hashlib.sha256(str(case_number).encode()).digest()[:4], "big")


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, record) pairs of a CSV file; malformed lines are errors."""
    records = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = header
            for rec in reader:
                if None in rec or None in rec.values():
                    count = len(header) + len(rec.get(None, [])) if None in rec else sum(v is not None for v in rec.values())
                    raise ReceError(
                        f"line {reader.line_num} of prompt set '{path}' has {count} fields but the header has {len(header)}; "
                        "quote fields that contain commas"
                    )
                records.append((reader.line_num, rec))
    except UnicodeDecodeError:
        raise ReceError(f"prompt set '{path}' is not UTF-8 text; save it as a UTF-8 CSV file") from None
    except csv.Error as exc:
        raise ReceError(f"prompt set '{path}' is not a readable CSV file ({exc}); fix or re-export it") from None
    if not header:
        raise ReceError(f"prompt set '{path}' is empty; give a CSV file with a header line and a prompt column")
    return header, records


def _parse_int(text: str, column: str, line: int, path: Path) -> int:
    """An integer cell; '12.0' (as pandas writes integers next to missing values) counts as 12."""
    try:
        value = float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and not value.is_integer()):
        raise ReceError(f"{column} '{text}' on line {line} of prompt set '{path}' is not an integer; fix that cell")
    return int(value)


def _parse_row(rec: dict[str, str], index: int, line: int, path: Path, header: Sequence[str]) -> PromptRow:
    """Map one CSV record to a PromptRow (case number defaults to the row index, seed to default_seed)."""
    case_text = (rec.get("case_number") or "").strip()
    case = _parse_int(case_text, "case_number", line, path) if case_text else index
    seed_column = next((c for c in SEED_COLUMNS if c in rec), None)
    seed_text = (rec.get(seed_column) or "").strip() if seed_column else ""
    seed = _parse_int(seed_text, seed_column, line, path) if seed_text else default_seed(case)
    if not 0 <= seed < 2**63:
        raise ReceError(f"seed {seed} on line {line} of prompt set '{path}' is outside 0 .. 2^63-1; fix that cell")
    guidance_text = (rec.get("evaluation_guidance") or "").strip()
    guidance = None
    if guidance_text:
        try:
            guidance = float(guidance_text)
        except ValueError:
            guidance = math.nan
        if not math.isfinite(guidance):
            raise ReceError(f"evaluation_guidance '{guidance_text}' on line {line} of prompt set '{path}' is not a number")
    labels = {c: rec[c] for c in header if c not in MAPPED_COLUMNS and c not in INDEX_COLUMNS}
    return PromptRow(case_number=case, prompt=rec["prompt"], seed=seed, guidance=guidance, labels=labels)


def load_prompt_set(name_or_path: str | os.PathLike, limit: int | None = None) -> list[PromptRow]:
    """Rows of a prompt set CSV (I2P, COCO-30k, Imagenette and artist formats) or known name; the first `limit` rows.

    The whole file is checked whatever `limit`: a damaged set fails before any image is made.
    """
    if limit is not None and limit < 1:
        raise ReceError(f"--limit must be at least 1 (got {limit})")
    path = resolve_prompt_set(name_or_path)
    header, records = _read_csv(path)
    if "prompt" not in header:
        raise ReceError(
            f"prompt set '{path}' has no 'prompt' column (columns: {', '.join(repr(c) for c in header)}); "
            "give a CSV with a prompt column"
        )
    rows, seen = [], {}
    for index, (line, rec) in enumerate(records):
        row = _parse_row(rec, index, line, path, header)
        if row.case_number in seen:
            raise ReceError(
                f"case_number {row.case_number} appears on lines {seen[row.case_number]} and {line} of prompt set '{path}'; "
                "case numbers name the image files, make them unique"
            )
        seen[row.case_number] = line
        rows.append(row)
    if not rows:
        raise ReceError(f"prompt set '{path}' has a header but no prompts; give a CSV with at least one row")
    return rows[:limit] if limit else rows
