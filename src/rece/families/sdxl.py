"""Stable Diffusion XL: two CLIP text encoders whose penultimate hidden states, joined, the UNet's cross-attention reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ReceError
from .base import tokenize
from .ldm_names import kohya_name, ldm_name
from .sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    def dim(self, encoders: Sequence) -> int:
        return sum(e.config.hidden_size for e in encoders)

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        parts = []
        for tokenizer, encoder in zip(tokenizers, encoders):
            ids = tokenize(tokenizer, texts).input_ids.to(device)
            parts.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
        return torch.cat(parts, dim=-1)

    def embeds_call(self, pipe, rows, attended, texts) -> dict:
        """SDXL also reads the pooled vector of text_encoder_2 (not edited): rows[1] when given, else the prompts' own."""
        pooled = rows[1][:, 0] if len(rows) > 1 else self.extra_rows(pipe, list(texts))[0][:, 0]
        pooled = pooled.to(pipe.unet.device, pipe.unet.dtype)
        return {**super().embeds_call(pipe, rows, attended, texts), "pooled_prompt_embeds": pooled}

    def extra_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> list[torch.Tensor]:
        """text_encoder_2's `text_embeds` of each text, [n, 1, d], as `encode_prompt` takes the pooled vector."""
        ids = tokenize(tokenizers[1], texts).input_ids.to(device)
        return [encoders[1](ids, output_hidden_states=True)[0][:, None]]

    def predict(self, pipe, noisy, timestep, rows, attended, guidance) -> torch.Tensor:
        """The UNet with SDXL's added conditions: the pooled vector (rows[1]) and the size and crop ids of the latents'
        image, uncropped (what the pipeline passes)."""
        size = noisy.shape[-1] * pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=noisy.dtype, device=noisy.device)
        added = {"text_embeds": rows[1][:, 0].to(pipe.unet.dtype), "time_ids": time_ids.expand(noisy.shape[0], -1)}
        return pipe.unet(noisy, timestep, encoder_hidden_states=rows[0].to(pipe.unet.dtype), added_cond_kwargs=added).sample

    def kohya_modules(self, layers: Sequence[str], denoiser_config: dict) -> dict[str, str]:
        """SGM's block names (input_blocks / middle_block / output_blocks): kohya's SDXL scripts train on SGM's UNet."""
        per_block = denoiser_config.get("layers_per_block", 2)
        if isinstance(per_block, (list, tuple)):
            per_block = per_block[0] if len(set(per_block)) == 1 else None
        if per_block is None:
            raise ReceError("this UNet's blocks have different numbers of layers; kohya's SGM names cannot address them")
        return {n: kohya_name(ldm_name(n, per_block)) for n in layers}


# SDXL refiner single files: one text encoder (OpenCLIP bigG) as conditioner.embedders.0, no embedders.1
REFINER_MARKER = "conditioner.embedders.0.model."

SDXL = StableDiffusionXL(
    name="sdxl",
    title="SDXL",
    pipelines=("StableDiffusionXLPipeline",),
    text_parts=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    checkpoint_marker="conditioner.embedders.1.",
    # both CLIPs share one vocabulary and both feed the rows (text_encoder_2 the pooled vector too): the same token
    # ids in both, a vector of each encoder's width in each
    attack_parts=(0, 1),
    file_encoders=(("clip_l",), ("clip_g",)),
    optional_encoders=(0,),  # the refiner has CLIP-G alone (conditioner.embedders.0.model.)
    projected_parts=(1,),
    tokenizer_repos=(
        ("clip_l", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("clip_g", "stabilityai/stable-diffusion-xl-refiner-1.0"),
    ),
)
