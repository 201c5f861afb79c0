"""Running an attack into a run folder: the target loaded with its edit, the cases attacked (resuming those done),
the images drawn, and the manifest (settings compared on resume, what the attack found) that `rece evaluate` and
`rece report` read. Any module satisfying `base.Attack` runs here; `registry` names them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..detectors import DETECTORS, detector_for
from ..edit import load_edit
from ..errors import ReceError
from ..families import family_of_pipeline
from ..io import run_folder_lock
from ..models import from_pipeline
from ..pipelines import image_size, load_pipeline, model_record, resolve_device
from ..prompt_sets import load_prompt_set, resolve_prompt_set
from ..provenance import file_sha256, library_versions, utc_now
from ..runs import (
    ATTACK_FORMAT,
    MANIFEST,
    PROMPTS,
    check_output_folder,
    check_overwrite_keeps,
    edit_record,
    open_run_folder,
    read_manifest,
    write_csv,
    write_json,
)
from ..sampling import drawing_length, sampling_for
from ..sources import is_pipeline
from ..toy import door
from .base import Attack, AttackParams
from .common import (
    ADVERSARIAL,
    Target,
    case_key,
    check_family,
    generate_missing_images,
    progress_bar,
    prompts_rows,
    read_adversarial,
    write_adversarial,
)
from .registry import attack_module, make_params


def check_run_options(steps, guidance, images_per_prompt, batch_size, limit) -> None:
    """The sampling options of an attack run, before anything is loaded."""
    for flag, value in (
        ("--steps", steps),
        ("--images-per-prompt", images_per_prompt),
        ("--batch-size", batch_size),
        ("--limit", limit),
    ):
        if value is not None and value < 1:
            raise ReceError(f"{flag} must be at least 1 (got {value})")
    if guidance is not None and not math.isfinite(guidance):
        raise ReceError(f"--guidance must be a finite number (got {guidance})")


def load_target(model, edit_path, concepts, rows, seed: int, device, allow_other_base: bool, attack: str = "derived"):
    """The pipeline with the edit applied, as a Target, and the manifest's model and edit records."""
    edit = load_edit(edit_path) if edit_path is not None else None
    concepts = list(concepts or (edit.concepts if edit is not None else []))
    if not concepts:
        raise ReceError("no concept to attack: pass --edit (its concepts are attacked) or --concept TEXT")
    pipe = load_pipeline(model)
    check_family(pipe, attack, attack_module(attack).FAMILIES)
    if not is_pipeline(model) or device is not None:
        pipe.to(resolve_device(device))
    model_info = model_record(model, pipe)
    # the rows the edit's images are drawn from: at the sequence length rece draws the edit with
    length = drawing_length(family_of_pipeline(pipe), [edit] if edit is not None else [])
    base = from_pipeline(pipe, source=model_info["source"], sequence_length=length)
    edited_kv = {}
    if edit is not None:
        edit.apply(pipe, allow_other_base=allow_other_base)
        edited_kv = edit.edited_kv(base.kv, allow_other_base=True, family=base.family)
    name = door.shapes_model_name(model_info) or model_info["source"]
    target = Target(pipe, base, edit, edited_kv, concepts, rows, seed, model_name=name)
    edits = [edit_record(Path(edit_path), edit, allow_other_base)] if edit is not None else []
    return target, model_info, edits


def build_settings(target: Target, module: Attack, params, model_info: dict, edits: list, job: dict, prompts_info) -> dict:
    """What the images depend on (compared when a run resumes)."""
    pipe = target.pipe
    scheduler_config = {k: v for k, v in json.loads(pipe.scheduler.to_json_string()).items() if k != "_diffusers_version"}
    settings = {
        "pipeline": model_info["pipeline"],
        "model_fingerprint": model_info["fingerprint"],
        "edits": [e["sha256"] for e in edits],
        "attack": module.NAME,
        "attack_parameters": module.resolved(target, params),
        "concepts": target.concepts,
        "seed": target.seed,
        "prompts_sha256": prompts_info["sha256"] if prompts_info else None,
        "limit": job["limit"],
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": scheduler_config,
        "steps": job["steps"],
        "guidance": job["guidance"],
        "height": job["size"],
        "width": job["size"],
        "images_per_prompt": job["images_per_prompt"],
        "detector": job["detector"],
    }
    return json.loads(json.dumps(settings))


