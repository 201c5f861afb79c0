"""`rece sweep`: vary one erasure parameter and measure, at each value, what the erasure costs and what it buys.

For every value the sweep erases (one edit file), generates the prompts naming the concept (erased rate), runs an
attack on the edit (attack success) and generates prompts of concepts that must survive (preservation, as a share
of the original model's score). Everything lands in one folder: a run folder per measurement (resumable, as
`rece generate` / `rece attack` write them), `sweep.json` with one point per value, and `sweep.png`, the trade-off
plot. `rece report SWEEP_DIR` shows the plot and the table.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from PIL import Image

from .attacks import attack_module, make_params, run_attack
from .config import EraseConfig
from .erase import erase
from .errors import ReceError
from .generate import generate_run
from .io import atomic_file
from .metrics import evaluate
from .models import BaseModel, load_model
from .pictures import line_chart
from .prompt_sets import resolve_prompt_set
from .provenance import file_sha256
from .runs import check_output_folder, write_csv, write_json
from .sampling import sampling_for
from .toy import door

# every number of an erasure can be swept: the int and float fields of EraseConfig
SWEEP_PARAMETERS: dict[str, type] = {
    f.name: int if str(f.type).startswith("int") else float
    for f in fields(EraseConfig)
    if str(f.type).startswith(("int", "float"))
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
    return write_csv(path, rows, ["case_number", "prompt", "evaluation_seed", "concept"])


def check_default_prompts(model, concept: str) -> None:
    """Built-in prompt sets exist only for the shapes model's shapes and colours."""
    if not door.is_shapes_model(model):
        raise ReceError("pass --prompts (prompts naming the concept) and --preserve-eval (prompts that must keep working)")
    if not door.is_world_concept(concept):
        raise ReceError(f"'{concept}' is not a shape or colour of the shapes model; pass --prompts and --preserve-eval")


def default_prompt_sets(model, concept: str, output: Path) -> tuple[Path, Path]:
    """The shapes model's built-in sets (prompts naming the concept; prompts of the other shapes or colours)."""
    check_default_prompts(model, concept)
    return (
        write_prompt_rows(output / "prompts-erased.csv", door.evaluation_prompt_rows(concept)),
        write_prompt_rows(output / "prompts-kept.csv", door.evaluation_prompt_rows(concept, kept=True)),
    )


def _read_sweep(path: Path) -> dict | None:
    """The sweep record in `path` (None when there is none); a ReceError when it is not a sweep file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReceError(f"cannot read {path} ({exc}); delete it or pass --overwrite") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise ReceError(f"{path} is not a rece sweep file; delete it or pass --overwrite")
    return data


def _score(run: Path, metric: str, concept: str, options: dict) -> float:
    """One number of a run folder: the asr metric's share of images showing their concept (%), or the CLIP score.

    `options` go to `rece.metrics.evaluate` (clip_model, threshold, classifier_weights, ...)."""
    if metric == "asr":
        return float(evaluate(run, ["asr"], concept=[concept], progress=False, **options)["asr"]["summary"]["asr %"])
    summary = evaluate(run, ["clip-score"], progress=False, **options)["clip-score"]["summary"]
    return float(next(iter(summary.values())))


def preserved_percent(kept: float, original: float) -> float:
    """Preservation as a share of the original model's score (100 = unchanged); 0 when the original scored 0."""
    return round(100.0 * kept / original, 4) if original > 0 else 0.0


# -- one sweep: its settings, the original model, one point per value ---------------------------------
@dataclass(frozen=True)
class SweepPlan:
    """What every measurement of a sweep shares: model, erasure, prompt sets, attack, metrics and sampling."""

    model: object
    config: EraseConfig  # its `parameter` varies
    parameter: str
    values: list
    concept: str
    prompts: Path
    preserve_prompts: Path
    output: Path
    attack: str
    attack_parameters: dict
    preserve_metric: str
    metric_options: dict
    images_per_prompt: int
    sampling: dict  # steps, guidance, batch_size, device, progress, overwrite: as generate_run / run_attack take them

    def settings(self) -> dict:
        """What the sweep's numbers depend on; a rerun with other settings is refused."""
        return {
            "model": str(self.model),
            "config": {k: v for k, v in self.config.to_dict().items() if k != self.parameter},
            "parameter": self.parameter,
            "concept": self.concept,
            "prompts": file_sha256(self.prompts),
            "preserve_prompts": file_sha256(self.preserve_prompts),
            "attack": self.attack,
            "attack_parameters": self.attack_parameters,
            "preserve_metric": self.preserve_metric,
            "metric_options": self.metric_options,
            "steps": self.sampling["steps"],
            "guidance": self.sampling["guidance"],
            "images_per_prompt": self.images_per_prompt,
        }

    def measure(self, run_dir: Path, prompt_set: Path, edits: list, metric: str) -> float:
        """Generate `prompt_set` with `edits` applied into `run_dir` (resumable) and score it by `metric`."""
        generate_run(self.model, prompt_set, run_dir, edits=edits, images_per_prompt=self.images_per_prompt, **self.sampling)
        return _score(run_dir, metric, self.concept, self.metric_options)


