"""`rece demo`: erase a concept from the shapes model and show before / after, measured by the detector."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .edit import Edit
from .erase import erase
from .errors import ReceError
from .families import family_of_pipeline
from .io import atomic_dir, check_parent
from .pictures import html_page, html_table, image_grid, labelled_panels, png_data_uri
from .pipelines import load_pipeline
from .toy import door
from .toy.evaluate import erasure_metrics, generate, grid_prompts
from .toy.world import COLORS, SHAPES

DEMO_SEED = 0
METRIC_KEYS = ("erased_rate", "other_shape_accuracy", "color_accuracy")


def _load_pipeline(model: str):
    """The demo's pipeline: `shapes` (default), `shapes-mmdit` or a folder of a shapes-world model."""
    return load_pipeline(model)


def _check_options(concept: str, per_combo: int, steps: int, guidance: float | None) -> float:
    """The guidance to sample with, after checking the demo's options."""
    if not door.is_world_concept(concept):
        raise ReceError(f"demo concept '{concept}' is not in the shapes world; choose one of: {', '.join(door.world_concepts())}")
    if per_combo < 1 or steps < 1:
        raise ReceError("--per-combo and --steps must be at least 1")
    if guidance is not None and not (0 <= guidance < float("inf")):
        raise ReceError(f"--guidance must be a finite number >= 0, got {guidance}")
    return door.GUIDANCE if guidance is None else guidance


def recipe_model(pipe) -> str:
    """Which shapes model's recipe erases from `pipe`: shapes-mmdit's for an SD3 pipeline (a retrained one too)."""
    return door.MMDIT if family_of_pipeline(pipe).name == "sd3" else door.NAME


def measure_demo(
    pipe, model: str, concept: str, method: str, per_combo: int, steps: int, guidance: float, quiet: bool = False
) -> tuple[dict, Edit, np.ndarray, np.ndarray, float]:
    """Generate the grid prompts, erase `concept` from `pipe`, regenerate with the same seeds and measure both.

    Returns (metrics, edit, images before, images after, seconds the erasure took); `pipe` keeps the edit applied."""
    prompts, seeds, shapes, colors = grid_prompts(per_combo, DEMO_SEED)
    with tqdm(total=2 * len(seeds), desc="generating", unit="img", disable=quiet) as bar:
        before = generate(pipe, prompts, seeds, steps, guidance, progress=bar)
        start = time.perf_counter()
        settings = door.erasure_arguments(concept, recipe_model(pipe))
        edit = erase(pipe, method=method, **settings)
        erase_seconds = time.perf_counter() - start
        edit.apply(pipe)
        after = generate(pipe, prompts, seeds, steps, guidance, progress=bar)
    metrics = {
        "model": model,
        "concept": concept,
        "method": method,
        "erased_prompts": settings["concepts"],
        "preserved_prompts": settings["preserve"],
        "target": settings["target"],
        "regularization": settings["regularization"],
        "uce_preserve_scale": settings.get("uce_preserve_scale"),  # None: rece's default
        "erase_seconds": round(erase_seconds, 4),
        "sampling": {"steps": steps, "guidance": guidance, "images_per_prompt": per_combo, "seed": DEMO_SEED},
        "before": erasure_metrics(before, shapes, colors, concept),
        "after": erasure_metrics(after, shapes, colors, concept),
    }
    metrics["erased"] = metrics["after"]["erased_rate"] < metrics["before"]["erased_rate"]  # False: it erased nothing
    return metrics, edit, before, after, erase_seconds


def not_erased_message(metrics: dict) -> str:
    """What the demo says when the erased rate did not drop."""
    before, after = metrics["before"]["erased_rate"], metrics["after"]["erased_rate"]
    return (
        f"erasing '{metrics['concept']}' from {metrics['model']} with {metrics['method']} erased nothing: the images "
        f"whose prompt names it show it {100 * before:.0f} % of the time before and {100 * after:.0f} % after"
    )


def demo_grid(before: np.ndarray, after: np.ndarray, per_combo: int, concept: str, method: str) -> Image.Image:
    """Before and after side by side, one image per (shape, colour): rows are shapes, columns colours."""
    first = np.arange(0, len(before), per_combo)  # one seed per (shape, colour)
    panels = [image_grid(imgs[first], len(SHAPES), len(COLORS)) for imgs in (before, after)]
    return labelled_panels(
        panels, ["before", f"after erasing '{concept}' ({method})"], row_labels=SHAPES, col_labels=tuple(COLORS)
    )


def metric_rows(metrics: dict) -> list[tuple[str, float, float]]:
    """(metric, before, after) of the demo's detector measurements."""
    return [(key, metrics["before"][key], metrics["after"][key]) for key in METRIC_KEYS]