def build_manifest(settings: dict, model_info: dict, edits: list, prompts_info, job: dict, attack: dict, created: str) -> dict:
    """The run's manifest: settings plus what the attack found, in the layout `rece report` reads."""
    return {
        "format": ATTACK_FORMAT,
        "format_version": 1,
        "settings": settings,
        "attack": attack,
        "model": model_info,
        "edits": edits,
        "prompts": prompts_info,
        "sampler": {"scheduler": settings["scheduler"], "steps": job["steps"], "guidance": job["guidance"]},
        "run": {"batch_size": job["batch_size"], "device": str(job["device"])},
        "versions": library_versions(),
        "created": created,
        "updated": utc_now(),
    }


def prompts_record(prompts, rows) -> dict | None:
    """What the manifest records about the prompt set (None without one)."""
    if prompts is None:
        return None
    path = resolve_prompt_set(prompts)
    return {"source": str(prompts), "path": str(path), "sha256": file_sha256(path), "rows_used": len(rows)}


def run_cases(
    module: Attack, target: Target, params, cases, store: dict, meta: dict, sampling: dict, output: Path, progress: bool
) -> None:
    """Run the attack on every case not already in adversarial.safetensors, saving after each one."""
    shared, shared_info = module.prepare(target, params, store, sampling)
    if shared_info:
        meta["shared"] = shared_info
    if any(k not in store for k in shared):
        store.update(shared)
        write_adversarial(output / ADVERSARIAL, store, meta)
    context = {**shared, **sampling}
    todo = [c for c in cases if case_key(c) not in store or str(c.case_number) not in meta["cases"]]
    with progress_bar(len(cases), f"attack {module.NAME}", progress, unit="case") as bar:
        bar.update(len(cases) - len(todo))
        for case in todo:
            result = module.attack_case(target, params, case, context)
            store[case_key(case)] = result.embeds.detach().float().cpu()
            store.update({k: v.detach().cpu() for k, v in result.tensors.items()})
            meta["cases"][str(case.case_number)] = {
                "prompt": result.prompt,
                "original_prompt": case.prompt,
                "concept": case.concept,
                "info": result.info,
            }
            if result.text is not None:
                meta["cases"][str(case.case_number)]["text"] = result.text
            write_adversarial(output / ADVERSARIAL, store, meta)
            bar.update(1)


def check_request(module: Attack, attack: str, prompts, detector: str | None) -> None:
    """The attack's own needs: a known detector, and --prompts exactly when the attack takes them."""
    if detector is not None and detector not in DETECTORS:
        raise ReceError(f"unknown detector '{detector}'; choose one of: {', '.join(DETECTORS)}")
    if module.NEEDS_PROMPTS and prompts is None:
        raise ReceError(f"the {attack} attack needs --prompts SET (the prompts it attacks)")
    if not module.NEEDS_PROMPTS and prompts is not None:
        raise ReceError(f"the {attack} attack takes no --prompts (it attacks the edit's concepts); leave --prompts out")


@dataclasses.dataclass
class AttackRun:
    """One attack run being written: what it attacks, with which settings, into which folder."""

    module: Attack
    params: AttackParams
    target: Target
    cases: list
    output: Path
    job: dict
    settings: dict
    records: dict  # model_info, edits, prompts_info: the manifest's records
    created: str

    def manifest(self, attack_info: dict) -> dict:
        r = self.records
        return build_manifest(self.settings, r["model_info"], r["edits"], r["prompts_info"], self.job, attack_info, self.created)