def _check_options(
    parameter: str,
    values,
    config: EraseConfig,
    preserve_metric: str,
    images_per_prompt: int,
    attack: str,
    attack_parameters: dict,
) -> list:
    """The parsed values, after checking every option and every point's config before anything runs."""
    values = parse_values(parameter, values)
    if preserve_metric not in PRESERVE_METRICS:
        raise ReceError(f"unknown --preserve-metric '{preserve_metric}'; choose one of: {', '.join(PRESERVE_METRICS)}")
    if images_per_prompt < 1:
        raise ReceError(f"--images must be at least 1 (got {images_per_prompt})")
    for value in values:  # every point's config must be valid before anything runs
        replace(config, **{parameter: value}).validate()
    make_params(attack, **attack_parameters)
    return values


@dataclass
class SweepOptions:
    """The keyword options of `run_sweep`, with their defaults (see its docstring)."""

    concept: str | None = None
    prompts: str | os.PathLike | None = None
    preserve_prompts: str | os.PathLike | None = None
    attack: str = "derived"
    attack_parameters: dict | None = None
    preserve_metric: str = "asr"
    metric_options: dict | None = None
    steps: int | None = None
    guidance: float | None = None
    images_per_prompt: int = 2
    batch_size: int = 8
    device: str | None = None
    overwrite: bool = False
    progress: bool = True


def plan_sweep(
    model, config, parameter: str, values: str | Sequence, output: str | os.PathLike, options: SweepOptions
) -> SweepPlan:
    """Check a sweep's options, create OUTPUT and settle its prompt sets and sampling (see `run_sweep`)."""
    o = options
    concept, prompts, preserve_prompts, attack = o.concept, o.prompts, o.preserve_prompts, o.attack
    preserve_metric, images_per_prompt = o.preserve_metric, o.images_per_prompt
    sampling = {"batch_size": o.batch_size, "device": o.device, "progress": o.progress, "overwrite": o.overwrite}
    attack_parameters = dict(o.attack_parameters or {})
    values = _check_options(parameter, values, config, preserve_metric, images_per_prompt, attack, attack_parameters)
    metric_options = {k: v for k, v in (o.metric_options or {}).items() if v is not None}
    concept = concept or config.concepts[0]
    if prompts is None or preserve_prompts is None:
        check_default_prompts(model, concept)
    else:
        prompts, preserve_prompts = resolve_prompt_set(prompts), resolve_prompt_set(preserve_prompts)
    output = check_output_folder(output)
    output.mkdir(parents=True, exist_ok=True)
    if prompts is None or preserve_prompts is None:
        prompts, preserve_prompts = default_prompt_sets(model, concept, output)
    steps, guidance = o.steps, o.guidance  # None: the model's, settled by `run_sweep` once the model is read
    return SweepPlan(
        model, config, parameter, values, concept, prompts, preserve_prompts, output, attack, attack_parameters,
        preserve_metric, metric_options, images_per_prompt, dict(steps=steps, guidance=guidance, **sampling),
    )  # fmt: skip


def _open_record(path: Path, settings: dict, overwrite: bool) -> dict:
    """The sweep record to continue: the one in `path` when made with the same settings, else a new one."""
    record = None if overwrite else _read_sweep(path)
    if record is not None and record.get("settings") != settings:
        raise ReceError(f"{path} was made with other settings; use another -o folder or pass --overwrite")
    return record or {"settings": settings, "points": []}


def measure_original(plan: SweepPlan) -> dict:
    """The original model's numbers: its erased rate (%) and its score on the prompts that must survive."""
    return {
        "erased %": plan.measure(plan.output / "original-erased", plan.prompts, [], "asr"),
        "kept score": plan.measure(plan.output / "original-kept", plan.preserve_prompts, [], plan.preserve_metric),
    }


