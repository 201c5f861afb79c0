"""A synthetic world: 32×32 RGB images of one coloured shape on a plain background, with prompts.

Deterministic for a seed. Shapes are rasterised analytically (pixel centres inside the shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
BACKGROUND = (245, 245, 245)
SIZE = 32

FULL_TEMPLATES = (
    "a {color} {shape}",
    "a photo of a {color} {shape}",
    "a drawing of a {color} {shape}",
    "a picture of a {color} {shape}",
)
SHAPE_TEMPLATES = ("a {shape}", "a photo of a {shape}", "a drawing of a {shape}")
COLOR_TEMPLATES = ("a {color} shape", "something {color}", "a photo of something {color}")
WORDS = (
    tuple("a an the of photo drawing picture painting image shape something with in on and style art".split())
    + SHAPES
    + tuple(COLORS)
)


@dataclass(frozen=True)
class Scene:
    """One image's content: what is drawn and where (centre and radius in pixels)."""

    shape: str
    color: str
    cx: float
    cy: float
    radius: float


def shape_mask(shape: str, cx, cy, radius, size: int = SIZE) -> np.ndarray:
    """Boolean mask(s) [..., size, size] of pixel centres inside the shape; broadcasts over cx/cy/radius."""
    coords = np.arange(size) + 0.5
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cx, cy, r = (np.asarray(v, dtype=np.float64)[..., None, None] for v in (cx, cy, radius))
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # pointing up: apex at cy - r, base at cy + 0.8 r, half-width r at the base
        top, bottom = cy - r, cy + 0.8 * r
        frac = (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= frac * 1.05 * r)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(scenes: list[Scene], size: int = SIZE) -> np.ndarray:
    """uint8 images [n, size, size, 3]."""
    images = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    images[:] = BACKGROUND
    for i, s in enumerate(scenes):
        images[i][shape_mask(s.shape, s.cx, s.cy, s.radius, size)] = COLORS[s.color]
    return images


def random_scenes(n: int, rng: np.random.Generator, shapes=SHAPES, colors=tuple(COLORS)) -> list[Scene]:
    """n random scenes; the shape always fits inside the image."""
    out = []
    for _ in range(n):
        radius = rng.uniform(6.0, 11.0)
        cx, cy = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
        out.append(Scene(shapes[rng.integers(len(shapes))], colors[rng.integers(len(colors))], cx, cy, radius))
    return out


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A prompt describing the scene: full (60 %), shape only (25 %) or colour only (15 %)."""
    u = rng.random()
    if u < 0.6:
        template = FULL_TEMPLATES[rng.integers(len(FULL_TEMPLATES))]
    elif u < 0.85:
        template = SHAPE_TEMPLATES[rng.integers(len(SHAPE_TEMPLATES))]
    else:
        template = COLOR_TEMPLATES[rng.integers(len(COLOR_TEMPLATES))]
    return template.format(color=scene.color, shape=scene.shape)


def to_tensor_range(images: np.ndarray) -> np.ndarray:
    """uint8 [n, h, w, 3] -> float32 [n, 3, h, w] in [-1, 1]."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def concept_prompts(concept: str) -> list[str]:
    """The prompts that name `concept` (a shape or a colour) in their shortest forms: the word, "a triangle" /
    "a red shape", and the concept with each colour / shape ("a red triangle").

    This small text encoder carries the shape and colour of a prompt in its end-of-text and padding rows, which
    depend on the whole prompt; so an erasure on the shapes model names the concept's short prompt family, not
    only the word. The other templates ("a photo of a red triangle", ...) are left out and measure generalisation.
    """
    if concept in SHAPES:
        return [concept, f"a {concept}"] + [f"a {color} {concept}" for color in COLORS]
    if concept in COLORS:
        return [concept, f"a {concept} shape"] + [f"a {concept} {shape}" for shape in SHAPES]
    raise ValueError(f"'{concept}' is neither a shape ({', '.join(SHAPES)}) nor a colour ({', '.join(COLORS)})")


def other_concept_prompts(concept: str) -> list[str]:
    """The prompt families of the other concepts of the same kind (other shapes, or other colours): what an
    erasure of `concept` preserves."""
    group = SHAPES if concept in SHAPES else tuple(COLORS)
    return [p for other in group if other != concept for p in concept_prompts(other)]
