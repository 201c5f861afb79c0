"""The denoising objective every gradient attack minimises, for every family: noise reference latents x0 to x_t, ask
the (edited) denoiser for its prediction given conditioning rows, and compare with what the model was trained to
predict there. DDPM-trained models (SD1/2, SDXL, PixArt) read x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε and predict ε, x0 or v by
their scheduler's `prediction_type` (Ho et al. 2020; Salimans & Ho 2022); flow-matching models (SD3, FLUX, Sana)
read x_t = (1−σ) x0 + σ ε and predict the velocity ε − x0 (Lipman et al. 2023; Esser et al. 2024). PixArt's learned
variance channels are left out: its sampler reads the noise channels only.

The family answers how its denoiser is called (`Family.predict`, `pack_latents`, `extra_rows`); nothing here
knows a family.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ReceError
from ..families import family_of_pipeline
from ..pipelines import denoiser, image_size


def is_flow_matching(scheduler) -> bool:
    """Whether the scheduler samples a flow-matching model (velocity ε − x0 on x_t = (1−σ) x0 + σ ε)."""
    return getattr(scheduler.config, "prediction_type", None) == "flow_prediction" or hasattr(scheduler, "scale_noise")


def train_steps(scheduler) -> int:
    """T, the number of training timesteps the scheduler's scale counts."""
    return int(scheduler.config.num_train_timesteps)


def spaced_timesteps(count: int, train: int) -> list[int]:
    """UnlearnDiff's timesteps: `count` evenly spaced values of [0, T), starting half a spacing in."""
    spacing = max(1, train // count)
    return list(range(spacing // 2, train, spacing))[:count]


def noisy_and_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and the denoiser's training target at timesteps t [n] (the scheduler's scale)."""
    if is_flow_matching(scheduler):
        sigma = (t.float() / train_steps(scheduler)).view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise, noise - x0
    # the training forward process from ᾱ_t itself: a sampler's add_noise may index its inference timesteps instead
    # (DPMSolverMultistepScheduler, once set_timesteps has run)
    kind = scheduler.config.prediction_type
    alpha_bar = scheduler.alphas_cumprod.to(x0.device, torch.float64)[t.long()].view(-1, *([1] * (x0.dim() - 1)))
    a, b = alpha_bar.sqrt().to(x0.dtype), (1 - alpha_bar).sqrt().to(x0.dtype)
    noisy = a * x0 + b * noise
    if kind == "epsilon":
        return noisy, noise
    if kind == "sample":
        return noisy, x0
    if kind == "v_prediction":
        return noisy, a * noise - b * x0
    raise ReceError(f"scheduler prediction type '{kind}' is not supported by the gradient attacks")


def denoising_loss(pipe, x0: torch.Tensor, rows: list[torch.Tensor], attended: list[int], t: torch.Tensor,
                   noise: torch.Tensor, guidance: float) -> torch.Tensor:  # fmt: skip
    """‖denoiser(x_t, t, rows) − target‖² (mean), gradients to the rows; x0 as the pipeline's latent output."""
    family = family_of_pipeline(pipe)
    model = denoiser(pipe)
    x0 = x0.to(model.device, torch.float32)
    noisy, goal = noisy_and_target(pipe.scheduler, x0, noise.to(x0.device, x0.dtype), t.to(x0.device))
    pred = family.predict(pipe, noisy.to(model.dtype), t.to(x0.device), [r.to(model.device) for r in rows], attended, guidance)
    return torch.nn.functional.mse_loss(pred.float(), goal.float())


def conditioning(target, texts: Sequence[str]) -> tuple[list[torch.Tensor], list[int]]:
    """The rows of texts in every space the family reads (the edited spaces, then `extra_rows`), float32, and each
    text's attended rows: what `denoising_loss` and `generate_from_embeddings` take."""
    views = target.base.spaces or [target.base]
    with torch.no_grad():
        rows = [v.encoder.encode(list(texts)).float() for v in views]
    rows += target.base.family.extra_rows(target.pipe, list(texts))
    return rows, list(views[0].encoder.token_counts(list(texts)))


def image_latents(pipe, paths: Sequence[Path]) -> torch.Tensor:
    """Latents of image files, resized to the pipeline's size, as the denoiser reads them and the pipeline's latent
    output gives them (the VAE's posterior mean, shifted and scaled; packed where the family packs)."""
    import numpy as np
    from PIL import Image

    size = image_size(pipe)
    tensors = []
    for path in paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.BICUBIC)
        tensors.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1)
    pixels = torch.stack(tensors).to(pipe.vae.device, pipe.vae.dtype)
    with torch.no_grad():
        encoded = pipe.vae.encode(pixels)
        # AutoencoderKL gives a distribution, Sana's deep-compression autoencoder the latents themselves
        latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    scaled = ((latents - shift) * pipe.vae.config.scaling_factor).float()
    return family_of_pipeline(pipe).pack_latents(scaled)
