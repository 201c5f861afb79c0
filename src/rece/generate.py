"""`rece generate`: the images of a prompt set from a model with edits applied, resumable and sharded across processes.

A run folder holds `images/{case_number}_{k}.png` (each written atomically), `manifest.json` (what the
images depend on, checked on every rerun) and `prompts.csv` (one line per image, with the set's labels).

Seeds: image k of a row (k = 0 .. images_per_prompt-1) starts from the noise of its own
`torch.Generator("cpu").manual_seed(seed + k)`, where `seed` is the row's `evaluation_seed`, or, when the
row has none, `default_seed(case_number)`. Noise is drawn on the CPU whatever the device (like the
ESD/UCE evaluation scripts), so an image depends only on its row and k: not on the batch size, the
other rows in its batch, the number of processes or the GPU it ran on (up to the UNet's numerics).

Sharding: row i of the prompt set (after --limit) goes to process i % N, with all of its images. With
`num_processes=N` rece starts N local processes itself; under `accelerate launch` or `torchrun`,
RANK/WORLD_SIZE/LOCAL_RANK pick the shard and rank 0 writes the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch

from .errors import ReceError
from .io import atomic_file

BENCHMARKS_ENV = "RECE_BENCHMARKS"
CACHE_ENV = "RECE_CACHE"
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
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",  # the RECE/UCE evaluation scripts' sampler; needs scipy
}
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
INDEX_COLUMNS = ("", "Unnamed: 0")  # the unnamed index column pandas writes
SEED_COLUMNS = ("evaluation_seed", "seed")
MAPPED_COLUMNS = ("prompt", "case_number", "evaluation_guidance") + SEED_COLUMNS
MANIFEST = "manifest.json"
PROMPTS = "prompts.csv"
IMAGES = "images"
MANIFEST_FORMAT = "rece-generate"
SEED_CONVENTION = (
    "image k of a row: torch.Generator('cpu').manual_seed(seed + k); "
    "seed = the row's evaluation_seed, else the first 4 bytes (big-endian) of sha256(str(case_number))"
)
BARRIER_TIMEOUT = timedelta(days=7)  # ranks wait for the slowest one at the end of a run


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a set: case number, text, seed, guidance (None: the run's) and the set's other columns."""

    case_number: int
    prompt: str
    seed: int
    guidance: float | None = None
    labels: dict[str, str] = field(default_factory=dict)


