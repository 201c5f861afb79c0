"""Measure the shapes model with the analytic detector: prompt following, and what an erasure changed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..generate import seeded_images
from .detector import detect
from .world import COLORS, SHAPES

GUIDANCE = 4.0


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


def erasure_arguments(concept: str) -> dict:
    """How to erase a shape or a colour from the shapes model with `rece.erase`: concepts, preserve, target, r.

    The concept's short prompt family is erased and the other shapes' (colours') families are preserved
    (see `world.concept_prompts` for why the word alone is not enough here). Colours map to "a shape": the model
    draws a random colour for " ", the erased one included. r = 1e-3, the paper's setting for hard objects and
    styles: at r = 0.1 the RECE step undid the UCE erasure of "cross" and "red" here (docs/shapes.md).
    """
    from .world import concept_prompts, other_concept_prompts

    is_shape = concept in SHAPES
    return {
        "concepts": concept_prompts(concept),
        "preserve": other_concept_prompts(concept),
        "target": " " if is_shape else "a shape",
        "regularization": 1e-3,
        "templates": False,  # robust mode: the family is the estimate; its templates would overlap the held-out ones
    }


EVALUATION_TEMPLATES = ("a {color} {shape}", "a photo of a {color} {shape}")


def evaluation_prompt_rows(concept: str, kept: bool = False) -> list[dict]:
    """A prompt set measuring an erasure of `concept` on the shapes model, one row per (template, shape, colour).

    kept=False: the prompts naming the concept (its `concept` column is the concept); kept=True: those naming
    another concept of the same kind (`concept` is that shape or colour: what each image should still show). The
    second template is never named by `erasure_arguments`, so it measures generalisation.
    """
    is_shape = concept in SHAPES
    rows = []
    for t, template in enumerate(EVALUATION_TEMPLATES):
        for i, shape in enumerate(SHAPES):
            for j, color in enumerate(COLORS):
                named = shape if is_shape else color
                if (named == concept) == kept:
                    continue
                prompt = template.format(color=color, shape=shape)
                rows.append({"prompt": prompt, "evaluation_seed": 1000 + 100 * t + 10 * i + j, "concept": named})
    return [{"case_number": k, **row} for k, row in enumerate(rows)]
