"""Stable Diffusion XL: two CLIP text encoders whose penultimate hidden states, joined, the UNet's cross-attention reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Family, tokenize


class StableDiffusionXL(Family):
    def dim(self, encoders: Sequence) -> int:
        return sum(e.config.hidden_size for e in encoders)

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        parts = []
        for tokenizer, encoder in zip(tokenizers, encoders):
            ids = tokenize(tokenizer, texts).input_ids.to(device)
            parts.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
        return torch.cat(parts, dim=-1)

    def embeds_call(self, pipe, rows, attended, texts) -> dict:
        """SDXL also reads the pooled vector of text_encoder_2 (not edited): the prompts' own."""
        pooled = pipe.encode_prompt(list(texts), device=pipe.unet.device, do_classifier_free_guidance=False)[2]
        return {**super().embeds_call(pipe, rows, attended, texts), "pooled_prompt_embeds": pooled}


# SDXL refiner single files: one text encoder (OpenCLIP bigG) as conditioner.embedders.0, no embedders.1
REFINER_MARKER = "conditioner.embedders.0.model."

SDXL = StableDiffusionXL(
    name="sdxl",
    pipelines=("StableDiffusionXLPipeline",),
    text_parts=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    checkpoint_marker="conditioner.embedders.1.",
    original_unet=True,
    kohya_names="ldm",  # kohya's SDXL scripts train on SGM's UNet: input_blocks / middle_block / output_blocks
)
