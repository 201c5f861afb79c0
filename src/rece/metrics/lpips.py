"""LPIPS metric: perceptual distance between the run's images and the same-named images of another run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ReceError
from ..networks.lpips import LPIPS, load_lpips
from ..networks.weights import ALEXNET_URL, LPIPS_ALEX_URL
from ..runs import Run, load_run, natural_key
from .common import MetricResult, load_rgb, progress_bar
from .params import LpipsParams


def to_lpips_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a [1, 3, h, w] tensor in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return (arr / 127.5 - 1).unsqueeze(0)


def evaluate_lpips(run: Run, params: LpipsParams, model: LPIPS | None = None, progress: bool | None = None) -> MetricResult:
    """Mean LPIPS between the run's images and the same-named images of another run (same prompts and seeds)."""
    against, lpips_weights = params.against, params.lpips_weights
    if against is None:
        raise ReceError(
            "lpips needs --against OTHER_RUN_DIR, a run of the same prompts (e.g. the unedited model) to compare with"
        )
    other = load_run(against, "--against run folder")
    missing = sorted(set(run.images) - set(other.images), key=natural_key)
    if missing:
        raise ReceError(
            f"--against run '{against}' lacks {len(missing)} of the {len(run.images)} images of '{run.path}' "
            f"(first: {missing[0]}); compare runs of the same prompt set and --images-per-prompt"
        )
    custom = model is not None
    model = model or load_lpips(lpips_weights)
    rows = []
    with torch.no_grad():
        for name in progress_bar(run.images, "lpips", progress):
            a, b = load_rgb(run.image_dir / name), load_rgb(other.image_dir / name)
            if a.size != b.size:
                raise ReceError(
                    f"lpips: '{name}' is {a.size[0]}×{a.size[1]} here but {b.size[0]}×{b.size[1]} in '{against}'; "
                    "compare runs of the same image size"
                )
            rows.append({"image": name, "lpips": round(float(model(to_lpips_tensor(a), to_lpips_tensor(b))[0]), 6)})
    mean = float(np.mean([r["lpips"] for r in rows]))
    recorded = {
        "against": str(Path(against).resolve()),
        "net": "alex",
        "weights": "custom" if custom else str(lpips_weights) if lpips_weights else f"{ALEXNET_URL} + {LPIPS_ALEX_URL}",
    }
    return MetricResult({"lpips": round(mean, 4)}, recorded, rows)
