"""SD3 / SD3.5: two spaces (`two_space`). The joint token rows (CLIP-L ‖ CLIP-G penultimate states, zero-padded to
the T5 width, then T5's rows, 256 by default) through `context_embedder`, and the two CLIPs' joined `text_embeds`
through `time_text_embed.text_embedder.linear_1`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .base import Family, tokenize
from .two_space import TwoSpace, two_space_family


def _clip_outputs(tokenizers, encoders, texts: Sequence[str], device):
    """Each CLIP's output (penultimate hidden states and text_embeds) of texts, as `_get_clip_prompt_embeds` computes."""
    outputs = []
    for tokenizer, encoder in zip(tokenizers[:2], encoders[:2]):
        ids = tokenize(tokenizer, texts).input_ids.to(device)
        outputs.append(encoder(ids, output_hidden_states=True))
    return outputs


@dataclass(frozen=True)
class SD3Context(Family):
    """The joint rows `context_embedder` reads; the last word is found in the CLIP part (BOS + words + EOS).

    Without `text_encoder_3` (as the pipeline allows) the T5 rows are zeros of the joint width, which is then
    `context_embedder`'s input width (`bind`)."""

    joint_width: int | None = None

    def bind(self, kv: dict[str, torch.Tensor]) -> Family:
        return replace(self, joint_width=next(iter(kv.values())).shape[1]) if kv else self

    def dim(self, encoders: Sequence) -> int:
        return encoders[2].config.d_model if len(encoders) > 2 else self.joint_width

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        clip = torch.cat([out.hidden_states[-2] for out in _clip_outputs(tokenizers, encoders, texts, device)], dim=-1)
        t5_rows = self.sequence_lengths[0]
        if len(encoders) > 2:
            t5 = encoders[2](tokenize(tokenizers[2], texts, t5_rows).input_ids.to(device))[0]
        else:
            t5 = clip.new_zeros(clip.shape[0], t5_rows, self.joint_width)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2)


class SD3Pooled(Family):
    """The pooled vector `text_embedder.linear_1` reads: both CLIPs' text_embeds, joined, one row per text."""

    def attention_counts(self, tokenizers, texts: Sequence[str]) -> list[int]:
        return [1] * len(texts)

    def dim(self, encoders: Sequence) -> int:
        return sum(e.config.projection_dim for e in encoders[:2])

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        outputs = _clip_outputs(tokenizers, encoders, texts, device)
        return torch.cat([out[0] for out in outputs], dim=-1)[:, None]


_SHARED = dict(
    title="SD3/SD3.5",
    pipelines=("StableDiffusion3Pipeline",),
    text_parts=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")),
    text_encoder_classes=("CLIPTextModelWithProjection", "T5EncoderModel"),
    tokenizer_class=("CLIPTokenizer", "CLIPTokenizer", "T5Tokenizer"),
    denoiser="transformer",
    by_components=False,
    steps=28,
    guidance=7.0,
    sequence_lengths=(256,),  # StableDiffusion3Pipeline.__call__'s default max_sequence_length
    # Stability's single files: the MMDiT under model.diffusion_model., the pooled projection as y_embedder.mlp.0
    checkpoint_marker="joint_blocks.",
    original_names=(("context_embedder", "context_embedder"), ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")),
    # the CLIP vocabulary reaches both spaces (its rows lead the joint rows, its text_embeds are the pooled vector) and
    # SD3 runs without T5: the tokens live in both CLIPs (one vocabulary), T5 reads their decoded text
    attack_parts=(0, 1),
    kohya_comfyui_only=True,  # lora_unet_context_embedder, lora_unet_y_embedder_mlp_0: as ComfyUI names its modules
    file_encoders=(("clip_l",), ("clip_g",), ("t5xxl",)),
    optional_encoders=(2,),  # the pipeline runs without T5 (sd3_medium.safetensors has none)
    projected_parts=(0, 1),
    tokenizer_repos=(("clip_l", "stabilityai/stable-diffusion-3.5-large"),),
)
SD3 = two_space_family(TwoSpace, "sd3", SD3Context, SD3Pooled, _SHARED)
