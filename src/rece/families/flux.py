"""FLUX.1: the prompt reaches the transformer in two spaces. The T5 rows (512, padding not masked) through
`context_embedder`, the last place where every text row is a linear function of the prompt alone (the double blocks
mix text and image tokens), and CLIP's pooled vector through `time_text_embed.text_embedder.linear_1` (the
modulation). Each space is erased on its own, with the same procedure."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .base import Family, tokenize

CONTEXT = re.compile(r"^context_embedder\.weight$")
POOLED = re.compile(r"^time_text_embed\.text_embedder\.linear_1\.weight$")


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


class Flux(Family):
    def variant(self, denoiser_config: dict) -> Family:
        """FLUX.1 [schnell] is the transformer without guidance embeddings: 256 T5 rows, 4 steps, guidance 0."""
        if self.name == "flux" and denoiser_config.get("guidance_embeds") is False:
            return FLUX_SCHNELL
        return self

    def embeds_call(self, pipe, rows, attended, texts) -> dict:
        """The token rows and the pooled vector, each where the pipeline takes it."""
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
        return {"prompt_embeds": rows[0].to(device, dtype), "pooled_prompt_embeds": rows[1][:, 0].to(device, dtype)}


_SHARED = dict(
    pipelines=("FluxPipeline",),
    text_parts=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    text_encoder_classes=("CLIPTextModel", "T5EncoderModel"),
    tokenizer_class=("CLIPTokenizer", "T5Tokenizer"),
    denoiser="transformer",
    by_components=False,  # recognised by its pipeline class only
    steps=28,
    guidance=3.5,
    # Black Forest Labs' single files (and kohya's FLUX LoRAs, lora_unet_txt_in / lora_unet_vector_in_in_layer)
    checkpoint_marker="double_blocks.",
    original_names=(("context_embedder", "txt_in"), ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")),
    kohya_names="original",
)


def two_space_family(name: str, context: type[Family], pooled: type[Family], shared: dict, rows: int | None = None,
                     call_kwargs: dict | None = None) -> Flux:  # fmt: skip
    """An MMDiT family: its token space (`context_embedder`, `rows` rows) and its pooled space (`text_embedder.linear_1`)."""
    return Flux(
        name=name,
        edited=re.compile(f"{CONTEXT.pattern}|{POOLED.pattern}"),
        edited_title="context_embedder / time_text_embed.text_embedder.linear_1",
        spaces=(
            context(name=f"{name}:context", edited=CONTEXT, max_length=rows, **shared),
            pooled(name=f"{name}:pooled", edited=POOLED, whole_rows=True, **shared),
        ),
        call_kwargs=call_kwargs or {},
        **shared,
    )


FLUX = two_space_family("flux", FluxContext, FluxPooled, _SHARED, rows=512)
# what schnell is run with: 256 rows (the pipeline's own default is dev's 512), 4 steps, no guidance
SCHNELL = {**_SHARED, "steps": 4, "guidance": 0.0}
FLUX_SCHNELL = two_space_family(
    "flux-schnell", FluxContext, FluxPooled, SCHNELL, rows=256, call_kwargs={"max_sequence_length": 256}
)
