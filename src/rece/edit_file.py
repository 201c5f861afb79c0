"""The edit file format: safetensors tensors plus JSON metadata under the `rece` key (docs/edit-format.md).

transform.delta          P − I of the d×d transform shared by every edited layer (kind "transform"), or
layers.NAME.delta        ΔW of each edited layer (kind "layers")
derived.EPOCH            the c′ rows RECE derived in each epoch
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ReceError
from .io import atomic_file

if TYPE_CHECKING:  # torch is imported where tensors are made: `rece info` reads and checks an edit without it
    import torch

FORMAT = "rece-edit"
FORMAT_VERSION = 1
METADATA_KEY = "rece"
MAX_CHANGE = 1e6  # an edit's tensors change weights far less; a larger value is a damaged or forged file


def edit_tensors(transform: torch.Tensor | None, deltas: dict | None, derived: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors an edit file holds (float32; the transform stored as its difference from the identity)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    if transform is not None:
        eye = torch.eye(transform.shape[0], dtype=torch.float64)
        out["transform.delta"] = (transform.to(torch.float64) - eye).to(torch.float32).contiguous()
    else:
        out.update({f"layers.{n}.delta": d.to(torch.float32).contiguous() for n, d in deltas.items()})
    for epoch, rows in enumerate(derived):
        out[f"derived.{epoch}"] = rows.to(torch.float32).contiguous()
    return out


def write_edit_file(path: str | os.PathLike, metadata: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an edit file atomically."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata), "format": "pt"})
    return Path(path)


def read_edit_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an edit file ({} when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def read_edit_arrays(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors as numpy arrays) of an edit file, checked as a complete rece edit; no torch (`rece info`)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise ReceError(
            f"edit '{path}' is a folder, not an edit file; pass the .safetensors file `rece erase` wrote "
            "(rece apply takes MODEL first, then the edit files)"
        )
    if not path.is_file():
        raise ReceError(f"edit file '{path}' does not exist; create one with `rece erase MODEL --concept ... -o {path}`")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()} if METADATA_KEY in header else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ReceError(
            f"edit file '{path}' is corrupt or not a safetensors file ({str(exc).splitlines()[0]}); re-create it with rece erase"
        ) from None
    except TypeError as exc:  # a dtype numpy lacks (bfloat16), which an edit never holds
        raise ReceError(
            f"'{path}' is not a complete rece edit ({exc}; edits hold float32); re-create it with rece erase"
        ) from None
    if METADATA_KEY not in header:
        raise ReceError(f"'{path}' is not a rece edit (no rece metadata); if it is a LoRA, load it with pipe.load_lora_weights")
    try:
        meta = json.loads(header[METADATA_KEY])
        if isinstance(meta, dict) and "lora_format" in meta:
            raise ReceError(
                f"'{path}' is a rece LoRA ({meta['lora_format']}), not an edit file: pass the edit it was exported from, "
                f"or load the LoRA with pipe.load_lora_weights or a web UI (`rece info {path}` describes it)"
            )
        check_metadata(meta)
        check_shapes(meta, arrays)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReceError(f"'{path}' is not a complete rece edit (bad or missing {exc}); re-create it with rece erase") from None
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise ReceError(f"edit file '{path}' has NaN/Inf in {name}; it is corrupt, re-create it with rece erase")
        if name.startswith(("transform.", "layers.")) and a.size and np.abs(a).max() > MAX_CHANGE:
            raise ReceError(
                f"edit file '{path}' changes weights by up to {np.abs(a).max():.3g} in {name}; no erasure does that, "
                "it is damaged or not rece's: re-create it with rece erase"
            )
    return meta, arrays


def edit_contents(meta: dict, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray | None, dict | None, list[np.ndarray]]:
    """(transform, deltas, derived) of a checked edit file's arrays, in float64: the transform as I + its stored
    difference, or the per-layer deltas; the c′ of each epoch."""
    if meta["kind"] == "transform":
        transform = arrays["transform.delta"].astype(np.float64) + np.eye(meta["base"]["dim"])
        deltas = None
    else:
        transform, deltas = None, {n: arrays[f"layers.{n}.delta"].astype(np.float64) for n in meta["edited_layers"]}
    derived = [arrays[f"derived.{i}"].astype(np.float64) for i in range(sum(k.startswith("derived.") for k in arrays))]
    return transform, deltas, derived


def read_edit_file(path: str | os.PathLike) -> tuple[dict, torch.Tensor | None, dict | None, list[torch.Tensor]]:
    """(metadata, transform, deltas, derived) of an edit file, validated as a complete rece edit (float64 tensors)."""
    import torch

    meta, arrays = read_edit_arrays(path)
    transform, deltas, derived = edit_contents(meta, arrays)
    return (
        meta,
        None if transform is None else torch.from_numpy(transform),
        None if deltas is None else {n: torch.from_numpy(d) for n, d in deltas.items()},
        [torch.from_numpy(d) for d in derived],
    )


def check_shapes(meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Raise KeyError/ValueError naming the first tensor the metadata asks for that is missing or of the wrong shape."""
    if meta["kind"] == "transform":
        expected = {"transform.delta": [meta["base"]["dim"]] * 2}
    else:
        expected = {f"layers.{n}.delta": meta["base"]["shapes"][n] for n in meta["edited_layers"]}
    for key, shape in expected.items():
        if list(arrays[key].shape) != list(shape):
            raise ValueError(f"{key} of shape {list(arrays[key].shape)}, not {list(shape)}")
    for epoch in range(sum(k.startswith("derived.") for k in arrays)):
        arrays[f"derived.{epoch}"]  # noqa: B018  (a KeyError names the missing epoch)


def check_metadata(meta) -> None:
    """Raise ValueError/KeyError/TypeError naming the first field of an edit's metadata that is missing or of the
    wrong type (read_edit_file turns it into one line)."""
    if not isinstance(meta, dict):
        raise TypeError(f"metadata, a {type(meta).__name__} instead of an object")
    if meta.get("format") != FORMAT:
        raise ValueError("format")
    expected = {"kind": str, "method": str, "concepts": list, "config": dict, "base": dict, "edited_layers": list}
    for key, kind in expected.items():
        if not isinstance(meta[key], kind):
            raise TypeError(f"{key}, a {type(meta[key]).__name__} instead of a {kind.__name__}")
    base = {"fingerprint": str, "dim": int, "layers": list, "shapes": dict}
    for key, kind in base.items():
        if not isinstance(meta["base"][key], kind):
            raise TypeError(f"base.{key}, a {type(meta['base'][key]).__name__} instead of a {kind.__name__}")
