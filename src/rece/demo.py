"""`rece demo`: erase a concept from the shapes model and show before / after, measured by the detector."""

from __future__ import annotations

import html
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
from .io import atomic_dir, check_folder_parent, make_parent
from .pictures import html_page, html_table, image_grid, labelled_panels, png_data_uri
from .pipelines import load_pipeline
from .toy import door
from .toy.evaluate import erasure_metrics, generate, grid_prompts
from .toy.world import COLORS, SHAPES

DEMO_SEED = 0
# erased_colours after a shape erasure, erased_shapes after a colour one (toy.evaluate.erasure_metrics)
METRIC_KEYS = ("erased_rate", "other_shape_accuracy", "color_accuracy", "erased_colours", "erased_shapes")


def _load_pipeline(model: str):
    """The demo's pipeline: `shapes` (default), `shapes-mmdit`, `shapes-dit` or a folder of a shapes-world model."""
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
    """Which shapes model's recipe erases from `pipe`: shapes-mmdit's for an MMDiT (two spaces), shapes-dit's for a
    model whose encoder masks padding, shapes' otherwise (a retrained one too)."""
    family = family_of_pipeline(pipe)
    return door.MMDIT if family.spaces else door.DIT if family.masks_padding else door.NAME


def measure_demo(
    pipe, model: str, concept: str, method: str, per_combo: int, steps: int, guidance: float, quiet: bool = False
) -> tuple[dict, Edit, np.ndarray, np.ndarray, float]:
    """Generate the grid prompts, erase `concept` from `pipe`, regenerate with the same seeds and measure both.

    Returns (metrics, edit, images before, images after, seconds the erasure took); `pipe` keeps the edit applied."""
    prompts, seeds, shapes, colors = grid_prompts(per_combo, DEMO_SEED)
    with tqdm(total=2 * len(seeds), desc="generating", unit="img", disable=quiet) as bar:
        before = generate(pipe, prompts, seeds, steps, guidance, progress=bar)
        start = time.perf_counter()
        settings = door.erasure_arguments(concept, recipe_model(pipe), method)
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
        "targets": settings.get("targets"),  # robust: each erased prompt's own
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


def metric_rows(metrics: dict) -> list[tuple[str, float, float, str]]:
    """(metric, before, after, which images it counts) of the demo's detector measurements."""
    covers = metric_coverage(metrics["concept"], metrics["after"]["erased_images"], metrics["after"]["other_images"])
    return [(key, metrics["before"][key], metrics["after"][key], covers[key]) for key in METRIC_KEYS if key in metrics["after"]]


def metric_coverage(concept: str, erased: int, others: int) -> dict[str, str]:
    """What each figure counts: which prompts' images, and what share of them."""
    naming, other = f"the {erased} images of prompts naming {concept}", f"the {others} images of the other prompts"
    return {
        "erased_rate": f"{naming}: share showing {concept}",
        "other_shape_accuracy": f"{other}: share showing the shape their prompt names",
        "color_accuracy": f"{other}: share showing the colour their prompt names",
        "erased_colours": f"{naming}: share still showing the colour their prompt names",
        "erased_shapes": f"{naming}: share still showing the shape their prompt names",
    }


def demo_page(metrics: dict, grid: Image.Image, edit_summary: str, erase_seconds: float) -> str:
    """The demo's HTML page: what was erased and how, the metrics table, the before / after grid and the edit."""
    concept, method, sampling = metrics["concept"], metrics["method"], metrics["sampling"]
    per_combo, steps, guidance = sampling["images_per_prompt"], sampling["steps"], sampling["guidance"]
    images = len(SHAPES) * len(COLORS) * per_combo
    erased = ", ".join(f"'{c}'" for c in metrics["erased_prompts"])
    others = "shapes" if concept in SHAPES else "colours"
    mapped = f"'{html.escape(metrics['target'])}'"
    if metrics.get("targets"):  # robust: each prompt to the same prompt with the next concept of its kind
        mapped = (
            "the same prompts with the next "
            + ("shape" if concept in SHAPES else "colour")
            + " ("
            + html.escape(", ".join(f"'{t}'" for t in metrics["targets"][:3]))
            + ", ...)"
        )
    return html_page(
        f"rece demo: erasing '{concept}' from the {metrics['model']} model",
        [
            f"<p>Method <b>{method}</b>, erased in {erase_seconds:.2f} s: the prompts {html.escape(erased)} map to "
            f"{mapped} while the {len(metrics['preserved_prompts'])} prompts of the other "
            f"{others} are preserved, and '' (the empty prompt, which every erasure preserves by default) with them "
            f"(r = {metrics['regularization']:g}). {images} images per panel "
            f'({per_combo} per shape × colour prompt "a COLOUR SHAPE"), {steps} sampling steps, guidance {guidance}, '
            "same seeds before and after. Measured by the analytic shape / colour detector; each figure counts the "
            "images the last column names.</p>",
            "" if metrics.get("erased", True) else f"<p><b>{not_erased_message(metrics)}.</b></p>",
            html_table(metric_rows(metrics), ["metric", "before", "after", "counts"]),
            f"<img src='{png_data_uri(grid)}' alt='before and after grid'>",
            f"<h2>Edit</h2><p>Saved beside this page as <code>edit.safetensors</code>: <code>rece info edit.safetensors</code>"
            f" describes it, <code>rece apply {html.escape(metrics['model'])} edit.safetensors -o OUT</code> writes the "
            "edited model, and <code>rece attack</code> red-teams it.</p>"
            f"<pre>{html.escape(edit_summary)}</pre>",
        ],
        style="td:nth-child(4) { text-align: left; }",  # the counts column reads as text
    )


DEMO_FILES = {"report.html", "grid.png", "metrics.json", "edit.safetensors"}


def check_demo_output(output: Path, overwrite: bool = False) -> None:
    """Before any work: the demo replaces only an earlier demo's folder (its four files and nothing else); any other
    existing file or folder at OUTPUT is the user's and is refused unless `overwrite`."""
    check_folder_parent(output)
    if overwrite or not output.exists():
        return
    if output.is_dir() and {p.name for p in output.iterdir()} <= DEMO_FILES:
        return
    kind = "a folder holding other files" if output.is_dir() else "a file"
    raise ReceError(f"'{output}' is {kind}, not a rece demo folder; choose another -o or pass --overwrite to replace it")


def _write_demo(output: Path, grid: Image.Image, page: str, metrics: dict, edit: Edit) -> None:
    """Write the demo folder atomically: grid.png, report.html, metrics.json and edit.safetensors."""
    make_parent(output)
    with atomic_dir(output, overwrite=True) as tmp:
        grid.save(tmp / "grid.png")
        (tmp / "report.html").write_text(page)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        edit.save(tmp / "edit.safetensors")


def _print_summary(metrics: dict, erase_seconds: float, output: Path) -> None:
    """The demo's result on the terminal: timing, the metrics table and the files written."""
    done = "erased" if metrics["erased"] else "did not erase"
    print(f"{done} '{metrics['concept']}' from {metrics['model']} with {metrics['method']} in {erase_seconds:.2f} s")
    print(f"{'metric':24s} {'before':>8s} {'after':>8s}  counts")
    for key, b, a, covers in metric_rows(metrics):
        print(f"{key:24s} {b:8.3f} {a:8.3f}  {covers}")
    files = ", ".join(str(output / name) for name in ("report.html", "grid.png", "metrics.json", "edit.safetensors"))
    print(f"wrote {files}")


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