def measure_point(plan: SweepPlan, base: BaseModel, value: float, original: dict) -> dict:
    """One point of the sweep: erase with `parameter` = `value` from `base`, attack the edit, measure what it costs."""
    folder = plan.output / point_name(plan.parameter, value)
    folder.mkdir(exist_ok=True)
    start = time.perf_counter()
    edit = erase(base, config=replace(plan.config, **{plan.parameter: value}))
    edit_seconds = time.perf_counter() - start
    edit_path = edit.save(folder / "edit.safetensors")
    needs_prompts = _needs_prompts(plan.attack)
    # an attack without prompts (derived) attacks the concept itself: give it as many images as a few prompts get
    attack_images = plan.images_per_prompt if needs_prompts else 8 * plan.images_per_prompt
    attack_run = run_attack(
        plan.model, edit_path, plan.attack, folder / f"attack-{plan.attack}", prompts=plan.prompts if needs_prompts else None,
        concepts=[plan.concept], images_per_prompt=attack_images, **plan.sampling, **plan.attack_parameters,
    )  # fmt: skip
    kept = plan.measure(folder / "kept", plan.preserve_prompts, [edit_path], plan.preserve_metric)
    point = {
        "value": value,
        "edit_seconds": round(edit_seconds, 4),
        "erased %": plan.measure(folder / "erased", plan.prompts, [edit_path], "asr"),
        "attack success %": _score(attack_run, "asr", plan.concept, plan.metric_options),
        "preserved %": preserved_percent(kept, original["kept score"]),
        "kept score": kept,
    }
    if point["erased %"] >= original["erased %"]:  # the erasure changed nothing the prompts show: say so
        point["erased nothing"] = True
        warnings.warn(
            f"{point_name(plan.parameter, value)} erased nothing: prompts naming '{plan.concept}' show it in "
            f"{point['erased %']:g} % of the images, the original model in {original['erased %']:g} %",
            stacklevel=2,
        )
    if "robust" in edit.metadata:
        point["robust"] = edit.metadata["robust"]
    return point


def run_sweep(model, config, parameter: str, values: str | Sequence, output: str | os.PathLike, **options) -> dict:
    """Sweep `parameter` of the EraseConfig `config` over `values` on MODEL; write OUTPUT/sweep.json and sweep.png.

    `options` are the fields of `SweepOptions`. `concept` is what the detector looks for (default: the first
    concept). `prompts` name the concept; `preserve_prompts` name concepts that must survive (a `concept` column per
    row for the asr metric); `metric_options` go to the metrics (e.g. clip_model, classifier_weights). A rerun
    with the same settings keeps the finished points and resumes unfinished runs. Returns the sweep record.
    """
    plan = plan_sweep(model, config, parameter, values, output, SweepOptions(**options))
    base = load_model(model, plan.sampling["device"] or "cpu")
    drawn = sampling_for(model, base.family, plan.sampling["steps"], plan.sampling["guidance"])
    plan = replace(plan, sampling={**plan.sampling, "steps": drawn.steps, "guidance": drawn.guidance})
    sweep_path = plan.output / SWEEP_FILE
    record = _open_record(sweep_path, plan.settings(), plan.sampling["overwrite"])
    done = {json.dumps(p["value"]) for p in record["points"]}
    if "original" not in record:
        record["original"] = measure_original(plan)
        write_json(sweep_path, record)
    values = plan.values
    for value in values:
        if json.dumps(value) in done:
            continue
        record["points"].append(measure_point(plan, base, value, record["original"]))
        record["points"].sort(key=lambda p: values.index(p["value"]) if p["value"] in values else len(values))
        write_json(sweep_path, record)
    image = sweep_plot(record)
    with atomic_file(plan.output / PLOT_FILE) as tmp:
        image.save(tmp, format="PNG")
    return record


def _needs_prompts(attack: str) -> bool:
    """Whether the attack `attack` starts from prompts (else from the concept itself)."""
    return bool(attack_module(attack).NEEDS_PROMPTS)


def sweep_table(record: dict) -> tuple[list[str], list[list]]:
    """Header and rows of a sweep: one row per value (and the original model first)."""
    header = [record["settings"]["parameter"], *SERIES, "edit s"]
    original = record.get("original") or {}
    rows = [["original", original.get("erased %"), None, 100.0 if original else None, None]]
    for p in record["points"]:
        label = value_label(p["value"]) + (" (erased nothing)" if p.get("erased nothing") else "")
        rows.append([label, p["erased %"], p["attack success %"], p["preserved %"], p["edit_seconds"]])
    return header, rows


def sweep_plot(record: dict) -> Image.Image:
    """The trade-off plot of a `rece sweep` record: erased rate, attack success and preservation per value."""
    settings = record["settings"]
    points = record["points"]
    series = {f"{key}: {meaning}": [p.get(key) for p in points] for key, meaning in SERIES.items()}
    x_title = f"{settings['parameter']} (method {settings['config'].get('method')}, attack {settings['attack']})"
    return line_chart([value_label(p["value"]) for p in points], series, x_title)
