"""Sana: a Gemma-2 text encoder whose rows (the pipeline's instruction prefix, then `select_index`), through the
transformer's `caption_projection` and `caption_norm`, every `attn2.to_k` / `attn2.to_v` reads; padding masked."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .pixart import CaptionProjection, PixArt, submodule_state

# SanaPipeline.__call__'s default `complex_human_instruction` (diffusers 0.42.1), which rece generate keeps
INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",  # noqa: E501
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
)


class RMSNorm(torch.nn.Module):
    """Sana's `caption_norm` (diffusers' RMSNorm, eps 1e-5, with weight): x / rms(x) · w, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype) * self.weight


class Sana(PixArt):
    def prompt_options(self) -> dict:
        return {"clean_caption": False, "max_sequence_length": self.max_length, "complex_human_instruction": list(INSTRUCTION)}

    def _inputs(self, tokenizer, texts: Sequence[str]):
        """Token ids and mask of instruction + text, as `_get_gemma_prompt_embeds` builds them (right padding)."""
        instruction = "\n".join(INSTRUCTION)
        length = len(tokenizer.encode(instruction)) + self.max_length - 2
        tokenizer.padding_side = "right"
        return tokenizer([instruction + t for t in texts], padding="max_length", max_length=length, truncation=True,
                         add_special_tokens=True, return_tensors="pt")  # fmt: skip

    def encoder_inputs(self, tokenizers: Sequence, texts: Sequence[str]):
        return self._inputs(tokenizers[0], texts)

    def _selected(self) -> list[int]:
        """The pipeline's `select_index`: the first row (BOS) and the last max_length − 1 rows."""
        return [0] + list(range(-self.max_length + 1, 0))

    def attention_counts(self, tokenizers, texts: Sequence[str]) -> list[int]:
        return self._inputs(tokenizers[0], texts).attention_mask[:, self._selected()].sum(dim=1).tolist()

    def attended_ids(self, tokenizers, texts: Sequence[str]) -> list[list[int]]:
        inputs, rows = self._inputs(tokenizers[0], texts), self._selected()
        return [ids[mask.bool()].tolist() for ids, mask in zip(inputs.input_ids[:, rows], inputs.attention_mask[:, rows])]

    def denoiser_options(self, pipe, noisy: torch.Tensor) -> dict:
        """Sana's transformer takes no micro-conditions."""
        return {}

    def text_projection(self, denoiser_config: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        inner = denoiser_config["num_attention_heads"] * denoiser_config["attention_head_dim"]
        projection, norm = CaptionProjection(denoiser_config["caption_channels"], inner), RMSNorm(inner)
        projection.load_state_dict(submodule_state(tensors, "caption_projection"))
        norm.load_state_dict(submodule_state(tensors, "caption_norm"))
        return torch.nn.Sequential(projection, norm).eval()

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        inputs = self._inputs(tokenizers[0], texts)
        rows = encoders[0](inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device))[0]
        return rows[:, self._selected()]


SANA = Sana(
    name="sana",
    title="Sana",
    pipelines=("SanaPipeline",),
    text_parts=(("tokenizer", "text_encoder"),),
    text_encoder_classes=("Gemma2Model",),
    tokenizer_class="GemmaTokenizer",
    denoiser="transformer",
    by_components=False,
    steps=20,
    guidance=4.5,
    max_length=300,
    masks_padding=True,
    end_rows=0,
    text_modules=("caption_projection", "caption_norm"),
    call_kwargs={"clean_caption": False, "use_resolution_binning": False},
)
