"""Shapes-model metric: the share of images the analytic shapes detector sees each concept (shape or colour) in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ReceError
from ..runs import Run
from ..toy import door
from ..toy.detector import Detection, detect
from .common import MetricResult, load_rgb, progress_bar, run_concepts
from .params import ShapesParams


def check_shapes_concepts(concepts: Sequence[str], run: Run) -> None:
    """Every concept must be a shapes-world shape or colour."""
    if not concepts:
        raise ReceError(f"cannot tell which concept to look for in '{run.path}'; pass --concept (a shape or colour)")
    for c in concepts:
        if not door.is_world_concept(c):
            raise ReceError(
                f"'{c}' is not a shapes-world shape or colour; pass --concept with one of {', '.join(door.world_concepts())}"
            )


def shapes_detections(run: Run, progress: bool | None = None) -> dict[str, Detection]:
    """The analytic shapes detector's finding (shape, colour, score) for every image of a run."""
    return {n: detect(np.asarray(load_rgb(run.image_dir / n))) for n in progress_bar(run.images, "shapes", progress)}


def shows(detection: Detection, concept: str) -> bool:
    """Whether a shapes detection shows the concept (its shape or its colour)."""
    return concept in (detection.shape, detection.color)


def evaluate_shapes(run: Run, params: ShapesParams, progress: bool | None = None) -> MetricResult:
    """Shapes model: share of images showing each concept (shape or colour) by the analytic detector."""
    concepts = run_concepts(run, params.concept)
    check_shapes_concepts(concepts, run)
    found = shapes_detections(run, progress)
    rows = [
        {
            "image": n,
            "shape": d.shape or "",
            "color": d.color or "",
            "score": round(d.score, 4),
            **{f"shows {c}": int(shows(d, c)) for c in concepts},
        }
        for n, d in found.items()
    ]
    summary = {f"{c} %": round(100 * float(np.mean([r[f"shows {c}"] for r in rows])), 4) for c in concepts}
    return MetricResult(summary, {"detector": "rece.toy.detector (analytic)", "concepts": concepts}, rows)
