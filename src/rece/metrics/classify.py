"""Classifier metric: top-1 accuracy of an ImageNet ResNet-50 against the `class` column of prompts.csv."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..detectors import IMAGENETTE_CLASSES, norm_name
from ..errors import ReceError
from ..networks.resnet import load_classifier
from ..networks.weights import RESNET50_URL
from ..runs import Run
from .common import MetricResult, batches, load_rgb, need_prompts, progress_bar
from .params import ClassifyParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_tensor(img: Image.Image, resize: int = 232) -> torch.Tensor:
    """torchvision's ImageNet evaluation transform: shorter side to `resize` (bilinear), centre crop 224, normalise.

    232 is ResNet50_Weights.IMAGENET1K_V2 (DEFAULT, as the ESD/RECE object evaluation uses); 256 is IMAGENET1K_V1.
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    size = (resize, int(resize * long / short))
    img = img.resize(size if w <= h else size[::-1], Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - 224) / 2)), int(round((h - 224) / 2))
    img = img.crop((left, top, left + 224, top + 224))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    return (arr - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def load_class_names(path: str | os.PathLike | None) -> dict[int, str]:
    """ImageNet index → name: the Imagenette ten, or all from a text file with one name per line (line i = index i)."""
    if not path:
        return dict(IMAGENETTE_CLASSES)
    path = Path(path)
    if not path.is_file():
        raise ReceError(
            f"--class-names '{path}' does not exist; pass a text file with the 1000 ImageNet class names, one per line"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != 1000:
        raise ReceError(f"--class-names '{path}' has {len(names)} names; it needs the 1000 ImageNet class names in index order")
    return dict(enumerate(names))


def evaluate_classify(
    run: Run, params: ClassifyParams, model: torch.nn.Module | None = None, progress: bool | None = None
) -> MetricResult:
    """Top-1 accuracy of an ImageNet ResNet-50 against the `class` column of prompts.csv, overall and per class."""
    classifier_weights, class_names, device = params.classifier_weights, params.class_names, params.device
    prompts = need_prompts(run, "classify", "class")
    names = load_class_names(class_names)
    known = {norm_name(n) for n in names.values()}
    unknown = sorted({prompts[n]["class"] for n in run.images if norm_name(prompts[n]["class"]) not in known})
    if unknown:
        raise ReceError(
            f"classify: class '{unknown[0]}' of '{run.path}' is not among the known ImageNet names "
            "(the Imagenette ten by default); pass --class-names with the 1000 ImageNet class names"
        )
    custom = model is not None
    model = (model or load_classifier(classifier_weights)).to(device)
    rows = []
    bar = progress_bar(run.images, "classify", progress)
    for chunk in batches(run.images, params.batch_size):
        batch = torch.stack([imagenet_tensor(load_rgb(run.image_dir / n), params.resize) for n in chunk]).to(device)
        with torch.no_grad():
            pred = model(batch).argmax(-1).cpu().tolist()
        for name, index in zip(chunk, pred):
            label = prompts[name]["class"]
            predicted = names.get(index, "")
            rows.append(
                {
                    "image": name,
                    "class": label,
                    "predicted_index": index,
                    "predicted": predicted,
                    "correct": int(norm_name(predicted) == norm_name(label)),
                }
            )
        bar.update(len(chunk))
    bar.close()
    summary = {"accuracy %": round(100 * float(np.mean([r["correct"] for r in rows])), 4)}
    for label in sorted({r["class"] for r in rows}):
        hits = [r["correct"] for r in rows if r["class"] == label]
        summary[f"acc {label} %"] = round(100 * sum(hits) / len(hits), 4)
    recorded = {
        "classifier": "resnet50",
        "weights": "custom" if custom else str(classifier_weights) if classifier_weights else RESNET50_URL,
        "class_names": str(class_names or "imagenette"),
        "resize": params.resize,
    }
    return MetricResult(summary, recorded, rows)