# -- prompt sets ---------------------------------------------------------------------------------
def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no downloads (1, true, yes or on, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


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
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rece").expanduser() / "benchmarks"


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
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReceError(
            f"cannot fetch {filename} of the hub dataset {repo_id} for prompt set '{name}' ({reason}); check your "
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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    return rows[:limit] if limit else rows


# -- run folders ----------------------------------------------------------------------------------
def image_name(case_number: int, k: int) -> str:
    """File name of image k of a row, inside RUN_DIR/images."""
    return f"{case_number}_{k}.png"


def expected_images(rows: Sequence[PromptRow], images_per_prompt: int) -> list[str]:
    """File names of every image of `rows`, in order."""
    return [image_name(r.case_number, k) for r in rows for k in range(images_per_prompt)]


def finished_images(images_dir: Path) -> set[str]:
    """Names of the complete (non-empty) images in a run's image folder; temporary files do not count."""
    if not images_dir.is_dir():
        return set()
    with os.scandir(images_dir) as entries:
        return {e.name for e in entries if e.name.endswith(".png") and not e.name.startswith(".") and e.stat().st_size > 0}


def count_done(images_dir: Path, names: set[str]) -> int:
    """How many of `names` are in the image folder (a cheap listing, for progress bars)."""
    try:
        return len(names.intersection(os.listdir(images_dir)))
    except FileNotFoundError:
        return 0


def shard_rows(rows: Sequence[PromptRow], rank: int, world: int) -> list[PromptRow]:
    """The rows process `rank` of `world` generates: row i goes to process i % world."""
    return list(rows[rank::world])


def check_output_folder(output: str | os.PathLike) -> Path:
    """RUN_DIR as a Path after checking that its parent exists and that it is not a file."""
    path = Path(output)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ReceError(f"output folder '{parent}' does not exist; create it first or choose another -o path")
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


def known_settings(job: RunJob) -> dict:
    """The manifest settings known before the model is loaded, for an early refusal."""
    settings = {
        "prompts_sha256": file_sha256(resolve_prompt_set(job.prompts)),
        "steps": job.steps,
        "guidance": job.guidance,
        "images_per_prompt": job.images_per_prompt,
    }
    if all(Path(e).is_file() for e in job.edits):
        settings["edits"] = [file_sha256(e) for e in job.edits]
    settings.update({k: v for k, v in (("height", job.height), ("width", job.width)) if v is not None})
    if job.scheduler is not None:
        settings["scheduler"] = SCHEDULERS[job.scheduler]
    return settings


def prepare_run_folder(output: Path, manifest: dict, overwrite: bool = False) -> dict:
    """Create or check RUN_DIR against `manifest` (refusing other settings); return the manifest to write."""
    path = check_output_folder(output)
    manifest_path = path / MANIFEST
    if path.is_dir() and overwrite:
        shutil.rmtree(path / IMAGES, ignore_errors=True)
        for name in (MANIFEST, PROMPTS):
            (path / name).unlink(missing_ok=True)
    elif manifest_path.is_file():
        old = check_manifest(path, manifest["settings"])
        manifest = {**manifest, "created": old.get("created", manifest["created"])}
    elif path.is_dir() and any(path.iterdir()):
        raise ReceError(f"'{path}' exists and is not a rece generate run (no {MANIFEST}); choose a new -o or pass --overwrite")
    (path / IMAGES).mkdir(parents=True, exist_ok=True)
    return manifest


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_prompts_csv(path: Path, rows: Sequence[PromptRow], images_per_prompt: int, guidance: float) -> None:
    """Write RUN_DIR/prompts.csv atomically: one line per image with its seed, guidance and the set's labels."""
    columns = ["case_number", "k", "seed", "prompt", "guidance", "image"]
    columns += [c for c in (rows[0].labels if rows else {}) if c not in columns]
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                for k in range(images_per_prompt):
                    writer.writerow(
                        {
                            **row.labels,
                            "case_number": row.case_number,
                            "k": k,
                            "seed": row.seed + k,
                            "prompt": row.prompt,
                            "guidance": row.guidance if row.guidance is not None else guidance,
                            "image": f"{IMAGES}/{image_name(row.case_number, k)}",
                        }
                    )


def _remove_stale_temps(images_dir: Path, names: set[str]) -> None:
    """Delete temporary files a killed process left for images of `names` (atomic_file's `.NAME.*.tmp`)."""
    with os.scandir(images_dir) as entries:
        for e in entries:
            if e.name.startswith(".") and e.name.endswith(".tmp") and e.name[1:].split(".png.")[0] + ".png" in names:
                Path(e.path).unlink(missing_ok=True)


# -- models ---------------------------------------------------------------------------------------
def _model_folder(model: str) -> Path:
    """Local diffusers folder of MODEL (a folder, a known name or a hub id)."""
    from .edit import _full_snapshot
    from .models import HUB_ID, NAMED_MODELS, named_model_path

    if model in NAMED_MODELS:
        return named_model_path(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ReceError(f"'{model}' is not a diffusers folder or a .safetensors checkpoint; pass one of those or a hub id")
    if HUB_ID.match(model) and not model.startswith((".", "/")):
        return _full_snapshot(model)
    raise ReceError(f"model path '{model}' does not exist; pass a diffusers folder, a hub id or a .safetensors checkpoint")


def _load_failed(model: str, exc: Exception, hint: str) -> ReceError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ReceError(f"cannot load pipeline '{model}' ({reason}); {hint}")


def load_pipeline(model, config: str | None = None):
    """A full StableDiffusionPipeline / StableDiffusionXLPipeline (float32, no safety checker) for MODEL."""
    import diffusers

    from .models import SINGLE_FILE_SUFFIXES, _read_model_index, load_single_file_pipeline

    if hasattr(model, "unet"):
        pipe = model
    elif Path(str(model)).expanduser().is_file() and Path(str(model)).suffix in SINGLE_FILE_SUFFIXES:
        pipe = load_single_file_pipeline(Path(str(model)).expanduser(), config)
    else:
        folder = _model_folder(str(model))
        class_name = _read_model_index(folder).get("_class_name")
        if class_name not in PIPELINES:
            raise ReceError(f"'{model}' is a {class_name}; rece generate runs {' and '.join(PIPELINES)} folders")
        kwargs = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **kwargs)
        except Exception as exc:  # missing components, damaged files
            raise _load_failed(str(model), exc, "the pipeline folder is incomplete; re-download it") from None
    if type(pipe).__name__ not in PIPELINES:
        raise ReceError(f"'{type(pipe).__name__}' is not supported; rece generate runs {' and '.join(PIPELINES)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_fingerprint(pipe) -> str:
    """kv_fingerprint of a pipeline's current cross-attention K/V weights."""
    from .models import KV_WEIGHT, kv_fingerprint

    return kv_fingerprint({n: m.weight for n, m in pipe.unet.named_modules() if KV_WEIGHT.search(n + ".weight")})


def set_scheduler(pipe, name: str | None) -> None:
    """Replace the pipeline's scheduler by the named one, built from the model's scheduler config."""
    import diffusers

    if name is None:
        return
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def resolve_device(device: str | None, local_rank: int = 0) -> str:
    """The torch device of one process: `cuda` means cuda:LOCAL_RANK; None means cuda if available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ReceError(f"'{device}' is not a torch device; use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReceError(f"--device {device} but CUDA is not available on this machine; use --device cpu")
    if device == "cuda":
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


# -- the run ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunJob:
    """Everything one process needs to generate its shard (picklable unless `model` is a pipeline object)."""

    model: object
    prompts: str
    output: Path
    edits: tuple[str, ...] = ()
    steps: int = 50
    guidance: float = 7.5
    images_per_prompt: int = 1
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    limit: int | None = None
    device: str | None = None
    allow_other_base: bool = False
    overwrite: bool = False
    config: str | None = None
    progress: bool = True
    threads: int | None = None


def check_options(job: RunJob) -> None:
    """Validate the numeric and named options of a run before anything is loaded."""
    for name, value in (("--steps", job.steps), ("--images-per-prompt", job.images_per_prompt), ("--batch-size", job.batch_size)):
        if value < 1:
            raise ReceError(f"{name} must be at least 1 (got {value})")
    if not math.isfinite(job.guidance):
        raise ReceError(f"--guidance must be a finite number (got {job.guidance})")
    for name, value in (("--height", job.height), ("--width", job.width)):
        if value is not None and (value < 8 or value % 8):
            raise ReceError(f"{name} must be a positive multiple of 8 (got {value})")
    if job.limit is not None and job.limit < 1:
        raise ReceError(f"--limit must be at least 1 (got {job.limit})")
    if job.scheduler is not None and job.scheduler not in SCHEDULERS:
        raise ReceError(f"unknown scheduler '{job.scheduler}'; choose one of: {', '.join(SCHEDULERS)}")
    if job.scheduler == "lms" and importlib.util.find_spec("scipy") is None:
        raise ReceError("--scheduler lms needs scipy (diffusers' LMSDiscreteScheduler uses it); pip install scipy")


def launcher_shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) from RANK/WORLD_SIZE/LOCAL_RANK as set by accelerate launch or torchrun."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE") or env.get("LOCAL_WORLD_SIZE") or 1)
        rank = int(env.get("RANK") or env.get("LOCAL_RANK") or 0)
        local = int(env.get("LOCAL_RANK") or rank)
    except ValueError:
        raise ReceError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer; launch with accelerate launch or torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise ReceError(f"RANK {rank} is not within WORLD_SIZE {world}; launch with accelerate launch or torchrun")
    return rank, world, local


def build_manifest(job: RunJob, pipe, model_info: dict, edit_infos: list[dict], prompt_info: dict, world: int) -> dict:
    """The run's manifest: `settings` (what the images depend on, compared on reruns) and descriptive sections."""
    from .edit import library_versions

    scheduler_config = {k: v for k, v in json.loads(pipe.scheduler.to_json_string()).items() if k != "_diffusers_version"}
    settings = {
        "pipeline": model_info["pipeline"],
        "model_fingerprint": model_info["fingerprint"],
        "edits": [e["sha256"] for e in edit_infos],
        "prompts_sha256": prompt_info["sha256"],
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": scheduler_config,
        "steps": job.steps,
        "guidance": job.guidance,
        "height": job.height,
        "width": job.width,
        "images_per_prompt": job.images_per_prompt,
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "seeds": SEED_CONVENTION,
    }
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "settings": json.loads(json.dumps(settings)),
        "model": model_info,
        "edits": edit_infos,
        "prompts": prompt_info,
        "sampler": {"scheduler": settings["scheduler"], "steps": job.steps, "guidance": job.guidance},
        "run": {"batch_size": job.batch_size, "processes": world, "device": str(pipe.device), "limit": job.limit},
        "versions": library_versions(),
        "created": now,
        "updated": now,
    }


@dataclass
class Prepared:
    """A process's loaded pipeline (edits applied), its rows, the run's manifest, and what to undo on a caller's pipeline."""

    pipe: object
    rows: list[PromptRow]
    job: RunJob
    scheduler: object
    manifest: dict = field(default_factory=dict)
    applied: list = field(default_factory=list)


def _model_info(model, pipe) -> dict:
    """Where the model came from and the fingerprint of its K/V weights (before edits)."""
    from .models import NAMED_MODELS, named_model_path

    if hasattr(model, "unet"):
        source, path = type(model).__name__, None
    else:
        source, local = str(model), Path(str(model)).expanduser()
        path = str(named_model_path(source)) if source in NAMED_MODELS else str(local.resolve()) if local.exists() else None
    return {"source": source, "path": path, "pipeline": type(pipe).__name__, "fingerprint": pipeline_fingerprint(pipe)}


def _edit_info(path: Path, edit, allow_other_base: bool) -> dict:
    """What the manifest records about one applied edit file."""
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "method": edit.method,
        "concepts": edit.concepts,
        "base_fingerprint": edit.fingerprint,
        "created": edit.metadata.get("created"),
        "allow_other_base": allow_other_base,
    }


def _prompt_info(job: RunJob, set_path: Path, all_rows: list[PromptRow], rows: list[PromptRow]) -> dict:
    """What the manifest records about the prompt set."""
    return {
        "source": job.prompts,
        "path": str(set_path),
        "sha256": file_sha256(set_path),
        "rows": len(all_rows),
        "rows_used": len(rows),
        "row_guidance": any(r.guidance is not None for r in rows),
        "label_columns": list(rows[0].labels) if rows else [],
    }


def prepare(job: RunJob, local_rank: int, world: int) -> Prepared:
    """Load the prompt set, the pipeline and its edits on this process's device; build the manifest."""
    from .edit import load_edit

    set_path = resolve_prompt_set(job.prompts)
    all_rows = load_prompt_set(set_path)
    rows = all_rows[: job.limit] if job.limit else all_rows
    edits = [(Path(p), load_edit(p)) for p in job.edits]
    caller_pipe = hasattr(job.model, "unet")
    device = None if caller_pipe and job.device is None else resolve_device(job.device, local_rank)
    pipe = load_pipeline(job.model, job.config)
    prepared = Prepared(pipe=pipe, rows=rows, job=job, scheduler=pipe.scheduler)
    try:
        model_info = _model_info(job.model, pipe)
        for _, edit in edits:
            edit.apply(pipe, allow_other_base=job.allow_other_base)
            prepared.applied.append(edit)
        edit_infos = [_edit_info(path, edit, job.allow_other_base) for path, edit in edits]
        set_scheduler(pipe, job.scheduler)
        if device is not None:
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
            pipe.to(device)
        size = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
        prepared.job = replace(job, height=job.height or size, width=job.width or size)
        prompt_info = _prompt_info(job, set_path, all_rows, rows)
        prepared.manifest = build_manifest(prepared.job, pipe, model_info, edit_infos, prompt_info, world)
    except BaseException:
        restore(prepared)
        raise
    return prepared


def restore(prepared: Prepared) -> None:
    """Undo what `prepare` changed on a pipeline object the caller passed (edits, scheduler)."""
    if not hasattr(prepared.job.model, "unet"):
        return
    for edit in reversed(prepared.applied):
        edit.revert(prepared.pipe)
    prepared.applied.clear()
    prepared.pipe.scheduler = prepared.scheduler


def seeded_images(pipe, seeds: Sequence[int], **call):
    """One pipeline call whose image i comes from its own CPU generator seeded with seeds[i], so that every image
    can be reproduced alone, at any batch size and on any device; `call` holds the other pipeline arguments."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return pipe(generator=generators, **call).images


def generate_batch(pipe, batch: Sequence[tuple[PromptRow, int]], guidance: float, steps: int, height: int, width: int):
    """PIL images of (row, k) pairs, each from its own CPU generator seeded with row.seed + k."""
    return seeded_images(
        pipe,
        [row.seed + k for row, k in batch],
        prompt=[row.prompt for row, _ in batch],
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        output_type="pil",
    )


def plan_batches(rows: Sequence[PromptRow], job: RunJob, done: set[str]) -> list[tuple[float, list[tuple[PromptRow, int]]]]:
    """Batches of the images still missing, grouped by guidance (one guidance per pipeline call)."""
    groups: dict[float, list[tuple[PromptRow, int]]] = {}
    for row in rows:
        guidance = row.guidance if row.guidance is not None else job.guidance
        for k in range(job.images_per_prompt):
            if image_name(row.case_number, k) not in done:
                groups.setdefault(guidance, []).append((row, k))
    size = job.batch_size
    return [(g, items[i : i + size]) for g, items in groups.items() for i in range(0, len(items), size)]


def generate_shard(prepared: Prepared, rank: int, world: int, bar=None) -> int:
    """Generate this process's missing images, each written atomically; return how many were written."""
    job, pipe = prepared.job, prepared.pipe
    images_dir = Path(job.output) / IMAGES
    mine = shard_rows(prepared.rows, rank, world)
    _remove_stale_temps(images_dir, set(expected_images(mine, job.images_per_prompt)))
    everything = set(expected_images(prepared.rows, job.images_per_prompt))
    written = 0
    if bar is not None:
        bar.update(count_done(images_dir, everything) - bar.n)
    for guidance, batch in plan_batches(mine, job, finished_images(images_dir)):
        images = generate_batch(pipe, batch, guidance, job.steps, job.height, job.width)
        for (row, k), image in zip(batch, images):
            with atomic_file(images_dir / image_name(row.case_number, k)) as tmp:
                image.save(tmp, format="PNG")
        written += len(batch)
        if bar is not None:
            bar.update(count_done(images_dir, everything) - bar.n)
    return written


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="generating", unit="img", disable=not enabled, dynamic_ncols=True)


