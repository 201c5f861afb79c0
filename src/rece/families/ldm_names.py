"""Names of the edited UNet layers in original (CompVis LDM, Stability SGM) checkpoints and in kohya LoRAs.

diffusers' UNet2DConditionModel and the original `openaimodel.UNetModel` hold the same cross-attention layers under
other names. With n = layers_per_block, each resolution level has n + 1 input and n + 1 output blocks:

    down_blocks.{i}.attentions.{j}.REST  <->  input_blocks.{i(n+1) + j + 1}.1.REST
    mid_block.attentions.0.REST          <->  middle_block.1.REST
    up_blocks.{i}.attentions.{j}.REST    <->  output_blocks.{i(n+1) + j}.1.REST

(diffusers' `convert_ldm_unet_checkpoint` reads the right-hand side; these functions go both ways for the edited
layers only). A kohya LoRA names a module `lora_unet_` + its path with dots as underscores: kohya's scripts train
SD1/SD2 on a UNet with diffusers' names and SDXL on one with SGM's, so those are the names each family writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import ReceError

UNET_PREFIX = "model.diffusion_model."  # where the UNet sits in an SD1/SD2/SDXL single-file checkpoint
KOHYA_UNET = "lora_unet_"

_DIFFUSERS = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_LDM = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(.+)$")
_LDM_MID = re.compile(r"^middle_block\.1\.(.+)$")


def ldm_name(name: str, layers_per_block: int) -> str:
    """The original-UNet name of a diffusers cross-attention module (`down_blocks.1.attentions.0.…` → `input_blocks.4.1.…`)."""
    per_level = layers_per_block + 1
    if m := _MID.match(name):
        return f"middle_block.1.{m[1]}"
    m = _DIFFUSERS.match(name)
    if not m:
        raise ReceError(f"layer {name} is not in a UNet attention block; it has no original-checkpoint name")
    level, index = int(m[2]), int(m[3])
    if m[1] == "down_blocks":
        return f"input_blocks.{level * per_level + index + 1}.1.{m[4]}"
    return f"output_blocks.{level * per_level + index}.1.{m[4]}"


def diffusers_name(name: str, layers_per_block: int) -> str | None:
    """The diffusers name of an original-UNet attention module (the inverse of `ldm_name`; None outside attention)."""
    per_level = layers_per_block + 1
    if m := _LDM_MID.match(name):
        return f"mid_block.attentions.0.{m[1]}"
    m = _LDM.match(name)
    if not m:
        return None
    block = int(m[2])
    if m[1] == "input_blocks":
        level, index = divmod(block - 1, per_level)
        return f"down_blocks.{level}.attentions.{index}.{m[3]}"
    level, index = divmod(block, per_level)
    return f"up_blocks.{level}.attentions.{index}.{m[3]}"


def layers_per_block_of(keys: Iterable[str]) -> int:
    """layers_per_block of an original UNet from its checkpoint keys: the first downsampler is input_blocks.{n+1}
    (with one resolution level there is none, and the last input block is n)."""
    downsamplers, inputs = [], []
    for key in keys:
        if m := re.match(rf"^{re.escape(UNET_PREFIX)}input_blocks\.(\d+)\.", key):
            inputs.append(int(m[1]))
            if ".0.op." in key:
                downsamplers.append(int(m[1]))
    if not inputs:
        raise ReceError("the checkpoint has no UNet input blocks (model.diffusion_model.input_blocks.*); it is not SD1/SD2/SDXL")
    return min(downsamplers) - 1 if downsamplers else max(inputs)


def kohya_name(module: str) -> str:
    """A module path as kohya names its LoRA (`lora_unet_` + the path, dots as underscores)."""
    return KOHYA_UNET + module.replace(".", "_")
