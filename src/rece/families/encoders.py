"""The text encoders the families read, as their published files hold them: CLIP-L, OpenCLIP-H, CLIP-G and T5-XXL.

Each is recorded with its published configuration (width, layers, heads, activation, context, whether it carries a
projection), the names it goes by in single files and ComfyUI's `models/text_encoders`, and what a family reads of
it. A checkpoint's widths and layer counts are read from the file itself (a fine-tune or a test model may differ);
the record says what the file cannot: the attention head width, the activation, how many final layers the pipeline
leaves out (SD2 reads OpenCLIP-H's penultimate layer as its last), and the published shape for messages.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderSpec:
    """One published text encoder: `slot` is the name ComfyUI's all-in-one files give it (`text_encoders.SLOT.`)."""

    slot: str  # clip_l, clip_h, clip_g, t5xxl
    title: str  # what messages call it
    kind: str  # 'clip' (CLIPTextModel names) or 't5' (T5EncoderModel names)
    width: int  # hidden size of the published model
    layers: int  # transformer layers in the published file
    head_width: int = 64  # width of one attention head (every published CLIP and T5-XXL: 64)
    activation: str = "gelu"  # CLIP's MLP activation (transformers' name); T5: the feed-forward kind
    context: int = 77  # positions (CLIP) / the most rows a pipeline asks for (T5)
    dropped_layers: int = 0  # final layers the pipeline leaves out (diffusers builds SD2's encoder without the last)
    file_name: str = ""  # the split file ComfyUI users keep in models/text_encoders


CLIP_L = EncoderSpec("clip_l", "CLIP-L", "clip", 768, 12, activation="quick_gelu", file_name="clip_l.safetensors")
# SD2's OpenCLIP ViT-H text tower: 24 layers in the file, the 23rd's output (final norm applied) is what the UNet reads
CLIP_H = EncoderSpec("clip_h", "OpenCLIP-H", "clip", 1024, 24, dropped_layers=1, file_name="clip_h.safetensors")
CLIP_G = EncoderSpec("clip_g", "CLIP-G (OpenCLIP bigG)", "clip", 1280, 32, file_name="clip_g.safetensors")
T5XXL = EncoderSpec("t5xxl", "T5-XXL", "t5", 4096, 24, activation="gated-gelu", context=512, file_name="t5xxl_fp16.safetensors")
SPECS = (CLIP_L, CLIP_H, CLIP_G, T5XXL)


def spec_named(slot: str) -> EncoderSpec:
    """The encoder of a slot name."""
    return next(s for s in SPECS if s.slot == slot)


def clip_slot(layers: int) -> str | None:
    """Which CLIP a split file holds by its depth, as ComfyUI tells them apart (a layer 30: G; a layer 22: H); None when
    it is shallower than both (CLIP-L, or a small model: then its width decides among the family's CLIPs)."""
    if layers > 30:
        return "clip_g"
    if layers > 22:
        return "clip_h"
    return None
