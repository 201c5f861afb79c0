"""`rece sweep`: vary one erasure parameter and measure, at each value, what the erasure costs and what it buys.

For every value the sweep erases (one edit file), generates the prompts naming the concept (erased rate), runs an
attack on the edit (attack success) and generates prompts of concepts that must survive (preservation, as a share
of the original model's score). Everything lands in one folder: a run folder per measurement (resumable, as
`rece generate` / `rece attack` write them), `sweep.json` with one point per value, and `sweep.png`, the trade-off
plot. `rece report SWEEP_DIR` shows the plot and the table.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .errors import ReceError
from .io import atomic_file

SWEEP_PARAMETERS: dict[str, type] = {
    "rank": int,
    "tradeoff": float,
    "energy": float,
    "epochs": int,
    "regularization": float,
    "lamb": float,
    "erase_scale": float,
    "preserve_scale": float,
    "uce_lamb": float,
    "uce_erase_scale": float,
    "uce_preserve_scale": float,
}
PRESERVE_METRICS = ("asr", "clip-score")
SWEEP_FILE = "sweep.json"
PLOT_FILE = "sweep.png"
SERIES = {
    "erased %": "prompts naming the concept that still show it",
    "attack success %": "attack success rate on the edit",
    "preserved %": "preservation, % of the original model's score",
}


def parse_values(parameter: str, text: str | Sequence) -> list:
    """The values of a sweep: '0,3,5,10' (or a list), converted to the parameter's type; a ReceError when invalid."""
    if parameter not in SWEEP_PARAMETERS:
        raise ReceError(f"cannot sweep '{parameter}'; choose one of: {', '.join(SWEEP_PARAMETERS)}")
    items = [v.strip() for v in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(v == "" for v in items):
        raise ReceError(f"--values needs comma-separated values, e.g. --values 0,3,5,10 (got {text!r})")
    kind = SWEEP_PARAMETERS[parameter]
    values = []
    for item in items:
        try:
            value = kind(item)
        except (TypeError, ValueError):
            raise ReceError(f"--values: '{item}' is not a valid {kind.__name__} for {parameter}") from None
        if kind is int and isinstance(item, float) and value != item:
            raise ReceError(f"--values: '{item}' is not a whole number; {parameter} takes whole numbers")
        values.append(value)
    if len(set(values)) != len(values):
        raise ReceError(f"--values repeats a value ({text!r}); give each value once")
    return values


def value_label(value) -> str:
    """A parameter value as people write it: 5, 0.001, 1e-05."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def point_name(parameter: str, value) -> str:
    """The folder of one sweep point, e.g. 'tradeoff=5.0'."""
    return f"{parameter}={value}"


def write_prompt_rows(path: Path, rows: Sequence[dict]) -> Path:
    """A prompt set in the published CSV layout (case_number, prompt, evaluation_seed, concept), written atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["case_number", "prompt", "evaluation_seed", "concept"])
            writer.writeheader()
            writer.writerows(rows)
    return path


def check_default_prompts(model, concept: str) -> None:
    """Built-in prompt sets exist only for the shapes model's shapes and colours."""
    from .toy.world import COLORS, SHAPES

    if str(model) != "shapes":
        raise ReceError("pass --prompts (prompts naming the concept) and --preserve-eval (prompts that must keep working)")
    if concept not in SHAPES and concept not in COLORS:
        raise ReceError(f"'{concept}' is not a shape or colour of the shapes model; pass --prompts and --preserve-eval")


def default_prompt_sets(model, concept: str, output: Path) -> tuple[Path, Path]:
    """The shapes model's built-in sets (prompts naming the concept; prompts of the other shapes or colours)."""
    from .toy.evaluate import evaluation_prompt_rows

    check_default_prompts(model, concept)
    return (
        write_prompt_rows(output / "prompts-erased.csv", evaluation_prompt_rows(concept)),
        write_prompt_rows(output / "prompts-kept.csv", evaluation_prompt_rows(concept, kept=True)),
    )