def _all_ranks_ok(error: str | None, dist_on: bool) -> None:
    """Raise the first rank's error on every rank (a collective when distributed)."""
    if dist_on:
        import torch.distributed as dist

        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise ReceError(error)


def _init_distributed(world: int, rank: int) -> bool:
    """Join the process group of a launched run (gloo); return True when this call created it."""
    import torch.distributed as dist

    if world == 1 or dist.is_initialized():
        return False
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise ReceError("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not; launch with accelerate launch or torchrun")
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
    return True


def run_rank(job: RunJob, rank: int, world: int, local_rank: int) -> int:
    """One process of a run: prepare, let rank 0 set up the folder, generate the shard; return images written."""
    import torch.distributed as dist

    if job.threads:
        torch.set_num_threads(job.threads)
    created = _init_distributed(world, rank)
    dist_on = world > 1
    prepared = None
    try:
        error = None
        try:
            prepared = prepare(job, local_rank, world)
        except ReceError as exc:
            error = str(exc)
        _all_ranks_ok(error, dist_on)
        output = Path(job.output)
        if rank == 0:
            try:
                manifest = prepare_run_folder(output, prepared.manifest, job.overwrite)
                write_json(output / MANIFEST, manifest)
                write_prompts_csv(output / PROMPTS, prepared.rows, job.images_per_prompt, job.guidance)
            except ReceError as exc:
                error = str(exc)
        _all_ranks_ok(error, dist_on)
        names = set(expected_images(prepared.rows, job.images_per_prompt))
        show = job.progress and rank == 0
        with _progress_bar(len(names), count_done(output / IMAGES, names), show) as bar:
            written = generate_shard(prepared, rank, world, bar if show else None)
            if dist_on:
                dist.barrier()
            bar.update(count_done(output / IMAGES, names) - bar.n)
        return written
    finally:
        if prepared is not None:
            restore(prepared)
        if created:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_worker() -> None:
    """No library progress bars or advisory logs in worker processes."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _worker(rank: int, world: int, port: int, job: RunJob, errors) -> None:
    """Entry point of a process started by `spawn_run`; a ReceError goes to the parent through `errors`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _quiet_worker()
    try:
        run_rank(job, rank, world, rank)
    except ReceError as exc:
        errors.put(str(exc))
        raise SystemExit(2) from None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def spawn_run(job: RunJob, processes: int) -> None:
    """Run `processes` local processes (spawned, one device each) and show their joint progress here.

    The bar starts once rank 0 has accepted the run folder (rewritten manifest.json).
    """
    import logging

    import torch.multiprocessing as mp

    rows = load_prompt_set(job.prompts, job.limit)
    names = set(expected_images(rows, job.images_per_prompt))
    output = Path(job.output)
    threads = job.threads or max(1, torch.get_num_threads() // processes)
    worker_job = replace(job, progress=False, threads=threads)
    errors = mp.get_context("spawn").SimpleQueue()
    before = _mtime(output / MANIFEST)
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")  # it warns when it stops the other workers
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    bar = None
    context = mp.start_processes(
        _worker, args=(processes, _free_port(), worker_job, errors), nprocs=processes, join=False, start_method="spawn"
    )
    try:
        while not context.join(timeout=1.0, grace_period=10.0):
            if bar is None and _mtime(output / MANIFEST) != before:
                bar = _progress_bar(len(names), count_done(output / IMAGES, names), job.progress)
            if bar is not None:
                bar.update(count_done(output / IMAGES, names) - bar.n)
        bar = bar or _progress_bar(len(names), 0, job.progress)
        bar.update(count_done(output / IMAGES, names) - bar.n)
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        if not errors.empty():
            raise ReceError(errors.get()) from None
        raise
    except KeyboardInterrupt:
        for process in context.processes:
            process.terminate()
        raise
    finally:
        spawn_log.setLevel(level)
        if bar is not None:
            bar.close()


def generate_run(
    model,
    prompts: str | os.PathLike,
    output: str | os.PathLike,
    edits: Sequence[str | os.PathLike] = (),
    steps: int = 50,
    guidance: float = 7.5,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    limit: int | None = None,
    device: str | None = None,
    num_processes: int = 1,
    allow_other_base: bool = False,
    overwrite: bool = False,
    config: str | None = None,
    progress: bool = True,
) -> Path:
    """Generate (or finish) the images of a prompt set into RUN_DIR `output`; return RUN_DIR.

    `model` is a diffusers folder, hub id, single-file checkpoint, `shapes`/`tiny`, or a pipeline object
    (used as is, edits reverted afterwards). `device` None picks cuda when available, else cpu.
    """
    job = RunJob(
        model=model if hasattr(model, "unet") else str(model),
        prompts=str(prompts),
        output=Path(output),
        edits=tuple(str(e) for e in edits),
        steps=steps,
        guidance=float(guidance),
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        height=height,
        width=width,
        scheduler=scheduler,
        limit=limit,
        device=device,
        allow_other_base=allow_other_base,
        overwrite=overwrite,
        config=None if config is None else str(config),
        progress=progress,
    )
    check_options(job)
    if num_processes < 1:
        raise ReceError(f"--num-processes must be at least 1 (got {num_processes})")
    check_output_folder(job.output)
    if not overwrite:
        check_manifest(job.output, known_settings(job), partial=True)
    rank, world, local_rank = launcher_shard()
    if world > 1 and num_processes > 1:
        raise ReceError("--num-processes starts local processes itself; under accelerate launch or torchrun leave it at 1")
    if num_processes > 1:
        if hasattr(model, "unet"):
            raise ReceError("a pipeline object cannot be shared with other processes; pass its folder for --num-processes > 1")
        spawn_run(job, num_processes)
    else:
        run_rank(job, rank, world, local_rank)
    return job.output
