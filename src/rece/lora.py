"""LoRA export: low-rank factors of an edit's weight changes that `pipe.load_lora_weights` loads (diffusers/PEFT keys)."""

from __future__ import annotations

import json
import os

import torch

from .edit_file import METADATA_KEY
from .io import atomic_file


def lora_rank(svds: dict[str, tuple], kv: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], tolerance: float) -> int:
    """The smallest rank at which every layer satisfies ‖W_lora − W_edit‖_F ≤ tolerance·‖W_edit‖_F (from the SVDs)."""
    rank = 1
    for n, (_, s, _) in svds.items():
        budget = (tolerance * (kv[n].to(torch.float64) + deltas[n]).norm()) ** 2
        tail = torch.cumsum(s.flip(0) ** 2, 0).flip(0)  # tail[k] = Σ_{i≥k} s_i²
        rank = max(rank, int((tail > budget).sum().item()))
    return rank


def lora_state(
    deltas: dict[str, torch.Tensor], kv: dict[str, torch.Tensor], prefix: str, tolerance: float, max_rank: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """LoRA A/B factors of float64 weight changes `deltas` of original weights `kv`, one rank for all layers (capped by
    `max_rank`), in each original weight's floating dtype; keys `{prefix}.{layer}.lora_A.weight` / `lora_B`."""
    svds = {n: torch.linalg.svd(d, full_matrices=False) for n, d in deltas.items()}
    rank = lora_rank(svds, kv, deltas, tolerance)
    if max_rank is not None:
        rank = min(rank, max_rank)
    state = {}
    for n, (u, s, vh) in svds.items():
        dtype = kv[n].dtype if kv[n].dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        state[f"{prefix}.{n}.lora_A.weight"] = vh[:rank].to(dtype).contiguous()
        state[f"{prefix}.{n}.lora_B.weight"] = (u[:, :rank] * s[:rank]).to(dtype).contiguous()
    return state, rank


def save_lora(path: str | os.PathLike, state: dict[str, torch.Tensor], rank: int, tolerance: float, edit_metadata: dict) -> None:
    """Write a LoRA file atomically, with the edit's metadata, the rank and the tolerance it was made for."""
    from safetensors.torch import save_file

    meta = {"format": "pt", METADATA_KEY: json.dumps({"lora_rank": rank, "tolerance": tolerance, "edit": edit_metadata})}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
