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
from .io import atomic_file, check_output_path
from .safetensors_header import DTYPES, FLOAT8, encoded_header, read_header
from .single_file import checkpoint_family, checkpoint_kv

BLOCK = 16 * 2**20  # bytes copied at a time


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


def write_applied_checkpoint(
    model: str | os.PathLike, edits: Sequence, out: str | os.PathLike, allow_other_base: bool = False, overwrite: bool = False
) -> Path:
    """Write the single-file checkpoint `model` with `edits` applied in order to `out` (same keys, dtypes, shapes
    and order; only the edited tensors differ; rece's edits and base fingerprint added to the metadata)."""
    return applied_checkpoint(model, edits, out, allow_other_base, overwrite)[0]


def applied_checkpoint(
    model: str | os.PathLike, edits: Sequence, out: str | os.PathLike, allow_other_base: bool = False, overwrite: bool = False
) -> tuple[Path, dict[str, tuple[str, float]]]:
    """`write_applied_checkpoint`, and the rounding of each edited layer stored in float8 (`float8_rounding`)."""
    from .weights import kv_fingerprint

    src, out = Path(model), Path(out)
    refuse_gguf(src)
    if src.is_dir() or src.suffix != ".safetensors":
        raise ReceError(
            f"'{model}' is not a .safetensors checkpoint: diffusers ships no conversion from a folder to one file; "
            "pass the original checkpoint as MODEL, or write a folder (-o DIR)"
        )
    check_output_path(out, overwrite=overwrite, inputs=[src])
    header, _ = read_header(src)
    kv, keys = checkpoint_kv(src, header)
    fingerprint = kv_fingerprint(kv)
    new = composed_weights(edits, kv, allow_other_base, str(src), checkpoint_family(src, header))
    record = {
        "base_fingerprint": fingerprint,
        "edits": [{"id": e.edit_id(), "method": e.method, "concepts": e.concepts} for e in edits],
    }
    written = write_replaced(src, out, {keys[n]: w for n, w in new.items()}, {METADATA_KEY: json.dumps(record)})
    return written, float8_rounding(header, keys, kv, new)


def refuse_gguf(model: str | os.PathLike) -> None:
    """rece does not rewrite GGUF files: one line pointing to the LoRA, which ComfyUI-GGUF applies."""
    if Path(model).suffix == ".gguf":
        raise ReceError(
            f"'{model}' is a GGUF file, whose quantised tensors rece does not rewrite; export the edit instead "
            f"(rece lora {model} EDIT --format diff -o erased.safetensors) and load it with ComfyUI-GGUF's LoRA loader"
        )


def float8_rounding(header: dict, keys: dict[str, str], kv: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict:
    """For each edited layer a float8 file stores: its dtype, and the error the cast to it adds to the edit, relative
    to the edit's own change (‖fp8(W′) − W′‖ / ‖W′ − W‖, W the stored weights read exactly, W′ the edited ones)."""
    out = {}
    for name, w in new.items():
        dtype = header[keys[name]]["dtype"]
        if dtype in FLOAT8:
            change = (w.double() - kv[name].double()).norm()
            error = (w.to(DTYPES[dtype]).double() - w.double()).norm()
            out[name] = (dtype, float(error / change) if change > 0 else 0.0)
    return out
