"""Measure the shapes model with the analytic detector: prompt following, and what an erasure changed."""

from __future__ import annotations

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
    prompt_embeds: torch.Tensor | None = None,
    progress=None,
) -> np.ndarray:
    """uint8 images [n, 32, 32, 3], one per (prompt or embedding, seed); each image has its own generator."""
    n = len(seeds)
    out = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        if prompt_embeds is not None:
            kwargs["prompt_embeds"] = prompt_embeds[start:stop].to(pipe.unet.dtype)
            kwargs["negative_prompt_embeds"] = _empty_embeds(pipe, stop - start)
        else:
            kwargs["prompt"] = list(prompts[start:stop])
        images = seeded_images(pipe, seeds[start:stop], **kwargs)
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        if progress is not None:
            progress.update(stop - start)
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def _empty_embeds(pipe, n: int) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt([""] * n, pipe.device, 1, False)
    return embeds


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

    erased_rate: share of images for prompts naming the concept that show it; other_shape_accuracy and
    color_accuracy: detector accuracy on the prompts that do not name it.
    """
    dets = [detect(img) for img in images]
    shapes, colors = np.array(shapes), np.array(colors)
    shown = np.array([d.shape for d in dets]) if concept in SHAPES else np.array([d.color for d in dets])
    named = (shapes if concept in SHAPES else colors) == concept
    shape_ok = np.array([d.shape == s for d, s in zip(dets, shapes)])
    color_ok = np.array([d.color == c for d, c in zip(dets, colors)])
    return {
        "erased_rate": float((shown[named] == concept).mean()),
        "other_shape_accuracy": float(shape_ok[~named].mean()),
        "color_accuracy": float(color_ok[~named].mean()),
        "images": int(len(images)),
    }
