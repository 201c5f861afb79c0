"""The gram cache: G₀ = Σ W⁰ᵀW⁰ of a base model's edited layers, kept on disk so the next erasure from it reads it.

Files are $RECE_CACHE/grams/FINGERPRINT-DTYPE-LAYERS.safetensors; `RECE_GRAM_CACHE=0` turns the cache off. A cached
gram is used only when its bytes match the checksum stored with it (any damage) and it passes a random-probe check
against the weights (another model's gram); otherwise it is recomputed.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from .hub import cache_root
from .io import atomic_file

GRAM_CACHE_ENV = "RECE_GRAM_CACHE"


def gram_cache_file(base) -> Path | None:
    """Where the gram of `base` is cached: $RECE_CACHE/grams/FINGERPRINT-DTYPE-LAYERS.safetensors (None: cache off)."""
    if os.environ.get(GRAM_CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = cache_root()
    dtype = str(base.dtype).removeprefix("torch.")
    return root / "grams" / f"{base.fingerprint()}-{dtype}-{len(base.kv)}.safetensors"


def gram_matches(gram: torch.Tensor, kv: dict[str, torch.Tensor], tolerance: float = 1e-4) -> bool:
    """Whether `gram` is Σ WᵀW of these weights, by Freivalds' check: G·v against Σ Wᵀ(W·v) for a random v.

    The probe runs in float32 (half, bfloat16 and float32 weights are exact in it; its rounding is ~1e-6 relative),
    about 8× faster than float64 on a 40-layer model; weights that differ by 1e-4 relative or more are caught.
    """
    v = torch.randn(gram.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(gram.device)
    probe = torch.zeros_like(v)
    v32 = v.to(torch.float32)
    for w in kv.values():
        w = w.to(gram.device, torch.float32)
        probe += (w.T @ (w @ v32)).to(torch.float64)
    return bool(torch.linalg.vector_norm(gram @ v - probe) <= tolerance * torch.linalg.vector_norm(probe))


def gram_checksum(gram: torch.Tensor) -> str:
    """crc32 of a gram's bytes (a damaged or altered cache file is caught bit for bit, at memory speed)."""
    return f"{zlib.crc32(gram.detach().to('cpu').contiguous().numpy().view('uint8')):08x}"


def read_cached_gram(base, device: str | torch.device) -> torch.Tensor | None:
    """The cached gram of `base`, or None when there is none, it is unreadable, or it does not match the weights."""
    from safetensors.torch import load_file

    path = gram_cache_file(base)
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            checksum = (f.metadata() or {}).get("crc32")
        gram = load_file(str(path))["gram"]
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    if checksum is None or gram.dtype != torch.float64 or checksum != gram_checksum(gram):
        return None
    gram = gram.to(device)
    if gram.dtype != torch.float64 or gram.shape != (base.dim, base.dim) or not gram_matches(gram, base.kv):
        return None
    return gram


def write_cached_gram(base, gram: torch.Tensor) -> None:
    """Keep `gram` for the next erasure from this base (atomically; a cache that cannot be written is skipped)."""
    from safetensors.torch import save_file

    path = gram_cache_file(base)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            gram = gram.detach().to("cpu").contiguous()
            save_file({"gram": gram}, str(tmp), metadata={"source": base.source, "crc32": gram_checksum(gram)})
    except OSError:
        pass
