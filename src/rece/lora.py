"""LoRA export: an edit's weight changes as low-rank factors (diffusers/PEFT or kohya keys) or full differences.

- "diffusers": `{denoiser}.{module}.lora_A.weight` / `lora_B`, what `pipe.load_lora_weights` and peft read.
- "kohya": `lora_unet_{module}.lora_down.weight` / `lora_up` / `alpha` (alpha = rank: scale 1), what Automatic1111,
  Forge, ComfyUI and kohya's scripts read (and diffusers converts); SD1/SD2/SDXL, and FLUX.1 / SD3 under the names of
  their published single files, which is how ComfyUI addresses their modules (diffusers 0.42.1 drops FLUX's
  `lora_unet_txt_in` / `lora_unet_vector_in_in_layer` when it converts a kohya file: use "diffusers" there).
- "diff": `lora_unet_{module}.diff`, the exact float32 change, which ComfyUI and Automatic1111 add as it is.

One rank serves every layer; a layer that needs its full width (min(out, in)) to meet the tolerance is written
exactly instead: its full-rank factors in "diffusers" (diffusers gives each module its own rank), its `.diff` in
"kohya" (which diffusers' kohya converter does not read: ComfyUI and Automatic1111 do).
"""

from __future__ import annotations

import json
import os

import torch

from .edit_file import METADATA_KEY
from .errors import ReceError
from .families import titles_where
from .io import atomic_file

LORA_FORMATS = ("diffusers", "kohya", "diff")
# the share of the tolerance the float64 truncation may use: the rest covers the factors' rounding to a float32 dtype
ROUNDING_SHARE = 0.99


def needed_rank(s: torch.Tensor, w_edit: torch.Tensor, tolerance: float) -> int:
    """The smallest rank at which a change with singular values `s` meets ‖W_lora − W_edit‖_F ≤ tolerance·‖W_edit‖_F."""
    budget = (tolerance * w_edit.norm()) ** 2
    tail = torch.cumsum(s.flip(0) ** 2, 0).flip(0)  # tail[k] = Σ_{i≥k} s_i²
    return int((tail > budget).sum().item())


def lora_factors(
    deltas: dict[str, torch.Tensor], kv: dict[str, torch.Tensor], tolerance: float, max_rank: int | None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, list[str]]:
    """Factors (A [r, in], B [out, r]) with B·A ≈ each float64 change in `deltas` of original weights `kv`, in each
    weight's floating dtype, the rank, and the layers written exactly.

    One rank for every layer that meets `tolerance` below its width (min(out, in)), capped by `max_rank`; a layer whose
    rank reaches its width, or that is no wider than that rank, gets its full-rank factors instead (exact: a low-rank
    form saves nothing there)."""
    svds = {n: torch.linalg.svd(d, full_matrices=False) for n, d in deltas.items()}
    budget = ROUNDING_SHARE * tolerance
    needed = {n: needed_rank(s, kv[n].to(torch.float64) + deltas[n], budget) for n, (_, s, _) in svds.items()}
    if max_rank is not None:
        needed = {n: min(k, max_rank) for n, k in needed.items()}
    width = {n: min(d.shape) for n, d in deltas.items()}
    rank = max([max(k, 1) for n, k in needed.items() if k < width[n]], default=0)
    exact = [n for n in deltas if needed[n] >= width[n] or width[n] <= rank]
    factors = {}
    for n, (u, s, vh) in svds.items():
        r = width[n] if n in exact else rank
        dtype = kv[n].dtype if kv[n].dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        factors[n] = vh[:r].to(dtype).contiguous(), (u[:, :r] * s[:r]).to(dtype).contiguous()
    return factors, rank, exact


def lora_state(
    deltas: dict[str, torch.Tensor], kv: dict[str, torch.Tensor], prefix: str, tolerance: float, max_rank: int | None
) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """diffusers/PEFT LoRA weights of the changes `deltas`: keys `{prefix}.{layer}.lora_A.weight` / `lora_B` (the
    layers written exactly at their full rank: diffusers gives each its own rank, at scale 1)."""
    factors, rank, exact = lora_factors(deltas, kv, tolerance, max_rank)
    state = {}
    for n, (a, b) in factors.items():
        state[f"{prefix}.{n}.lora_A.weight"], state[f"{prefix}.{n}.lora_B.weight"] = a, b
    return state, rank, exact


def kohya_modules(family, layers: list[str], denoiser_config: dict) -> dict[str, str]:
    """The kohya name of each edited layer (`lora_unet_…`), as the family's kohya LoRAs name it."""
    if not family.has_kohya_names():
        raise ReceError(
            f"kohya LoRA names exist for {titles_where('has_kohya_names')} only, not {family.title}; use --format diffusers "
            f"({family.lora_hint})"
        )
    return family.kohya_modules(layers, denoiser_config)


def denoiser_config(base) -> dict:
    """The config of a base model's denoiser, from the pipeline, the folder or what its single file says."""
    if base.denoiser_config is not None:
        return dict(base.denoiser_config)
    if base.pipeline is not None:
        return dict(getattr(base.pipeline, base.family.denoiser).config)
    path = base.folder / base.family.denoiser / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def kohya_state(
    deltas: dict[str, torch.Tensor],
    kv: dict[str, torch.Tensor],
    modules: dict[str, str],
    fmt: str,
    tolerance: float,
    max_rank: int | None,
) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """kohya-named weights of the changes: lora_down / lora_up / alpha (= rank, so the scale is 1), with `.diff` (the
    exact float32 change) for the layers written exactly; every layer as `.diff` for fmt "diff"."""
    if fmt == "diff":
        return {f"{modules[n]}.diff": d.to(torch.float32).contiguous() for n, d in deltas.items()}, 0, list(deltas)
    factors, rank, exact = lora_factors(deltas, kv, tolerance, max_rank)
    state = {}
    for n, (a, b) in factors.items():
        if n in exact:
            state[f"{modules[n]}.diff"] = deltas[n].to(torch.float32).contiguous()
            continue
        state[f"{modules[n]}.lora_down.weight"], state[f"{modules[n]}.lora_up.weight"] = a, b
        state[f"{modules[n]}.alpha"] = torch.tensor(float(rank), dtype=a.dtype)
    return state, rank, exact


def save_lora(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    rank: int,
    tolerance: float,
    edit_metadata: dict,
    fmt: str = "diffusers",
    exact: list[str] | None = None,
) -> None:
    """Write a LoRA file atomically, with the edit's metadata, its format, the rank, the tolerance it was made for and
    the layers it holds exactly."""
    from safetensors.torch import save_file

    record = {"lora_format": fmt, "lora_rank": rank, "tolerance": tolerance, "exact_layers": exact or [], "edit": edit_metadata}
    meta = {"format": "pt", METADATA_KEY: json.dumps(record)}
    if fmt == "kohya" and rank:  # what kohya's scripts and the web UIs show of a LoRA
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_lora_record(path: str | os.PathLike) -> dict:
    """The record rece wrote into a LoRA file's metadata (format, rank, tolerance, exact layers, the edit's metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
