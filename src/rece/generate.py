"""`rece generate`: the images of a prompt set from a model with edits applied, resumable and sharded across processes.

A run folder (`rece.runs`) holds `images/{case_number}_{k}.png` (each written atomically), `manifest.json` (what the
images depend on, checked on every rerun) and `prompts.csv` (one line per image, with the set's labels).

Seeds: image k of a row (k = 0 .. images_per_prompt-1) starts from the noise of its own
`torch.Generator("cpu").manual_seed(seed + k)`, where `seed` is the row's `evaluation_seed`, or, when the
row has none, `default_seed(case_number)`. Noise is drawn on the CPU whatever the device (like the
ESD/UCE evaluation scripts), so an image depends only on its row and k: not on the batch size, the
other rows in its batch, the number of processes or the GPU it ran on (up to the denoiser's numerics).

Sharding: row i of the prompt set (after --limit) goes to process i % N, with all of its images. With
`num_processes=N` rece starts N local processes itself; under `accelerate launch` or `torchrun`,
RANK/WORLD_SIZE/LOCAL_RANK pick the shard and rank 0 writes the manifest.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .budget import require_memory
from .edit import load_edit
from .errors import ReceError
from .families import family_of_pipeline
from .io import atomic_file, run_folder_lock
from .launch import all_ranks_ok, init_distributed, launcher_shard, local_processes, spawn
from .pipelines import SCHEDULERS, denoiser, image_size, load_pipeline, model_record, resolve_device, seeded_images, set_scheduler
from .prompt_sets import PromptRow, load_prompt_set, resolve_prompt_set
from .provenance import file_sha256, library_versions, utc_now
from .runs import (
    GENERATE_FORMAT,
    IMAGES,
    MANIFEST,
    PROMPTS,
    check_manifest,
    check_output_folder,
    check_overwrite_keeps,
    count_done,
    drop_damaged_images,
    edit_record,
    expected_images,
    finished_images,
    image_name,
    open_run_folder,
    remove_stale_temps,
    write_csv,
    write_json,
)
from .sampling import sampling_for
from .sources import is_pipeline

SEED_CONVENTION = (
    "image k of a row: torch.Generator('cpu').manual_seed(seed + k); "
    "seed = the row's evaluation_seed, else the first 4 bytes (big-endian) of sha256(str(case_number))"
)


def shard_rows(rows: Sequence[PromptRow], rank: int, world: int) -> list[PromptRow]:
    """The rows process `rank` of `world` generates: row i goes to process i % world."""
    return list(rows[rank::world])


@dataclass(frozen=True)
class RunJob:
    """Everything one process needs to generate its shard (picklable unless `model` is a pipeline object)."""

    model: object
    prompts: str
    output: Path
    edits: tuple[str, ...] = ()
    steps: int | None = None  # None: the model's default (`sampling.sampling_for`), filled in by `prepare`
    guidance: float | None = None
    sequence_length: int | None = None  # filled in by `prepare`: the T5 rows the edits were erased at (FLUX, SD3)
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
    text_encoders: tuple[str, ...] = ()  # split text encoder files of a single-file model
    vae: str | None = None  # the VAE file of a single-file model that holds none
    progress: bool = True
    threads: int | None = None


def check_options(job: RunJob) -> None:
    """Validate the numeric and named options of a run before anything is loaded."""
    for name, value in (("--steps", job.steps), ("--images-per-prompt", job.images_per_prompt), ("--batch-size", job.batch_size)):
        if value is not None and value < 1:
            raise ReceError(f"{name} must be at least 1 (got {value})")
    if job.guidance is not None and not math.isfinite(job.guidance):
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


def known_settings(job: RunJob) -> dict:
    """The manifest settings known before the model is loaded, for an early refusal."""
    settings = {"prompts_sha256": file_sha256(resolve_prompt_set(job.prompts)), "images_per_prompt": job.images_per_prompt}
    settings.update({k: v for k, v in (("steps", job.steps), ("guidance", job.guidance)) if v is not None})
    if all(Path(e).is_file() for e in job.edits):
        settings["edits"] = [file_sha256(e) for e in job.edits]
    settings.update({k: v for k, v in (("height", job.height), ("width", job.width)) if v is not None})
    if job.scheduler is not None:
        settings["scheduler"] = SCHEDULERS[job.scheduler]
    return settings


def build_manifest(job: RunJob, pipe, model_info: dict, edit_infos: list[dict], prompt_info: dict, world: int) -> dict:
    """The run's manifest: `settings` (what the images depend on, compared on reruns) and descriptive sections."""
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
        **({"max_sequence_length": job.sequence_length} if job.sequence_length is not None else {}),
        "height": job.height,
        "width": job.width,
        "images_per_prompt": job.images_per_prompt,
        "dtype": str(denoiser(pipe).dtype).replace("torch.", ""),
        "seeds": SEED_CONVENTION,
    }
    now = utc_now()
    return {
        "format": GENERATE_FORMAT,
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
    set_path = resolve_prompt_set(job.prompts)
    all_rows = load_prompt_set(set_path)
    rows = all_rows[: job.limit] if job.limit else all_rows
    edits = [(Path(p), load_edit(p)) for p in job.edits]
    caller_pipe = is_pipeline(job.model)
    device = None if caller_pipe and job.device is None else resolve_device(job.device, local_rank)
    pipe = load_pipeline(job.model, job.config, job.text_encoders, job.vae)
    prepared = Prepared(pipe=pipe, rows=rows, job=job, scheduler=pipe.scheduler)
    try:
        model_info = model_record(job.model, pipe, job.text_encoders, job.vae)
        for _, edit in edits:
            edit.apply(pipe, allow_other_base=job.allow_other_base)
            prepared.applied.append(edit)
        edit_infos = [edit_record(path, edit, job.allow_other_base) for path, edit in edits]
        set_scheduler(pipe, job.scheduler)
        if device is not None:
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
            pipe.to(device)
        size = image_size(pipe)
        sampling = sampling_for(job.model, family_of_pipeline(pipe), job.steps, job.guidance, [e for _, e in edits])
        prepared.job = replace(job, height=job.height or size, width=job.width or size, steps=sampling.steps,
                               guidance=sampling.guidance, sequence_length=sampling.sequence_length)  # fmt: skip
        check_image_memory(pipe, prepared.job, len(rows) * job.images_per_prompt, size)
        prompt_info = _prompt_info(job, set_path, all_rows, rows)
        prepared.manifest = build_manifest(prepared.job, pipe, model_info, edit_infos, prompt_info, world)
    except BaseException:
        restore(prepared)
        raise
    return prepared


def decode_bytes(pipe, images: int, height: int, width: int) -> int:
    """A lower bound of the memory one batch of `images` takes to decode: the VAE decoder's full-resolution float32
    activations (its first block's channels per pixel), three alive at once (a block's input, output and residual)."""
    config = getattr(getattr(pipe, "vae", None), "config", None) or {}
    channels = (config.get("decoder_block_out_channels") or config.get("block_out_channels") or [128])[0]
    return 3 * 4 * images * channels * height * width


def check_image_memory(pipe, job: RunJob, images: int, size: int) -> None:
    """Refuse, before the run folder is touched, image sizes whose decoding cannot fit in the free memory."""
    batch = max(1, min(job.batch_size, images))
    need = decode_bytes(pipe, batch, job.height, job.width)
    advice = f"lower --height/--width (this model draws {size}×{size}) or --batch-size"
    require_memory(need, pipe.device, f"decoding {batch} image(s) of {job.width}×{job.height}", advice)


def restore(prepared: Prepared) -> None:
    """Undo what `prepare` changed on a pipeline object the caller passed (edits, scheduler)."""
    if not is_pipeline(prepared.job.model):
        return
    for edit in reversed(prepared.applied):
        edit.revert(prepared.pipe)
    prepared.applied.clear()
    prepared.pipe.scheduler = prepared.scheduler


def write_prompts_csv(path: Path, rows: Sequence[PromptRow], images_per_prompt: int, guidance: float) -> None:
    """Write RUN_DIR/prompts.csv atomically: one line per image with its seed, guidance and the set's labels."""
    columns = ["case_number", "k", "seed", "prompt", "guidance", "image"]
    columns += [c for c in (rows[0].labels if rows else {}) if c not in columns]
    lines = [
        {
            **row.labels,
            "case_number": row.case_number,
            "k": k,
            "seed": row.seed + k,
            "prompt": row.prompt,
            "guidance": row.guidance if row.guidance is not None else guidance,
            "image": f"{IMAGES}/{image_name(row.case_number, k)}",
        }
        for row in rows
        for k in range(images_per_prompt)
    ]
    write_csv(path, lines, columns)


def generate_batch(pipe, batch: Sequence[tuple[PromptRow, int]], guidance: float, steps: int, height: int, width: int,
                   sequence_length: int | None = None):  # fmt: skip
    """PIL images of (row, k) pairs, each from its own CPU generator seeded with row.seed + k (and the family's call
    options: fixed ones, e.g. PixArt's caption cleaning off, and the sequence length)."""
    return seeded_images(
        pipe,
        [row.seed + k for row, k in batch],
        prompt=[row.prompt for row, _ in batch],
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        output_type="pil",
        **family_of_pipeline(pipe).call_options(sequence_length),
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
    remove_stale_temps(images_dir, set(expected_images(mine, job.images_per_prompt)))
    drop_damaged_images(images_dir, expected_images(mine, job.images_per_prompt))  # made again below
    everything = set(expected_images(prepared.rows, job.images_per_prompt))
    written = 0
    if bar is not None:
        bar.update(count_done(images_dir, everything) - bar.n)
    for guidance, batch in plan_batches(mine, job, finished_images(images_dir)):
        images = generate_batch(pipe, batch, guidance, job.steps, job.height, job.width, job.sequence_length)
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


def spawn_run(job: RunJob, processes: int) -> None:
    """Run `processes` local processes (spawned, one device each) and show their joint progress here.

    The bar starts once rank 0 has accepted the run folder (rewritten manifest.json).
    """
    rows = load_prompt_set(job.prompts, job.limit)
    names = set(expected_images(rows, job.images_per_prompt))
    output = Path(job.output)
    threads = job.threads or max(1, torch.get_num_threads() // processes)
    before = _mtime(output / MANIFEST)
    bars = []

    def watch() -> None:
        if not bars and _mtime(output / MANIFEST) != before:
            bars.append(_progress_bar(len(names), count_done(output / IMAGES, names), job.progress))
        if bars:
            bars[0].update(count_done(output / IMAGES, names) - bars[0].n)

    try:
        spawn(run_rank, replace(job, progress=False, threads=threads), processes, watch)
        if not bars:
            bars.append(_progress_bar(len(names), 0, job.progress))
        bars[0].update(count_done(output / IMAGES, names) - bars[0].n)
    finally:
        for bar in bars:
            bar.close()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def run_rank(job: RunJob, rank: int, world: int, local_rank: int) -> int:
    """One process of a run: prepare, let rank 0 set up the folder, generate the shard; return images written."""
    import torch.distributed as dist

    if job.threads:
        torch.set_num_threads(job.threads)
    created = init_distributed(world, rank)
    dist_on = world > 1
    prepared = None
    try:
        error = None
        try:
            prepared = prepare(job, local_rank, world)
        except ReceError as exc:
            error = str(exc)
        all_ranks_ok(error, dist_on)
        output = Path(job.output)
        if rank == 0:
            try:
                old = open_run_folder(output, prepared.manifest["settings"], GENERATE_FORMAT, job.overwrite)
                manifest = {**prepared.manifest, "created": old.get("created", prepared.manifest["created"])}
                write_json(output / MANIFEST, manifest)
                write_prompts_csv(output / PROMPTS, prepared.rows, job.images_per_prompt, prepared.job.guidance)
            except ReceError as exc:
                error = str(exc)
        all_ranks_ok(error, dist_on)
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


def generate_run(
    model,
    prompts: str | os.PathLike,
    output: str | os.PathLike,
    edits: Sequence[str | os.PathLike] = (),
    steps: int | None = None,
    guidance: float | None = None,
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
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Generate (or finish) the images of a prompt set into RUN_DIR `output`; return RUN_DIR.

    `model` is a diffusers folder, hub id, single-file checkpoint, a shapes model or `tiny`, or a pipeline object
    (used as is, edits reverted afterwards). `steps` and `guidance` None are the model's defaults (`sampling.sampling_for`:
    the shapes models' 25, 4.0, else the family's, SD and SDXL 50, 7.5); FLUX and SD3 draw at the sequence length the
    edits were erased at. `device` None picks cuda when available, else cpu.
    """
    job = RunJob(
        model=model if is_pipeline(model) else str(model),
        prompts=str(prompts),
        output=Path(output),
        edits=tuple(str(e) for e in edits),
        steps=steps,
        guidance=None if guidance is None else float(guidance),
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
        text_encoders=tuple(str(t) for t in text_encoders),
        vae=None if vae is None else str(vae),
        progress=progress,
    )
    check_options(job)
    if num_processes != 1:  # capped at the rows; refused far beyond the machine's devices or cores
        num_processes = local_processes(num_processes, len(load_prompt_set(job.prompts, job.limit)), job.device)
    check_output_folder(job.output)
    if overwrite:
        check_overwrite_keeps(job.output, [job.prompts, *job.edits])
    elif finished_images(job.output / IMAGES):  # a run with no image yet is replaced by this one's settings
        check_manifest(job.output, known_settings(job), partial=True)
    rank, world, local_rank = launcher_shard()
    if world > 1 and num_processes > 1:
        raise ReceError("--num-processes starts local processes itself; under accelerate launch or torchrun leave it at 1")
    if num_processes > 1 and is_pipeline(model):
        raise ReceError("a pipeline object cannot be shared with other processes; pass its folder for --num-processes > 1")
    # one rece process per run folder (ranks of one launch share it: rank 0 holds the lock)
    with run_folder_lock(job.output) if rank == 0 else contextlib.nullcontext():
        if num_processes > 1:
            spawn_run(job, num_processes)
        else:
            run_rank(job, rank, world, local_rank)
    return job.output
