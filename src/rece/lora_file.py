"""What a LoRA file holds, read from its header alone: rece's own (diffusers, kohya or diff keys, with the record
`rece lora` writes: format, rank, tolerance and the edit it was made from) or another tool's."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .edit_file import METADATA_KEY
from .edit_summary import summarize
from .errors import ReceError

# the tensor name endings of each LoRA layout, and the factor whose first dimension is the rank
SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha", ".diff")
RANK_FACTORS = (".lora_A.weight", ".lora_down.weight")
READERS = {
    "diffusers": "PEFT keys for pipe.load_lora_weights",
    "kohya": "kohya keys for ComfyUI, Automatic1111, Forge",
    "diff": "kohya-named exact differences for ComfyUI, Automatic1111",
}


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, list[int]]] | None:
    """(metadata, {tensor name: shape}) of a safetensors file, without reading its tensors; None when unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # the header only: `rece info` imports no torch
            return f.metadata() or {}, {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return None


def lora_record(metadata: dict) -> dict | None:
    """The record `rece lora` wrote into a file's metadata, or None (an edit file, or not rece's)."""
    try:
        record = json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        return None
    return record if isinstance(record, dict) and "lora_format" in record else None


def lora_modules(shapes: dict[str, list[int]]) -> list[str]:
    """The module names of a LoRA's tensors (each name without its LoRA ending), in file order; [] for no LoRA keys."""
    modules: dict[str, None] = {}
    for name in shapes:
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            return []
        modules[name[: -len(suffix)]] = None
    return list(modules)


def factor_rank(shapes: dict[str, list[int]]) -> int | None:
    """The largest rank of a LoRA's factors (None for exact differences)."""
    ranks = [shape[0] for name, shape in shapes.items() if name.endswith(RANK_FACTORS)]
    return max(ranks) if ranks else None


def lora_info(path: str | os.PathLike) -> dict | None:
    """What a rece LoRA holds (format, rank, tolerance, modules, the edit's metadata); None for a file that is not a
    LoRA (or not readable: the edit reader says why); a one-line ReceError for a LoRA that rece did not write."""
    header = read_header(path)
    if header is None:
        return None
    metadata, shapes = header
    record, modules = lora_record(metadata), lora_modules(shapes)
    if record is None:
        if modules:
            rank = factor_rank(shapes)
            size = f"rank {rank}" if rank is not None else "full differences"
            raise ReceError(
                f"'{path}' is a LoRA that rece did not write ({len(modules)} modules, {size}, no rece record): `rece info` "
                "describes rece's edits and LoRAs; load it with pipe.load_lora_weights or a web UI"
            )
        return None
    # the rank `rece lora` chose (a layer narrower than it holds fewer factors); none for exact differences
    factors = factor_rank(shapes)
    rank = None if factors is None else record.get("lora_rank") or factors
    return {**record, "modules": modules, "rank": rank, "bytes": Path(path).stat().st_size}


def describe_lora(info: dict) -> str:
    """A rece LoRA in aligned lines: format, rank, layers and tolerance, then the edit it holds (`rece info`'s lines)."""
    fmt, edit = info["lora_format"], info.get("edit") or {}
    rank = "exact full differences" if info["rank"] is None else f"rank {info['rank']}"
    modules = info["modules"]
    lines = [
        f"rece LoRA     {fmt} ({READERS.get(fmt, 'unknown format')}), {rank}, {info['bytes'] / 2**20:.2f} MiB",
        f"layers        {len(modules)}: {modules[0] if modules else '-'}",
    ]
    if len(modules) > 1:
        lines.append(f"              … {modules[-1]}")
    if info["rank"] is not None and info.get("tolerance") is not None:
        lines.append(f"made for      relative error ≤ {info['tolerance']:g} per layer (`rece lora --tolerance`)")
    try:
        lines.append(summarize(edit, None))
    except (KeyError, TypeError, ValueError, AttributeError):  # a record from another rece version: what it names
        lines.append(f"edit          {edit.get('method', '?')}: {', '.join(edit.get('concepts') or []) or '?'}")
    return "\n".join(lines)
