"""Measure the shapes model with the analytic detector: prompt following, and what an erasure changed."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from ..pipelines import seeded_images
from .detector import detect
from .door import GUIDANCE
from .world import COLORS, SHAPES


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (),
    steps: int = 25,
    guidance: float = GUIDANCE,
    batch_size: int = 32,
    prompt_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
    progress=None,
) -> np.ndarray:
    """uint8 images [n, 32, 32, 3], one per (prompt or embedding, seed); each image has its own generator.

    `prompt_embeds`: rows to draw from instead of prompts, [n, L, d], or one such tensor per space the model reads
    the prompt in (shapes-mmdit: the joint rows and the pooled vector, [n, 1, d]); "" is the negative prompt."""
    from ..families import family_of_pipeline

    n = len(seeds)
    family = family_of_pipeline(pipe)
    spaces = [prompt_embeds] if isinstance(prompt_embeds, torch.Tensor) else prompt_embeds
    out = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np", **family.call_options())
        if spaces is not None:
            rows = [space[start:stop] for space in spaces]
            kwargs.update(family.embeds_call(pipe, rows, [rows[0].shape[1]] * (stop - start), [""] * (stop - start)))
        else:
            kwargs["prompt"] = list(prompts[start:stop])
        with family.rows_as_input(pipe) if spaces is not None else contextlib.nullcontext():
            images = seeded_images(pipe, seeds[start:stop], **kwargs)
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        if progress is not None:
            progress.update(stop - start)
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def grid_prompts(per_combo: int, seed: int = 0, template: str = "a {color} {shape}"):
    """Prompts for every (shape, colour) pair, `per_combo` seeds each: (prompts, seeds, shapes, colours)."""
    prompts, seeds, shapes, colors = [], [], [], []
    for i, shape in enumerate(SHAPES):
        for j, color in enumerate(COLORS):
            for k in range(per_combo):
                prompts.append(template.format(color=color, shape=shape))
                seeds.append(seed + 1000 * i + 100 * j + k)
                shapes.append(shape)
                colors.append(color)
    return prompts, seeds, shapes, colors


def accuracy(images: np.ndarray, shapes: Sequence[str], colors: Sequence[str]) -> dict:
    """Detector accuracy: overall shape and colour, and per shape."""
    dets = [detect(img) for img in images]
    shape_ok = np.array([d.shape == s for d, s in zip(dets, shapes)])
    color_ok = np.array([d.color == c for d, c in zip(dets, colors)])
    per_shape = {s: float(shape_ok[np.array(shapes) == s].mean()) for s in SHAPES if s in shapes}
    return {
        "shape": float(shape_ok.mean()),
        "color": float(color_ok.mean()),
        "per_shape": per_shape,
        "detected": [(d.shape, d.color) for d in dets],
    }


def erasure_metrics(images: np.ndarray, shapes: Sequence[str], colors: Sequence[str], concept: str) -> dict:
    """What an erasure of `concept` (a shape or a colour) shows in images of the grid prompts.

    erased_rate: share of the images of prompts naming the concept that show it; other_shape_accuracy and
    color_accuracy: detector accuracy on the prompts that do not name it; erased_colours (a shape erased) or
    erased_shapes (a colour erased): how often the images of prompts naming the concept still show the prompt's
    other attribute ("a blue triangle" drawn blue), a figure of its own so that color_accuracy never hides it.
    erased_images and other_images: how many images each figure counts.
    """
    dets = [detect(img) for img in images]
    shapes, colors = np.array(shapes), np.array(colors)
    shown = np.array([d.shape for d in dets]) if concept in SHAPES else np.array([d.color for d in dets])
    named = (shapes if concept in SHAPES else colors) == concept
    shape_ok = np.array([d.shape == s for d, s in zip(dets, shapes)])
    color_ok = np.array([d.color == c for d, c in zip(dets, colors)])
    kept_on_erased = ("erased_colours", color_ok) if concept in SHAPES else ("erased_shapes", shape_ok)
    return {
        "erased_rate": float((shown[named] == concept).mean()),
        "other_shape_accuracy": float(shape_ok[~named].mean()),
        "color_accuracy": float(color_ok[~named].mean()),
        kept_on_erased[0]: float(kept_on_erased[1][named].mean()),
        "images": int(len(images)),
        "erased_images": int(named.sum()),
        "other_images": int((~named).sum()),
    }
