"""`rece evaluate`: the paper's metrics on `rece generate` run folders (NudeNet, CLIP score, FID, LPIPS, classifier
accuracy, the shapes detector, attack success rate).

Each metric is a function `evaluate_<name>(run, ...) -> MetricResult` (a summary, its parameters and one row per
image) in its own module; `evaluate()` runs the named ones on a run folder and merges the results into
RUN_DIR/metrics.json, with the per-image rows in RUN_DIR/metrics_<name>.csv (both written atomically). Models load
from local files or the Hugging Face cache only when offline; weights files not given (FID Inception, LPIPS,
ResNet-50) are downloaded into torch's hub cache when online, as pytorch-fid, lpips and torchvision do. Every missing
piece is a one-line ReceError naming the option that fixes it.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence

from ..errors import ReceError
from ..provenance import utc_now
from ..runs import (
    ATTACK_FORMAT,
    METRICS_JSON,
    Run,
    damaged_images,
    image_set_digest,
    load_run,
    read_manifest,
    run_folder_lock,
    write_csv,
    write_json,
)
from ..toy import door
from .asr import DETECTOR_OPTIONS, evaluate_asr
from .classify import evaluate_classify
from .clip import evaluate_clip_score
from .common import MetricResult
from .fid import evaluate_fid
from .lpips import evaluate_lpips
from .nudenet import evaluate_nudenet
from .shapes import evaluate_shapes
from .table import results_columns, results_rows, results_table

__all__ = ["METRICS", "OPTIONS", "check_metrics", "default_metrics", "evaluate", "write_results"]
__all__ += ["results_columns", "results_rows", "results_table"]

METRICS: dict[str, Callable[..., MetricResult]] = {
    "nudenet": evaluate_nudenet,
    "clip-score": evaluate_clip_score,
    "fid": evaluate_fid,
    "lpips": evaluate_lpips,
    "classify": evaluate_classify,
    "shapes": evaluate_shapes,
    "asr": evaluate_asr,
}
# What a metric takes through **options and passes on (only asr: to the detector it scores with).
FORWARDED: dict[str, tuple[str, ...]] = {"asr": DETECTOR_OPTIONS}


def accepted_options(name: str) -> tuple[str, ...]:
    """The option names metric `name` accepts: its function's keyword parameters after the run, plus what it forwards."""
    params = list(inspect.signature(METRICS[name]).parameters.values())[1:]
    named = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return named + FORWARDED.get(name, ())


# Derived from the signatures, so adding a parameter to a metric function is all it takes to pass it an option.
OPTIONS: dict[str, tuple[str, ...]] = {name: accepted_options(name) for name in METRICS}


def check_metrics(names: Sequence[str]) -> list[str]:
    """Metric names split at commas, de-duplicated, each one known."""
    out = []
    for name in (part.strip() for n in names for part in n.split(",")):
        if name not in METRICS:
            raise ReceError(f"unknown metric '{name}'; choose from {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    return out


def default_metrics(run: Run) -> list[str]:
    """The metric a run implies: an attack run → asr; a `class` column → classify; `categories` (I2P) → nudenet;
    the shapes model → shapes; else ask for --metric."""
    manifest = read_manifest(run.path)
    if manifest.get("format") == ATTACK_FORMAT:
        return ["asr"]
    columns = set(next(iter(run.prompts.values())).keys()) if run.prompts else set()
    if "class" in columns:
        return ["classify"]
    if "categories" in columns:
        return ["nudenet"]
    if door.is_shapes_model(manifest.get("model") or {}):
        return ["shapes"]
    raise ReceError(f"cannot tell which metric suits '{run.path}'; pass --metric ({', '.join(METRICS)})")


def write_results(run: Run, name: str, result: MetricResult, seconds: float) -> dict:
    """Merge one metric into RUN_DIR/metrics.json and write its per-image rows to RUN_DIR/metrics_<name>.csv."""
    path = run.path / METRICS_JSON
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):  # not a metrics file rece wrote: start it again
            data = {}
    entry = {
        "summary": result.summary,
        "params": result.params,
        "images": len(run.images),
        "image_set": image_set_digest(run.image_dir, run.images),  # a report leaves the metric out once this changes
        "expected_images": len(run.prompts) if run.prompts is not None else None,  # from prompts.csv; more: the run is unfinished
        "seconds": round(seconds, 3),
        "evaluated": utc_now(),
    }
    data[name] = entry
    write_json(path, data)
    if result.rows:
        write_csv(run.path / f"metrics_{name}.csv", result.rows)
    return entry


def evaluate(run_dir: str | os.PathLike, metrics: Sequence[str] | None = None, **options) -> dict[str, dict]:
    """Run the named metrics (default: what the run implies) on a run folder; return and record their entries."""
    run = load_run(run_dir)
    names = check_metrics(metrics) if metrics else default_metrics(run)
    damaged = damaged_images(run.image_dir, run.images)
    if damaged:
        shown = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        raise ReceError(
            f"{len(damaged)} damaged image(s) in '{run.image_dir}': {shown}; rerun the command that made the run "
            "(rece generate / rece attack with the same -o) to make them again"
        )
    if run.prompts is not None and len(run.images) < len(run.prompts):
        warnings.warn(
            f"'{run.path}' is unfinished: {len(run.images)} of {len(run.prompts)} images; the metrics cover those "
            "(finish the run, then evaluate again)",
            stacklevel=2,
        )
    out = {}
    with run_folder_lock(run.path):
        for name in names:
            kwargs = {k: v for k, v in options.items() if k in OPTIONS[name] and v is not None}
            start = time.perf_counter()
            result = METRICS[name](run, **kwargs)
            out[name] = write_results(run, name, result, time.perf_counter() - start)
    return out
