"""Stable Diffusion 1.x / 2.x: one CLIP text encoder whose last hidden state the UNet's cross-attention reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Family, tokenize
from .ldm_names import UNET_PREFIX, diffusers_name, kohya_name, layers_per_block_of


def eos_attention_mask(text_encoder, ids: torch.Tensor) -> torch.Tensor | None:
    """The attention mask a pipeline passes for token ids (only encoders configured to use one): up to the first EOS.

    For ids from the tokenizer this equals the tokenizer's own mask; attacks use it for ids they made themselves.
    """
    if not getattr(text_encoder.config, "use_attention_mask", False):
        return None
    eos = text_encoder.config.eos_token_id
    first = (ids == eos).int().argmax(dim=-1, keepdim=True)
    return (torch.arange(ids.shape[1]).unsqueeze(0) <= first).long()


def encode_ids(text_encoder, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden state of token ids [n, 77] as the SD pipelines take it (gradients flow if enabled)."""
    device = text_encoder.device
    mask = None if attention_mask is None else attention_mask.to(device)
    return text_encoder(ids.to(device), attention_mask=mask)[0]


class StableDiffusion(Family):
    """A UNet family: its single files hold the original (LDM / SGM) UNet under model.diffusion_model."""

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        inputs = tokenize(tokenizers[0], texts)
        use_mask = getattr(encoders[0].config, "use_attention_mask", False)
        return encode_ids(encoders[0], inputs.input_ids, inputs.attention_mask if use_mask else None)

    def has_single_files(self) -> bool:
        return True

    def original_keys(self, header: dict) -> dict[str, str]:
        """The edited layers found through the original UNet's block names (`ldm_names`)."""
        keys, per_block = {}, layers_per_block_of(header)
        for key in header:
            if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
                name = diffusers_name(key[len(UNET_PREFIX) : -len(".weight")], per_block)
                if name is not None and self.is_edited_weight(name + ".weight"):
                    keys[name] = key
        return keys

    def has_kohya_names(self) -> bool:
        return True

    def checkpoint_config(self, header: dict) -> dict:
        return {"layers_per_block": layers_per_block_of(header)}

    def kohya_modules(self, layers: Sequence[str], denoiser_config: dict) -> dict[str, str]:
        """diffusers' module names: kohya's scripts train SD1/SD2 on a UNet with diffusers' names."""
        return {n: kohya_name(n) for n in layers}


SD = StableDiffusion(
    name="sd",
    title="Stable Diffusion 1.x/2.x",
    pipelines=("StableDiffusionPipeline",),
    text_parts=(("tokenizer", "text_encoder"),),
    text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False},
    file_encoders=(("clip_l", "clip_h"),),  # SD1: CLIP-L; SD2: OpenCLIP-H, its penultimate layer
    tokenizer_repos=(("clip_l", "stable-diffusion-v1-5/stable-diffusion-v1-5"), ("clip_h", "stabilityai/stable-diffusion-2-1")),
)
