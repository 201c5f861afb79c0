"""`rece demo`: erase a concept from the shapes model and show before / after, measured by the detector."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import ReceError
from .io import atomic_dir

DEMO_SEED = 0


def _load_pipeline(model: str):
    """The demo's pipeline: `shapes` (default) or a folder of a shapes-world model."""
    from .generate import load_pipeline

    return load_pipeline(model)


def run_demo(
    output: str | Path = "rece-demo",
    concept: str = "triangle",
    method: str = "rece",
    model: str = "shapes",
    per_combo: int = 2,
    steps: int = 25,
    guidance: float | None = None,
    quiet: bool = False,
) -> dict:
    """Generate the grid prompts, erase `concept`, regenerate with the same seeds, measure and write a report.

    Writes OUTPUT/report.html, OUTPUT/grid.png, OUTPUT/metrics.json and OUTPUT/edit.safetensors.
    """
    from tqdm.auto import tqdm

    from .erase import erase
    from .report import html_page, html_table, image_grid, labelled_panels, png_data_uri
    from .toy.evaluate import GUIDANCE, erasure_arguments, erasure_metrics, generate, grid_prompts
    from .toy.world import COLORS, SHAPES

    if concept not in SHAPES and concept not in COLORS:
        raise ReceError(
            f"demo concept '{concept}' is not in the shapes world; choose one of: {', '.join(SHAPES + tuple(COLORS))}"
        )
    if per_combo < 1 or steps < 1:
        raise ReceError("--per-combo and --steps must be at least 1")
    if guidance is not None and not (0 <= guidance < float("inf")):
        raise ReceError(f"--guidance must be a finite number >= 0, got {guidance}")
    guidance = GUIDANCE if guidance is None else guidance
    output = Path(output)
    pipe = _load_pipeline(model)
    prompts, seeds, shapes, colors = grid_prompts(per_combo, DEMO_SEED)
    with tqdm(total=2 * len(seeds), desc="generating", unit="img", disable=quiet) as bar:
        before = generate(pipe, prompts, seeds, steps, guidance, progress=bar)
        start = time.perf_counter()
        settings = erasure_arguments(concept)
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
        "erase_seconds": round(erase_seconds, 4),
        "sampling": {"steps": steps, "guidance": guidance, "images_per_prompt": per_combo, "seed": DEMO_SEED},
        "before": erasure_metrics(before, shapes, colors, concept),
        "after": erasure_metrics(after, shapes, colors, concept),
    }
    first = np.arange(0, len(seeds), per_combo)  # one seed per (shape, colour): rows = shapes, columns = colours
    panels = [image_grid(imgs[first], len(SHAPES), len(COLORS)) for imgs in (before, after)]
    grid = labelled_panels(
        panels, ["before", f"after erasing '{concept}' ({method})"], row_labels=SHAPES, col_labels=tuple(COLORS)
    )
    rows = [
        (key, metrics["before"][key], metrics["after"][key]) for key in ("erased_rate", "other_shape_accuracy", "color_accuracy")
    ]
    page = html_page(
        f"rece demo: erasing '{concept}' from the shapes model",
        [
            f"<p>Method <b>{method}</b>, erased in {erase_seconds:.2f} s: the prompts "
            + ", ".join(f"'{c}'" for c in settings["concepts"])
            + f" map to '{settings['target']}' while {len(settings['preserve'])} prompts of the other "
            + ("shapes" if concept in SHAPES else "colours")
            + f" are preserved (r = {settings['regularization']:g}). {len(seeds)} images per panel "
            f'({per_combo} per shape × colour prompt "a COLOUR SHAPE"), {steps} DDIM steps, guidance {guidance}, '
            "same seeds before and after. Measured by the analytic shape / colour detector.</p>",
            html_table(rows, ["metric", "before", "after"]),
            f"<img src='{png_data_uri(grid)}' alt='before and after grid'>",
            f"<h2>Edit</h2><pre>{edit.summary()}</pre>",
        ],
    )
    with atomic_dir(output, overwrite=True) as tmp:
        grid.save(tmp / "grid.png")
        (tmp / "report.html").write_text(page)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        edit.save(tmp / "edit.safetensors")
    if not quiet:
        print(f"erased '{concept}' from {model} with {method} in {erase_seconds:.2f} s")
        print(f"{'metric':24s} {'before':>8s} {'after':>8s}")
        for key, b, a in rows:
            print(f"{key:24s} {b:8.3f} {a:8.3f}")
        print(f"wrote {output / 'report.html'}, {output / 'grid.png'}, {output / 'metrics.json'}")
    return metrics
