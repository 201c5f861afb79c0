"""Edited single-file checkpoints: the input `.safetensors` file, byte for byte, with only the edited tensors replaced.

SD1/SD2 (LDM names), SDXL (SGM names), FLUX.1 (Black Forest Labs' names, bare or under a prefix) and SD3 (Stability's).

The file is streamed: its header is rewritten (rece's metadata added, every tensor's entry, dtype, shape, offset and
order kept) and its data copied a block at a time, the edited tensors' bytes swapped in. Peak memory is the edited
layers plus one block, whatever the checkpoint's size; the output appears only when complete.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from .apply import composed_weights
from .edit_file import METADATA_KEY
from .errors import ReceError
from .families import family_of_checkpoint, titles_where
from .io import atomic_file, check_output_path

BLOCK = 16 * 2**20  # bytes copied at a time
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file (tensor entries in file order, `__metadata__` if any) and where its
    data begins."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ReceError(f"'{path}' is not a safetensors file (it is shorter than a header); pass a .safetensors checkpoint")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20 or length > os.path.getsize(path):
            raise ReceError(f"'{path}' is not a safetensors file (its header length is {length}); pass a .safetensors checkpoint")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ReceError(f"'{path}' has a damaged safetensors header; re-download the checkpoint") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise ReceError(f"'{path}' has a damaged safetensors header; re-download the checkpoint") from None
    if 8 + length + end > os.path.getsize(path):
        raise ReceError(
            f"'{path}' is truncated: its header describes {8 + length + end} bytes, the file has {os.path.getsize(path)}; "
            "re-download the checkpoint"
        )
    return header, 8 + length


def encoded_header(header: dict) -> bytes:
    """A header as safetensors stores it: compact JSON padded with spaces to a multiple of 8 bytes."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def tensor_bytes(tensor: torch.Tensor, entry: dict, key: str) -> bytes:
    """The bytes of `tensor` in the dtype and shape of a header entry (refusing a different shape)."""
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None or list(tensor.shape) != entry["shape"]:
        raise ReceError(f"tensor {key} of the checkpoint is {entry['dtype']} {entry['shape']}; the edit has {list(tensor.shape)}")
    data = tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()
    begin, end = entry["data_offsets"]
    if len(data) != end - begin:
        raise ReceError(f"tensor {key} takes {end - begin} bytes in the checkpoint, the edit's {len(data)}")
    return data


def _copy(src, dst, count: int) -> None:
    """Copy `count` bytes from src to dst a block at a time."""
    while count > 0:
        chunk = src.read(min(BLOCK, count))
        if not chunk:
            raise ReceError("the checkpoint ended before its data did; it is truncated, re-download it")
        dst.write(chunk)
        count -= len(chunk)


def write_replaced(src: Path, out: Path, replacements: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `src` to `out` with the tensors in `replacements` (by key) swapped in and `metadata` added to the
    header's; every other byte of the data is copied unchanged. Atomic: `out` appears only when complete."""
    header, start = read_header(src)
    missing = [k for k in replacements if k not in header or k == "__metadata__"]
    if missing:
        raise ReceError(f"the checkpoint has no tensor {missing[0]}")
    swaps = sorted((header[k]["data_offsets"][0], header[k]["data_offsets"][1], tensor_bytes(t, header[k], k))
                   for k, t in replacements.items())  # fmt: skip
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    header = dict(header)
    header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
    with atomic_file(out) as tmp, open(src, "rb") as f, open(tmp, "wb") as g:
        raw = encoded_header(header)
        g.write(struct.pack("<Q", len(raw)) + raw)
        f.seek(start)
        position = 0
        for begin, stop, data in swaps:
            _copy(f, g, begin - position)
            g.write(data)
            f.seek(start + stop)
            position = stop
        _copy(f, g, end - position)
    return out


def checkpoint_kv(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The edited layers' weights of a single-file checkpoint, by diffusers module name (float32, as rece reads the
    checkpoint through diffusers), and each one's key in the file; only those tensors are read."""
    from safetensors import safe_open

    header, _ = read_header(path)
    family = family_of_checkpoint(path)
    if not family.has_single_files():
        families = titles_where("has_single_files")
        raise ReceError(f"rece rewrites single-file checkpoints of {families} only; '{path}' is {family.title}")
    keys = family.original_keys(header)
    if not keys:
        raise ReceError(f"'{path}' lacks the {family.edited_title} layers of a {family.title} checkpoint; it is not one")
    with safe_open(str(path), framework="pt") as f:
        kv = {n: f.get_tensor(k).to(torch.float32) for n, k in sorted(keys.items())}
    return kv, keys


def write_applied_checkpoint(
    model: str | os.PathLike, edits: Sequence, out: str | os.PathLike, allow_other_base: bool = False, overwrite: bool = False
) -> Path:
    """Write the single-file checkpoint `model` with `edits` applied in order to `out` (same keys, dtypes, shapes
    and order; only the edited tensors differ; rece's edits and base fingerprint added to the metadata)."""
    from .weights import kv_fingerprint

    src, out = Path(model), Path(out)
    if src.is_dir() or src.suffix != ".safetensors":
        raise ReceError(
            f"'{model}' is not a .safetensors checkpoint: diffusers ships no conversion from a folder to one file; "
            "pass the original checkpoint as MODEL, or write a folder (-o DIR)"
        )
    check_output_path(out, overwrite=overwrite, inputs=[src])
    kv, keys = checkpoint_kv(src)
    fingerprint = kv_fingerprint(kv)
    new = composed_weights(edits, kv, allow_other_base, str(src), family_of_checkpoint(src))
    record = {
        "base_fingerprint": fingerprint,
        "edits": [{"id": e.edit_id(), "method": e.method, "concepts": e.concepts} for e in edits],
    }
    return write_replaced(src, out, {keys[n]: w for n, w in new.items()}, {METADATA_KEY: json.dumps(record)})
