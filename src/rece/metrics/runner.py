"""Running metrics on a run folder: which metrics a run implies, each one called with its `Params` built from the
options given, and the results merged into RUN_DIR/metrics.json (per-image rows in RUN_DIR/metrics_<name>.csv).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence

from ..errors import ReceError
from ..io import run_folder_lock
from ..provenance import utc_now
from ..runs import (
    ATTACK_FORMAT,
    METRICS_JSON,
    Run,
    damaged_images,
    image_set_digest,
    load_run,
    read_manifest,
    write_csv,
    write_json,
)
from ..toy import door
from .common import MetricResult
from .registry import METRICS, check_metrics, metric_function


def metric_call(name: str, options: dict) -> tuple[Callable[..., MetricResult], object, dict]:
    """A metric's function, its Params from the options naming its fields, and the other options its function takes
    (a model, detector or feature extractor passed from Python, progress); None means "not given"."""
    given = {k: v for k, v in options.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(METRICS[name].Params)}
    params = METRICS[name].Params(**{k: v for k, v in given.items() if k in fields})
    function = metric_function(name)
    takes = list(inspect.signature(function).parameters)[2:]  # after (run, params)
    return function, params, {k: v for k, v in given.items() if k in takes}


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
            function, params, objects = metric_call(name, options)
            start = time.perf_counter()
            result = function(run, params, **objects)
            out[name] = write_results(run, name, result, time.perf_counter() - start)
    return out
