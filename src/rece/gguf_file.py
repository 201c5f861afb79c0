"""GGUF denoisers (ComfyUI-GGUF's quantised FLUX.1 and SD3 files), read with the `gguf` package (`pip install
'rece[gguf]'`): tensor names and shapes as ComfyUI-GGUF's loader reads them (its `model.diffusion_model.` prefix
dropped when present, the dimensions reversed, or `comfy.gguf.orig_shape.NAME` when the file records one), and the
edited layers dequantised to float32 by the package's own dequantisers (Q8_0, Q5_K, Q4_K, F16, BF16, ...).

rece does not write GGUF: an edit reaches a GGUF model as a LoRA or `.diff` file, which ComfyUI-GGUF applies on
top of the dequantised weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ReceError

PREFIX = "model.diffusion_model."
ORIGINAL_SHAPE = "comfy.gguf.orig_shape."


def gguf_reader(path: Path):
    """gguf's reader of a file; one line when the package is missing or the file is not GGUF."""
    try:
        import gguf
    except ImportError:
        raise ReceError(f"reading '{path}' needs the gguf package; install it: pip install 'rece[gguf]'") from None
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:  # gguf's errors for a bad magic, a short file, a bad field
        raise ReceError(
            f"cannot read '{path}' as GGUF ({str(exc).splitlines()[0][:120]}); the file is damaged or truncated"
        ) from None


def _original_shape(reader, name: str) -> list[int] | None:
    """The shape ComfyUI-GGUF's converter recorded for a tensor it reshaped, if any."""
    field = reader.get_field(ORIGINAL_SHAPE + name)
    return None if field is None else [int(field.parts[i][0]) for i in field.data]


def gguf_tensors(path: Path) -> tuple[dict[str, dict], object]:
    """{name: {"shape", "dtype", "tensor"}} of a GGUF file's tensors by the names ComfyUI-GGUF gives them, and the
    reader (the file stays mapped while it is alive)."""
    reader = gguf_reader(path)
    prefixed = any(t.name.startswith(PREFIX) for t in reader.tensors)
    entries = {}
    for tensor in reader.tensors:
        if prefixed and not tensor.name.startswith(PREFIX):
            continue
        shape = _original_shape(reader, tensor.name) or [int(v) for v in reversed(tensor.shape)]
        name = tensor.name[len(PREFIX) :] if prefixed else tensor.name
        entries[name] = {"shape": shape, "dtype": tensor.tensor_type.name, "tensor": tensor}
    return entries, reader


def gguf_weights(path: Path, entries: dict[str, dict], keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of `keys` ({module: name in the file}) dequantised to float32, by module."""
    from gguf.quants import dequantize

    out = {}
    for module, key in sorted(keys.items()):
        entry = entries[key]
        try:
            values = dequantize(entry["tensor"].data, entry["tensor"].tensor_type)
        except NotImplementedError:
            raise ReceError(f"'{path}' stores {key} as {entry['dtype']}, which the gguf package cannot dequantise") from None
        out[module] = torch.from_numpy(values.copy()).to(torch.float32).reshape(entry["shape"])
    return out
