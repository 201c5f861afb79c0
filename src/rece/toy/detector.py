"""An analytic detector (no learned weights) of the shape and colour in a shapes-world image.

Foreground = pixels far from the background colour (estimated from the border); colour = nearest
palette colour to the foreground's median; shape = the template with the highest IoU after cropping
the foreground to its bounding box and resampling to a fixed grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .world import COLORS, SHAPES, shape_mask

GRID = 16
MIN_PIXELS = 12


@dataclass(frozen=True)
class Detection:
    shape: str | None
    color: str | None
    score: float  # IoU with the chosen template (0 when nothing was found)


def _resample(mask: np.ndarray, grid: int = GRID) -> np.ndarray:
    """Crop a boolean mask to its bounding box and resample it to grid×grid (area-weighted)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64)
    h, w = crop.shape
    rows = np.minimum((np.arange(grid * h) // grid), h - 1)
    cols = np.minimum((np.arange(grid * w) // grid), w - 1)
    big = crop[rows][:, cols]  # each pixel repeated grid times: (grid*h, grid*w)
    return big.reshape(grid, h, grid, w).mean(axis=(1, 3))


@lru_cache(maxsize=1)
def templates() -> dict[str, np.ndarray]:
    """Each shape rendered large, cropped and resampled like a detection."""
    size = 256
    return {s: _resample(shape_mask(s, size / 2, size / 2, size * 0.4, size=size)) for s in SHAPES}


def foreground(image: np.ndarray, threshold: float = 80.0) -> np.ndarray:
    """Boolean mask of pixels whose RGB distance from the border's median colour exceeds `threshold`."""
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(img - background, axis=-1) > threshold


def detect(image: np.ndarray) -> Detection:
    """Classify one uint8 HxWx3 image."""
    mask = foreground(image)
    if mask.sum() < MIN_PIXELS:
        return Detection(None, None, 0.0)
    pixels = image[mask].astype(np.float64)
    median = np.median(pixels, axis=0)
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float64)
    color = names[int(np.argmin(np.linalg.norm(palette - median, axis=1)))]
    grid = _resample(mask)
    scores = {}
    for shape, template in templates().items():
        inter = np.minimum(grid, template).sum()
        union = np.maximum(grid, template).sum()
        scores[shape] = inter / union
    shape = max(scores, key=scores.get)
    return Detection(shape, color, float(scores[shape]))
