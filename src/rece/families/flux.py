"""FLUX.1: two spaces (`two_space`). The T5 rows (padding not masked) through `context_embedder`, and CLIP's pooled
vector through `time_text_embed.text_embedder.linear_1`. FLUX.1 [schnell] is the transformer without guidance
embeddings, run in 4 steps without guidance."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Family, tokenize
from .flux_names import diffusers_state
from .two_space import TwoSpace, two_space_family


class FluxContext(Family):
    """The T5 rows `context_embedder` reads: T5 (text_encoder_2) last hidden state, no attention mask."""

    def attention_counts(self, tokenizers, texts: Sequence[str]) -> list[int]:
        return tokenize(tokenizers[1], texts, self.max_length).attention_mask.sum(dim=1).tolist()

    def dim(self, encoders: Sequence) -> int:
        return encoders[1].config.d_model

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        ids = tokenize(tokenizers[1], texts, self.max_length).input_ids.to(device)
        return encoders[1](ids, output_hidden_states=False)[0]


class FluxPooled(Family):
    """The pooled vector `text_embedder.linear_1` reads: CLIP's `pooler_output`, one row per text."""

    def attention_counts(self, tokenizers, texts: Sequence[str]) -> list[int]:
        return [1] * len(texts)

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        ids = tokenize(tokenizers[0], texts).input_ids.to(device)
        return encoders[0](ids, output_hidden_states=False).pooler_output[:, None]


class Flux(TwoSpace):
    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """FluxPipeline's 2×2 patches: [n, c, h, w] → [n, h/2 · w/2, 4c]."""
        n, c, h, w = latents.shape
        patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(n, (h // 2) * (w // 2), c * 4)

    def predict(self, pipe, noisy, timestep, rows, attended, guidance) -> torch.Tensor:
        """FLUX's transformer on packed latents of a square image: its timestep as σ (the pipeline's t / 1000), the
        guidance embedding where the model has one (dev), zero text ids and the patches' row and column ids."""
        transformer, side = pipe.transformer, math.isqrt(noisy.shape[1])
        image_ids = torch.zeros(side, side, 3)
        image_ids[..., 1] += torch.arange(side)[:, None]
        image_ids[..., 2] += torch.arange(side)[None, :]
        kwargs = {}
        if transformer.config.guidance_embeds:
            kwargs["guidance"] = torch.full([noisy.shape[0]], float(guidance), device=noisy.device)
        return transformer(
            hidden_states=noisy, timestep=timestep / 1000, encoder_hidden_states=rows[0].to(transformer.dtype),
            pooled_projections=rows[1][:, 0].to(transformer.dtype), txt_ids=torch.zeros(rows[0].shape[1], 3, device=noisy.device),
            img_ids=image_ids.reshape(-1, 3).to(noisy.device), **kwargs,
        ).sample  # fmt: skip

    def denoiser_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Black Forest Labs' names at any width (`flux_names`; diffusers' converter assumes 3072)."""
        return diffusers_state(tensors)

    def checkpoint_config(self, header: dict) -> dict:
        """dev has guidance embeddings (guidance_in), schnell none."""
        return {"guidance_embeds": any("guidance_in." in k for k in header)}

    def variant(self, denoiser_config: dict) -> Family:
        """FLUX.1 [schnell] is the transformer without guidance embeddings."""
        if self is FLUX and denoiser_config.get("guidance_embeds") is False:
            return FLUX_SCHNELL
        return self


_SHARED = dict(
    pipelines=("FluxPipeline",),
    text_parts=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    text_encoder_classes=("CLIPTextModel", "T5EncoderModel"),
    tokenizer_class=("CLIPTokenizer", "T5Tokenizer"),
    denoiser="transformer",
    by_components=False,  # recognised by its pipeline class only
    steps=28,
    guidance=3.5,
    sequence_lengths=(512,),  # FluxPipeline.__call__'s default max_sequence_length
    # Black Forest Labs' single files (and kohya's FLUX LoRAs, lora_unet_txt_in / lora_unet_vector_in_in_layer)
    checkpoint_marker="double_blocks.",
    original_names=(("context_embedder", "txt_in"), ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")),
    # T5 alone gives the token rows the joint attention reads, CLIP only the pooled vector: the tokens live in T5's
    # vocabulary, CLIP reads their decoded text
    attack_parts=(1,),
    kohya_comfyui_only=True,  # diffusers 0.42.1 drops lora_unet_txt_in / vector_in when it converts a kohya file
    file_encoders=(("clip_l",), ("t5xxl",)),
    # schnell's repository: the same tokenizers as dev's, and not gated
    tokenizer_repos=(("clip_l", "black-forest-labs/FLUX.1-schnell"),),
)

FLUX = two_space_family(Flux, "flux", FluxContext, FluxPooled, {**_SHARED, "title": "FLUX.1"}, rows=512)
# schnell is run with 256 rows (its model card) and with the pipeline's default 512: rece draws with the first and
# erases at both
FLUX_SCHNELL = two_space_family(
    Flux, "flux-schnell", FluxContext, FluxPooled,
    {**_SHARED, "title": "FLUX.1 [schnell]", "steps": 4, "guidance": 0.0, "sequence_lengths": (256, 512), "variant_of": "flux"},
    rows=256,
)  # fmt: skip