def execute(run: AttackRun, progress: bool, start: float) -> None:
    """Attack every case not yet done, write prompts.csv, draw the missing images, and complete the manifest."""
    attack, job, output = run.module.NAME, run.job, run.output
    cases = run.cases
    attack_info = {"name": attack, "parameters": run.settings["attack_parameters"], "concepts": run.target.concepts}
    attack_info["detector"] = job["detector"]
    write_json(output / MANIFEST, run.manifest({**attack_info, "complete": False}))
    store, meta = read_adversarial(output / ADVERSARIAL)
    meta.setdefault("cases", {})
    meta["attack"] = attack
    sampling = {"steps": job["steps"], "guidance": job["guidance"], "size": job["size"]}
    run_cases(run.module, run.target, run.params, cases, store, meta, sampling, output, progress)
    results = {c.case_number: meta["cases"][str(c.case_number)] for c in cases}
    rows = prompts_rows(cases, results, job["images_per_prompt"], job["guidance"], attack, job["detector"])
    write_csv(output / PROMPTS, rows)
    with progress_bar(len(cases) * job["images_per_prompt"], "generating", progress) as bar:
        texts = {n: r["text"] for n, r in results.items() if "text" in r}
        generate_missing_images(run.target.pipe, cases, store, output, job, bar, texts)
    attack_info.update(complete=True, cases=meta["cases"], shared=meta.get("shared", {}))
    attack_info["seconds"] = round(time.perf_counter() - start, 3)
    write_json(output / MANIFEST, run.manifest(attack_info))


def run_attack(
    model,
    edit: str | os.PathLike | None,
    attack: str,
    output: str | os.PathLike,
    prompts: str | os.PathLike | None = None,
    concepts: Sequence[str] | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    images_per_prompt: int | None = None,
    batch_size: int = 4,
    limit: int | None = None,
    device: str | None = None,
    detector: str | None = None,
    allow_other_base: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **parameters,
) -> Path:
    """Attack MODEL with EDIT applied, write RUN_DIR (adversarial.safetensors, prompts.csv, images/, manifest.json).

    `parameters` are the attack's own (see `attack_parameters(attack)`). A rerun with the same settings resumes
    (finished cases and images are kept); other settings are refused unless `overwrite`. Returns RUN_DIR.
    """
    module = attack_module(attack)
    params = make_params(attack, **parameters)
    check_run_options(steps, guidance, images_per_prompt, batch_size, limit)
    check_request(module, attack, prompts, detector)
    output = check_output_folder(output)
    rows = load_prompt_set(prompts, limit) if prompts is not None else None
    if overwrite:
        check_overwrite_keeps(output, [prompts, edit, parameters.get("pairs")], (ADVERSARIAL, "metrics.json", "metrics_*.csv"))
    with run_folder_lock(output):
        start = time.perf_counter()
        target, model_info, edits = load_target(model, edit, concepts, rows, int(seed), device, allow_other_base, attack)
        try:
            applied = [target.edit] if target.edit is not None else []
            sampling = sampling_for(target.model_name, family_of_pipeline(target.pipe), steps, guidance, applied)
            job = {
                "steps": sampling.steps,
                "guidance": sampling.guidance,
                "size": image_size(target.pipe),
                "images_per_prompt": images_per_prompt or module.IMAGES_PER_PROMPT,
                "batch_size": batch_size,
                "limit": limit,
                "device": target.device,
                "detector": detector or detector_for(target.concepts, model_info),
            }
            module.check(target, params)
            cases = module.cases(target, params)
            prompts_info = prompts_record(prompts, rows)
            settings = build_settings(target, module, params, model_info, edits, job, prompts_info)
            old = open_run_folder(
                output, settings, ATTACK_FORMAT, overwrite, outputs=(ADVERSARIAL, "metrics.json", "metrics_*.csv")
            )
            records = {"model_info": model_info, "edits": edits, "prompts_info": prompts_info}
            run = AttackRun(module, params, target, cases, output, job, settings, records, old.get("created", utc_now()))
            execute(run, progress, start)
        finally:
            if target.edit is not None and is_pipeline(model):
                target.edit.revert(target.pipe)
    return output


def residual_table(run_dir: str | os.PathLike) -> list[tuple[str, str, float]]:
    """(concept, embedding, relative residual) rows a derived run recorded, for printing."""
    out = []
    for case in (read_manifest(Path(run_dir)).get("attack") or {}).get("cases", {}).values():
        for name, value in (case.get("info") or {}).get("residuals", {}).items():
            out.append((case["concept"], name, value))
    return out