def demo_page(metrics: dict, grid: Image.Image, edit_summary: str, erase_seconds: float) -> str:
    """The demo's HTML page: what was erased and how, the metrics table, the before / after grid and the edit."""
    concept, method, sampling = metrics["concept"], metrics["method"], metrics["sampling"]
    per_combo, steps, guidance = sampling["images_per_prompt"], sampling["steps"], sampling["guidance"]
    images = len(SHAPES) * len(COLORS) * per_combo
    return html_page(
        f"rece demo: erasing '{concept}' from the {metrics['model']} model",
        [
            f"<p>Method <b>{method}</b>, erased in {erase_seconds:.2f} s: the prompts "
            + ", ".join(f"'{c}'" for c in metrics["erased_prompts"])
            + f" map to '{metrics['target']}' while {len(metrics['preserved_prompts'])} prompts of the other "
            + ("shapes" if concept in SHAPES else "colours")
            + f" are preserved (r = {metrics['regularization']:g}). {images} images per panel "
            f'({per_combo} per shape × colour prompt "a COLOUR SHAPE"), {steps} sampling steps, guidance {guidance}, '
            "same seeds before and after. Measured by the analytic shape / colour detector.</p>",
            "" if metrics.get("erased", True) else f"<p><b>{not_erased_message(metrics)}.</b></p>",
            html_table(metric_rows(metrics), ["metric", "before", "after"]),
            f"<img src='{png_data_uri(grid)}' alt='before and after grid'>",
            f"<h2>Edit</h2><pre>{edit_summary}</pre>",
        ],
    )


DEMO_FILES = {"report.html", "grid.png", "metrics.json", "edit.safetensors"}


def check_demo_output(output: Path, overwrite: bool = False) -> None:
    """Before any work: the demo replaces only an earlier demo's folder (its four files and nothing else); any other
    existing file or folder at OUTPUT is the user's and is refused unless `overwrite`."""
    check_parent(output)
    if overwrite or not output.exists():
        return
    if output.is_dir() and {p.name for p in output.iterdir()} <= DEMO_FILES:
        return
    kind = "a folder holding other files" if output.is_dir() else "a file"
    raise ReceError(f"'{output}' is {kind}, not a rece demo folder; choose another -o or pass --overwrite to replace it")


def _write_demo(output: Path, grid: Image.Image, page: str, metrics: dict, edit: Edit) -> None:
    """Write the demo folder atomically: grid.png, report.html, metrics.json and edit.safetensors."""
    with atomic_dir(output, overwrite=True) as tmp:
        grid.save(tmp / "grid.png")
        (tmp / "report.html").write_text(page)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        edit.save(tmp / "edit.safetensors")


def _print_summary(metrics: dict, erase_seconds: float, output: Path) -> None:
    """The demo's result on the terminal: timing, the metrics table and the files written."""
    done = "erased" if metrics["erased"] else "did not erase"
    print(f"{done} '{metrics['concept']}' from {metrics['model']} with {metrics['method']} in {erase_seconds:.2f} s")
    print(f"{'metric':24s} {'before':>8s} {'after':>8s}")
    for key, b, a in metric_rows(metrics):
        print(f"{key:24s} {b:8.3f} {a:8.3f}")
    print(f"wrote {output / 'report.html'}, {output / 'grid.png'}, {output / 'metrics.json'}")


def run_demo(
    output: str | Path = "rece-demo",
    concept: str = "triangle",
    method: str = "rece",
    model: str = "shapes",
    per_combo: int = 2,
    steps: int = 25,
    guidance: float | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict:
    """Generate the grid prompts, erase `concept`, regenerate with the same seeds, measure and write a report.

    Writes OUTPUT/report.html, OUTPUT/grid.png, OUTPUT/metrics.json and OUTPUT/edit.safetensors. When the erased rate
    did not drop, `metrics["erased"]` is False and a warning says so (the command exits with status 1).
    """
    guidance = _check_options(concept, per_combo, steps, guidance)
    output = Path(output)
    check_demo_output(output, overwrite)
    pipe = _load_pipeline(model)
    metrics, edit, before, after, erase_seconds = measure_demo(pipe, model, concept, method, per_combo, steps, guidance, quiet)
    grid = demo_grid(before, after, per_combo, concept, method)
    page = demo_page(metrics, grid, edit.summary(), erase_seconds)
    _write_demo(output, grid, page, metrics, edit)
    if not quiet:
        _print_summary(metrics, erase_seconds, output)
    if not metrics["erased"]:
        warnings.warn(not_erased_message(metrics), stacklevel=2)
    return metrics
