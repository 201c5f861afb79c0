"""LoRA export: an edit's weight changes as low-rank factors (diffusers/PEFT or kohya keys) or full differences.

- "diffusers": `{denoiser}.{module}.lora_A.weight` / `lora_B`, what `pipe.load_lora_weights` and peft read.
- "kohya": `lora_unet_{module}.lora_down.weight` / `lora_up` / `alpha` (alpha = rank: scale 1), what Automatic1111,
  Forge, ComfyUI and kohya's scripts read (and diffusers converts); SD1/SD2/SDXL, and FLUX.1 / SD3 under the names of
  their published single files, which is how ComfyUI addresses their modules (diffusers 0.42.1 drops FLUX's
  `lora_unet_txt_in` / `lora_unet_vector_in_in_layer` when it converts a kohya file: use "diffusers" there).
- "diff": `lora_unet_{module}.diff`, the exact float32 change, which ComfyUI and Automatic1111 add as it is.
"""

from __future__ import annotations

import json
import os

import torch

from .edit_file import METADATA_KEY
from .errors import ReceError
from .io import atomic_file
from .ldm_names import kohya_name, ldm_name

LORA_FORMATS = ("diffusers", "kohya", "diff")


def lora_rank(svds: dict[str, tuple], kv: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], tolerance: float) -> int:
    """The smallest rank at which every layer satisfies ‖W_lora − W_edit‖_F ≤ tolerance·‖W_edit‖_F (from the SVDs)."""
    rank = 1
    for n, (_, s, _) in svds.items():
        budget = (tolerance * (kv[n].to(torch.float64) + deltas[n]).norm()) ** 2
        tail = torch.cumsum(s.flip(0) ** 2, 0).flip(0)  # tail[k] = Σ_{i≥k} s_i²
        rank = max(rank, int((tail > budget).sum().item()))
    return rank


def lora_factors(
    deltas: dict[str, torch.Tensor], kv: dict[str, torch.Tensor], tolerance: float, max_rank: int | None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Low-rank factors (A [rank, in], B [out, rank]) with B·A ≈ each float64 change in `deltas` of original weights
    `kv`: one rank for all layers (capped by `max_rank`), in each original weight's floating dtype."""
    svds = {n: torch.linalg.svd(d, full_matrices=False) for n, d in deltas.items()}
    rank = lora_rank(svds, kv, deltas, tolerance)
    if max_rank is not None:
        rank = min(rank, max_rank)
    factors = {}
    for n, (u, s, vh) in svds.items():
        dtype = kv[n].dtype if kv[n].dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        factors[n] = vh[:rank].to(dtype).contiguous(), (u[:, :rank] * s[:rank]).to(dtype).contiguous()
    return factors, rank


def lora_state(
    deltas: dict[str, torch.Tensor], kv: dict[str, torch.Tensor], prefix: str, tolerance: float, max_rank: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """diffusers/PEFT LoRA weights of the changes `deltas`: keys `{prefix}.{layer}.lora_A.weight` / `lora_B`."""
    factors, rank = lora_factors(deltas, kv, tolerance, max_rank)
    state = {}
    for n, (a, b) in factors.items():
        state[f"{prefix}.{n}.lora_A.weight"], state[f"{prefix}.{n}.lora_B.weight"] = a, b
    return state, rank


def kohya_modules(family, layers: list[str], layers_per_block: int | None) -> dict[str, str]:
    """The kohya name of each edited layer (`lora_unet_…`), in the naming the family's kohya LoRAs use."""
    if family.kohya_names is None:
        raise ReceError(
            f"kohya LoRA names exist here for SD1/SD2/SDXL, FLUX.1 and SD3 only, not {family.name}; use --format diffusers "
            f"({family.lora_hint})"
        )
    if family.kohya_names == "diffusers":
        return {n: kohya_name(n) for n in layers}
    if family.kohya_names == "original":
        return {n: kohya_name(dict(family.original_names)[n]) for n in layers}
    if layers_per_block is None:
        raise ReceError("this UNet's blocks have different numbers of layers; kohya's SGM names cannot address them")
    return {n: kohya_name(ldm_name(n, layers_per_block)) for n in layers}


def unet_layers_per_block(base) -> int | None:
    """layers_per_block of a base model's UNet (None when its blocks differ), from the pipeline or the folder's config."""
    if base.pipeline is not None:
        config = dict(getattr(base.pipeline, base.family.denoiser).config)
    else:
        config = json.loads((base.folder / base.family.denoiser / "config.json").read_text())
    value = config.get("layers_per_block", 2)
    if isinstance(value, (list, tuple)):
        return value[0] if len(set(value)) == 1 else None
    return value


def kohya_state(
    deltas: dict[str, torch.Tensor],
    kv: dict[str, torch.Tensor],
    modules: dict[str, str],
    fmt: str,
    tolerance: float,
    max_rank: int | None,
) -> tuple[dict[str, torch.Tensor], int]:
    """kohya-named weights of the changes: lora_down / lora_up / alpha (= rank, so the scale is 1), or `.diff`."""
    if fmt == "diff":
        return {f"{modules[n]}.diff": d.to(torch.float32).contiguous() for n, d in deltas.items()}, 0
    factors, rank = lora_factors(deltas, kv, tolerance, max_rank)
    state = {}
    for n, (a, b) in factors.items():
        # readers scale each module by alpha / its own rank, and diffusers keeps one alpha for all: alpha = the rank,
        # and a layer narrower than that (rank min(out, in)) has its up factor scaled to cancel the difference
        own = a.shape[0]
        state[f"{modules[n]}.lora_down.weight"] = a
        state[f"{modules[n]}.lora_up.weight"] = b if own == rank else (b.double() * own / rank).to(b.dtype).contiguous()
        state[f"{modules[n]}.alpha"] = torch.tensor(float(rank), dtype=a.dtype)
    return state, rank


def save_lora(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    rank: int,
    tolerance: float,
    edit_metadata: dict,
    fmt: str = "diffusers",
) -> None:
    """Write a LoRA file atomically, with the edit's metadata, its format, the rank and the tolerance it was made for."""
    from safetensors.torch import save_file

    record = {"lora_format": fmt, "lora_rank": rank, "tolerance": tolerance, "edit": edit_metadata}
    meta = {"format": "pt", METADATA_KEY: json.dumps(record)}
    if fmt == "kohya":  # what kohya's scripts and the web UIs show of a LoRA
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
