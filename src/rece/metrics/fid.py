"""FID metric: Fréchet distance between the run's and a reference folder's features (FID Inception or CLIP)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ReceError
from ..networks.inception import FIDInception, load_fid_inception
from ..networks.weights import FID_WEIGHTS_URL
from ..runs import Run, load_run
from .clip import Clip, load_clip
from .common import MetricResult, batches, load_rgb, progress_bar
from .params import FidParams


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (float64; tiny negatives → 0)."""
    m = np.asarray(matrix, dtype=np.float64)
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: |mu1-mu2|² + tr(S1 + S2 - 2 (S1 S2)^½), via tr((√S1 S2 √S1)^½)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ReceError(f"FID features differ in size ({mu1.shape} vs {mu2.shape}); use the same feature extractor for both")
    root1 = sqrtm_psd(s1)
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID of two feature sets (rows); with fewer samples than dimensions, exactly via the nuclear norm of X1 X2ᵀ.

    With centred A = X1/√(n1-1), B = X2/√(n2-1): S1 = AᵀA, S2 = BᵀB, and tr((S1 S2)^½) = Σ singular values of A Bᵀ
    (an n1×n2 matrix), so no d×d eigen-decomposition is needed and no tiny negative eigenvalues appear.
    """
    (mu1, s1), (mu2, s2) = feature_stats(f1), feature_stats(f2)
    n1, n2, d = len(f1), len(f2), mu1.shape[0]
    if max(n1, n2) > d:
        return frechet_distance(mu1, s1, mu2, s2)
    a = (np.asarray(f1, np.float64) - mu1) / math.sqrt(n1 - 1)
    b = (np.asarray(f2, np.float64) - mu2) / math.sqrt(n2 - 1)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(a * a) + np.sum(b * b) - 2 * cross)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of feature rows, float64."""
    f = np.asarray(features, np.float64)
    if f.shape[0] < 2:
        raise ReceError(f"FID needs at least 2 images per side (got {f.shape[0]}); generate more images")
    return f.mean(0), np.cov(f, rowvar=False)


def inception_extractor(model: FIDInception, device: str = "cpu") -> Callable:
    """Images → Inception pool3 features (numpy), from RGB pixels scaled to [0, 1] as pytorch-fid reads them."""

    def extract(images: Sequence[Image.Image]) -> np.ndarray:
        """Pool3 features [n, 2048] of a batch of images."""
        pixels = [torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)[None] / 255 for im in images]
        size = (299, 299)  # each image resized alone (sizes may differ); the model's own resize is then the identity
        batch = torch.cat([torch.nn.functional.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pixels])
        with torch.no_grad():
            return model(batch.to(device)).double().cpu().numpy()

    return extract


def fid_feature_extractor(
    kind: str = "inception", fid_weights: str | None = None, clip: Clip | None = None, **clip_args
) -> Callable[[Sequence[Image.Image]], np.ndarray]:
    """Images → features: Inception pool3 (--fid-weights, else pytorch-fid's file downloaded) or 'clip' embeddings."""
    if kind == "clip":
        clip = clip or load_clip(**clip_args)
        return lambda images: clip.image_features(images).numpy()
    if kind == "inception":
        return inception_extractor(load_fid_inception(fid_weights), clip_args.get("device", "cpu"))
    raise ReceError(f"unknown --fid-features '{kind}'; choose inception or clip")


def folder_features(run: Run, extract: Callable, batch_size: int, desc: str, progress: bool | None = None) -> np.ndarray:
    """Features of every image of a folder, one row each."""
    parts = []
    bar = progress_bar(run.images, desc, progress)
    for chunk in batches(run.images, batch_size):
        parts.append(np.asarray(extract([load_rgb(run.image_dir / n) for n in chunk]), np.float64))
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(parts)


def evaluate_fid(run: Run, params: FidParams, extract: Callable | None = None, progress: bool | None = None) -> MetricResult:
    """FID between the run's images and a reference folder, on the chosen features."""
    reference, fid_features, clip_model = params.reference, params.fid_features, params.clip_model
    if reference is None:
        raise ReceError("fid needs --reference DIR, a folder of reference images (e.g. the COCO images of the prompts)")
    ref = load_run(reference, "reference folder")
    custom = extract is not None
    extract = extract or fid_feature_extractor(fid_features, params.fid_weights, name=clip_model, device=params.device)
    ours = folder_features(run, extract, params.batch_size, "fid (run)", progress)
    theirs = folder_features(ref, extract, params.batch_size, "fid (reference)", progress)
    if ours.shape[1] != theirs.shape[1]:
        raise ReceError(f"FID features differ in size ({ours.shape[1]} vs {theirs.shape[1]}); use one feature extractor")
    fid = fid_from_features(ours, theirs)
    recorded = {"reference": str(Path(reference).resolve()), "features": fid_features, "reference_images": len(ref.images)}
    if fid_features == "clip":
        recorded["clip_model"] = clip_model
    elif fid_features == "inception" and not custom:
        recorded["fid_weights"] = str(params.fid_weights) if params.fid_weights else FID_WEIGHTS_URL
    return MetricResult({"fid": round(fid, 4)}, recorded, [{"image": n} for n in run.images])