def _read_sweep(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReceError(f"cannot read {path} ({exc}); delete it or pass --overwrite") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise ReceError(f"{path} is not a rece sweep file; delete it or pass --overwrite")
    return data


def _write_sweep(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _score(run: Path, metric: str, concept: str, options: dict) -> float:
    """One number of a run folder: the asr metric's share of images showing their concept (%), or the CLIP score.

    `options` go to `rece.metrics.evaluate` (clip_model, threshold, classifier_weights, ...)."""
    from .metrics import evaluate

    if metric == "asr":
        return float(evaluate(run, ["asr"], concept=[concept], progress=False, **options)["asr"]["summary"]["asr %"])
    summary = evaluate(run, ["clip-score"], progress=False, **options)["clip-score"]["summary"]
    return float(next(iter(summary.values())))


def preserved_percent(kept: float, original: float) -> float:
    """Preservation as a share of the original model's score (100 = unchanged); 0 when the original scored 0."""
    return round(100.0 * kept / original, 4) if original > 0 else 0.0


def run_sweep(
    model,
    config,
    parameter: str,
    values: str | Sequence,
    output: str | os.PathLike,
    concept: str | None = None,
    prompts: str | os.PathLike | None = None,
    preserve_prompts: str | os.PathLike | None = None,
    attack: str = "derived",
    attack_parameters: dict | None = None,
    preserve_metric: str = "asr",
    metric_options: dict | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    images_per_prompt: int = 2,
    batch_size: int = 8,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Sweep `parameter` of the EraseConfig `config` over `values` on MODEL; write OUTPUT/sweep.json and sweep.png.

    `concept` is what the detector looks for (default: the first concept). `prompts` name the concept;
    `preserve_prompts` name concepts that must survive (a `concept` column per row for the asr metric);
    `metric_options` go to the metrics (e.g. clip_model, classifier_weights). A rerun
    with the same settings keeps the finished points and resumes unfinished runs. Returns the sweep record.
    """
    from .attacks import make_params, run_attack
    from .attacks.common import default_sampling
    from .erase import erase
    from .generate import check_output_folder, file_sha256, generate_run, resolve_prompt_set
    from .models import load_model
    from .report import sweep_plot

    values = parse_values(parameter, values)
    if preserve_metric not in PRESERVE_METRICS:
        raise ReceError(f"unknown --preserve-metric '{preserve_metric}'; choose one of: {', '.join(PRESERVE_METRICS)}")
    if images_per_prompt < 1:
        raise ReceError(f"--images must be at least 1 (got {images_per_prompt})")
    for value in values:  # every point's config must be valid before anything runs
        replace(config, **{parameter: value}).validate()
    attack_parameters = dict(attack_parameters or {})
    metric_options = {k: v for k, v in (metric_options or {}).items() if v is not None}
    make_params(attack, **attack_parameters)
    concept = concept or config.concepts[0]
    if prompts is None or preserve_prompts is None:
        check_default_prompts(model, concept)
    else:
        prompts, preserve_prompts = resolve_prompt_set(prompts), resolve_prompt_set(preserve_prompts)
    output = check_output_folder(output)
    output.mkdir(exist_ok=True)
    if prompts is None or preserve_prompts is None:
        prompts, preserve_prompts = default_prompt_sets(model, concept, output)
    steps, guidance = default_sampling(str(model), steps, guidance)
    settings = {
        "model": str(model),
        "config": {k: v for k, v in config.to_dict().items() if k != parameter},
        "parameter": parameter,
        "concept": concept,
        "prompts": file_sha256(prompts),
        "preserve_prompts": file_sha256(preserve_prompts),
        "attack": attack,
        "attack_parameters": attack_parameters,
        "preserve_metric": preserve_metric,
        "metric_options": metric_options,
        "steps": steps,
        "guidance": guidance,
        "images_per_prompt": images_per_prompt,
    }
    sweep_path = output / SWEEP_FILE
    record = None if overwrite else _read_sweep(sweep_path)
    if record is not None and record.get("settings") != settings:
        raise ReceError(f"{sweep_path} was made with other settings; use another -o folder or pass --overwrite")
    record = record or {"settings": settings, "points": []}
    done = {json.dumps(p["value"]) for p in record["points"]}
    sampling = dict(steps=steps, guidance=guidance, batch_size=batch_size, device=device, progress=progress, overwrite=overwrite)
    # an attack without prompts (derived) attacks the concept itself: give it as many images as a few prompts get
    attack_images = images_per_prompt if _needs_prompts(attack) else 8 * images_per_prompt

    def measure(run_dir: Path, prompt_set, edits, metric: str) -> float:
        generate_run(model, prompt_set, run_dir, edits=edits, images_per_prompt=images_per_prompt, **sampling)
        return _score(run_dir, metric, concept, metric_options)

    if "original" not in record:
        record["original"] = {
            "erased %": measure(output / "original-erased", prompts, [], "asr"),
            "kept score": measure(output / "original-kept", preserve_prompts, [], preserve_metric),
        }
        _write_sweep(sweep_path, record)
    base = load_model(model, device or "cpu")
    for value in values:
        if json.dumps(value) in done:
            continue
        folder = output / point_name(parameter, value)
        folder.mkdir(exist_ok=True)
        start = time.perf_counter()
        edit = erase(base, config=replace(config, **{parameter: value}))
        edit_seconds = time.perf_counter() - start
        edit_path = edit.save(folder / "edit.safetensors")
        attack_run = run_attack(
            model, edit_path, attack, folder / f"attack-{attack}", prompts=prompts if _needs_prompts(attack) else None,
            concepts=[concept], images_per_prompt=attack_images, **sampling, **attack_parameters,
        )  # fmt: skip
        kept = measure(folder / "kept", preserve_prompts, [edit_path], preserve_metric)
        point = {
            "value": value,
            "edit_seconds": round(edit_seconds, 4),
            "erased %": measure(folder / "erased", prompts, [edit_path], "asr"),
            "attack success %": _score(attack_run, "asr", concept, metric_options),
            "preserved %": preserved_percent(kept, record["original"]["kept score"]),
            "kept score": kept,
        }
        if "robust" in edit.metadata:
            point["robust"] = edit.metadata["robust"]
        record["points"].append(point)
        record["points"].sort(key=lambda p: values.index(p["value"]) if p["value"] in values else len(values))
        _write_sweep(sweep_path, record)
    image = sweep_plot(record)
    with atomic_file(output / PLOT_FILE) as tmp:
        image.save(tmp, format="PNG")
    return record


def _needs_prompts(attack: str) -> bool:
    from .attacks import attack_module

    return bool(attack_module(attack).NEEDS_PROMPTS)


def sweep_table(record: dict) -> tuple[list[str], list[list]]:
    """Header and rows of a sweep: one row per value (and the original model first)."""
    header = [record["settings"]["parameter"], *SERIES, "edit s"]
    original = record.get("original") or {}
    rows = [["original", original.get("erased %"), None, 100.0 if original else None, None]]
    for p in record["points"]:
        rows.append([value_label(p["value"]), p["erased %"], p["attack success %"], p["preserved %"], p["edit_seconds"]])
    return header, rows
