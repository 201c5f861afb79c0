"""FLUX.1's transformer from Black Forest Labs' names (its single files, ComfyUI's too) to diffusers', at any width:
diffusers' single-file converter assumes FLUX.1's 3072 (tests/test_comfy_generate.py checks the two agree there)."""

from __future__ import annotations

import re

import torch

TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}  # fmt: skip
DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}  # fmt: skip
SINGLE = {
    "modulation.lin": "norm.linear", "linear2": "proj_out", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
}  # fmt: skip
# joined projections, split in this order (a single block's linear1: q, k, v of the hidden width, then the MLP's rest)
JOINED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
BLOCK = re.compile(r"^(double|single)_blocks\.(\d+)\.(.+)$")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift)."""
    shift, scale = tensor.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def diffusers_state(tensors: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel's state dict from a FLUX.1 single file's tensors (under `prefix` or bare); a tensor of
    another name is kept as it is, for the model's loading to refuse."""
    hidden = next(v for k, v in tensors.items() if k.removeprefix(prefix) == "img_in.weight").shape[0]
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name, _, param = key.removeprefix(prefix).rpartition(".")
        param = "weight" if param == "scale" else param  # RMSNorm's scale is diffusers' weight
        block = BLOCK.match(name)
        if block is None:
            if name == "final_layer.adaLN_modulation.1":
                out[f"norm_out.linear.{param}"] = swap_halves(value)
            else:
                out[f"{TOP.get(name, name)}.{param}"] = value
            continue
        kind, index, rest = block.groups()
        where = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{index}."
        if rest in JOINED:
            parts = JOINED[rest]
            sizes = [hidden] * 3 + ([value.shape[0] - 3 * hidden] if len(parts) == 4 else [])
            for part, piece in zip(parts, value.split(sizes, dim=0)):
                out[f"{where}{part}.{param}"] = piece
        else:
            out[f"{where}{(DOUBLE if kind == 'double' else SINGLE).get(rest, rest)}.{param}"] = value
    return out
