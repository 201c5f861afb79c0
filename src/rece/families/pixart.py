"""PixArt-α / Σ: a T5 text encoder whose rows, through the transformer's `caption_projection`, every cross-attention
`attn2.to_k` / `attn2.to_v` reads; the padding rows are masked (the transformer's `encoder_attention_mask`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Family, tokenize


class CaptionProjection(torch.nn.Module):
    """PixArt's `caption_projection` (diffusers' PixArtAlphaTextProjection): linear, tanh-GELU, linear, row by row."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_features, hidden_size)
        self.act_1 = torch.nn.GELU(approximate="tanh")
        self.linear_2 = torch.nn.Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class PixArt(Family):
    def matches_index(self, index: dict) -> bool:
        return index.get("_class_name") in self.pipelines  # its components (transformer, T5) are not specific enough

    def matches_pipeline(self, pipe) -> bool:
        return type(pipe).__name__ in self.pipelines

    def preprocess(self, text: str) -> str:
        return text.lower().strip()  # the pipeline's _text_preprocessing with clean_caption=False

    def text_projection(self, denoiser_config: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The transformer's caption projection, built from its config and its `caption_projection.*` tensors."""
        inner = denoiser_config["num_attention_heads"] * denoiser_config["attention_head_dim"]
        module = CaptionProjection(denoiser_config["caption_channels"], inner)
        module.load_state_dict({k.removeprefix("caption_projection."): v.float() for k, v in tensors.items()})
        return module.eval()

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        inputs = tokenize(tokenizers[0], texts, self.max_length)
        mask = inputs.attention_mask.to(device)
        return encoders[0](inputs.input_ids.to(device), attention_mask=mask)[0]


_PIXART = dict(
    text_parts=(("tokenizer", "text_encoder"),),
    text_encoder_classes=("T5EncoderModel",),
    tokenizer_class="T5Tokenizer",
    denoiser="transformer",
    steps=20,
    guidance=4.5,
    masks_padding=True,
    text_modules=("caption_projection",),
    call_kwargs={"clean_caption": False, "use_resolution_binning": False},
)
PIXART_SIGMA = PixArt(name="pixart-sigma", pipelines=("PixArtSigmaPipeline",), max_length=300, **_PIXART)
PIXART_ALPHA = PixArt(name="pixart-alpha", pipelines=("PixArtAlphaPipeline",), max_length=120, **_PIXART)
