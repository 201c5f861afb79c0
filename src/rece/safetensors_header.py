"""A safetensors file's header, read without reading its tensors: entries, dtypes, where the data begins; checked
against the file's size, so a truncated or damaged file is one line before anything is read or written."""

from __future__ import annotations

import json
import os
import struct

import torch

from .errors import ReceError

# the safetensors dtypes of floating tensors rece reads and writes back (float8: ComfyUI's and Forge's fp8 files)
DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
FLOAT8 = ("F8_E4M3", "F8_E5M2")


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
