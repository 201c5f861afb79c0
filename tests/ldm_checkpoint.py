"""Write a diffusers SD1.x pipeline folder as an original-format (CompVis/LDM) single-file checkpoint, and an SDXL one
in Stability's SGM layout (`save_sgm_checkpoint`).

This is the inverse of diffusers' single-file conversion (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` in `diffusers.loaders.single_file_utils`),
written for the SD1.x family: any number of UNet/VAE levels and any `layers_per_block`, a conv
(non-linear) transformer projection, and a CLIP text encoder. Tests use it to make `.safetensors`
checkpoints without a download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

UNET_FIXED = {
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight",
    "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight",
    "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight",
    "conv_out.bias": "out.2.bias",
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",  # SDXL only
    "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_FIXED = {
    "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
    "encoder.conv_norm_out.bias": "encoder.norm_out.bias",
    "decoder.conv_norm_out.weight": "decoder.norm_out.weight",
    "decoder.conv_norm_out.bias": "decoder.norm_out.bias",
}
VAE_PASSTHROUGH = (
    "encoder.conv_in.",
    "encoder.conv_out.",
    "decoder.conv_in.",
    "decoder.conv_out.",
    "quant_conv.",
    "post_quant_conv.",
)
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    """LDM name of a ResnetBlock2D parameter (`norm1.weight` -> `in_layers.0.weight`)."""
    layer, param = rest.rsplit(".", 1)
    return f"{UNET_RESNET[layer]}.{param}"


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to LDM `openaimodel.UNetModel` keys (no prefix)."""
    per_level = layers_per_block + 1  # LDM input/output blocks per resolution level
    up_with_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in UNET_FIXED:
            new = UNET_FIXED[key]
        elif parts[0] in ("down_blocks", "up_blocks"):
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if parts[0] == "down_blocks":
                block = 1 + level * per_level + index
                if kind == "resnets":
                    new = f"input_blocks.{block}.0.{_resnet(rest)}"
                elif kind == "attentions":
                    new = f"input_blocks.{block}.1.{rest}"
                elif kind == "downsamplers":  # rest is conv.weight / conv.bias
                    new = f"input_blocks.{1 + level * per_level + layers_per_block}.0.op.{parts[-1]}"
                else:
                    raise ValueError(f"unexpected UNet key {key}")
            else:
                block = level * per_level + index
                if kind == "resnets":
                    new = f"output_blocks.{block}.0.{_resnet(rest)}"
                elif kind == "attentions":
                    new = f"output_blocks.{block}.1.{rest}"
                elif kind == "upsamplers":
                    slot = 2 if level in up_with_attention else 1
                    new = f"output_blocks.{level * per_level + layers_per_block}.{slot}.conv.{parts[-1]}"
                else:
                    raise ValueError(f"unexpected UNet key {key}")
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * index}.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"middle_block.{2 * index + 1}.{rest}"
            else:
                raise ValueError(f"unexpected UNet key {key}")
        else:
            raise ValueError(f"unexpected UNet key {key} (class/addition embeddings are not SD1.x)")
        out[new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to LDM `AutoencoderKL` keys (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in VAE_FIXED:
            new = VAE_FIXED[key]
        elif key.startswith(VAE_PASSTHROUGH):
            new = key
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            layer, param = ".".join(parts[4:-1]), parts[-1]
            new = f"{parts[0]}.mid.attn_1.{VAE_ATTENTION[layer]}.{param}"
            if param == "weight" and value.ndim == 2:  # LDM's AttnBlock uses 1x1 convolutions
                value = value[:, :, None, None]
        elif parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2])
            stage = f"encoder.down.{level}" if parts[1] == "down_blocks" else f"decoder.up.{num_levels - 1 - level}"
            if parts[3] == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{stage}.block.{parts[4]}.{rest}"
            elif parts[3] in ("downsamplers", "upsamplers"):
                new = f"{stage}.{'downsample' if parts[3] == 'downsamplers' else 'upsample'}.conv.{parts[-1]}"
            else:
                raise ValueError(f"unexpected VAE key {key}")
        else:
            raise ValueError(f"unexpected VAE key {key}")
        out[new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a transformers CLIPTextModel under LDM's `FrozenCLIPEmbedder.transformer` (flattened or not)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def _load_component(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Load a component's single safetensors file."""
    from safetensors.torch import load_file

    for name in names:
        if (folder / name).is_file():
            return load_file(folder / name)
    raise FileNotFoundError(f"no {' or '.join(names)} in {folder}")


def ldm_state_dict(pipeline_folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full LDM-format state dict (UNet, VAE, CLIP text encoder) of a diffusers SD1.x pipeline folder."""
    folder = Path(pipeline_folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    if unet_config.get("use_linear_projection") or unet_config.get("addition_embed_type") or unet_config.get("class_embed_type"):
        raise ValueError(f"{folder} is not an SD1.x-style pipeline")
    unet = _load_component(folder / "unet", ("diffusion_pytorch_model.safetensors",))
    vae = _load_component(folder / "vae", ("diffusion_pytorch_model.safetensors",))
    clip = _load_component(folder / "text_encoder", ("model.safetensors",))
    state: dict[str, torch.Tensor] = {}
    state.update({UNET_PREFIX + k: v for k, v in unet_to_ldm(unet, unet_config["layers_per_block"]).items()})
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae, len(vae_config["down_block_types"])).items()})
    state.update({CLIP_PREFIX + k: v for k, v in clip_to_ldm(clip).items()})
    return state


SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SGM_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_FIXED = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict as OpenCLIP's text tower (SGM's `embedders.1.model`):
    q/k/v joined into in_proj, the projection transposed (the inverse of diffusers' `convert_open_clip_checkpoint`)."""
    state = clip_to_ldm({k: v for k, v in state.items() if k != "text_projection.weight"}) | {
        "text_projection.weight": state["text_projection.weight"]
    }
    out: dict[str, torch.Tensor] = {"text_projection": state["text_projection.weight"].T.contiguous()}
    joined: dict[str, list] = {}
    for key, value in state.items():
        if key in OPEN_CLIP_FIXED:
            out[OPEN_CLIP_FIXED[key]] = value
        elif key.startswith("text_model.encoder.layers."):
            layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, param = rest.split(".")
                slot = f"transformer.resblocks.{layer}.attn.in_proj_{param}"
                joined.setdefault(slot, [None] * 3)[("q_proj", "k_proj", "v_proj").index(proj)] = value
                continue
            rest = rest.replace("self_attn.", "attn.")
            for new, old in OPEN_CLIP_LAYER.items():
                rest = rest.replace(new, old)
            out[f"transformer.resblocks.{layer}.{rest}"] = value
    out.update({k: torch.cat(parts) for k, parts in joined.items()})
    return out


def sgm_state_dict(pipeline_folder: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The SGM-format state dict (UNet with label_emb, VAE, CLIP-L under embedders.0, OpenCLIP under embedders.1) of a
    diffusers SDXL pipeline folder; floating tensors cast to `dtype` when given."""
    folder = Path(pipeline_folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    unet = _load_component(folder / "unet", ("diffusion_pytorch_model.safetensors",))
    vae = _load_component(folder / "vae", ("diffusion_pytorch_model.safetensors",))
    clip = _load_component(folder / "text_encoder", ("model.safetensors",))
    open_clip = _load_component(folder / "text_encoder_2", ("model.safetensors",))
    state: dict[str, torch.Tensor] = {}
    state.update({UNET_PREFIX + k: v for k, v in unet_to_ldm(unet, unet_config["layers_per_block"]).items()})
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae, len(vae_config["down_block_types"])).items()})
    state.update({SGM_CLIP_PREFIX + k: v for k, v in clip_to_ldm(clip).items()})
    state.update({SGM_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_from_transformers(open_clip).items()})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def save_sgm_checkpoint(
    pipeline_folder: str | os.PathLike, out_file: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write a diffusers SDXL pipeline folder as one SGM-format `.safetensors` checkpoint (in `dtype` when given)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in sorted(sgm_state_dict(pipeline_folder, dtype).items())}
    save_file(state, str(out_file), metadata={"format": "pt", "modelspec.title": "tiny sdxl"})
    return Path(out_file)


def save_ldm_checkpoint(pipeline_folder: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write a diffusers SD1.x pipeline folder as one original-format (LDM) `.safetensors` checkpoint."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in sorted(ldm_state_dict(pipeline_folder).items())}
    save_file(state, str(out_file), metadata={"format": "pt"})
    return Path(out_file)
