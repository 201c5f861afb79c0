"""Memory before work: what an erasure will hold at its peak, checked against what is free before it starts."""

from __future__ import annotations

import os

import torch

from .closed_form import CHUNK_ROWS
from .config import ROBUST_TEMPLATES
from .errors import ReceError

SAFETY = 1.25  # allocator slack and temporaries the count below leaves out


def erase_bytes(concepts: int, other_texts: int, rows: int, dim: int, epochs: int) -> int:
    """Peak bytes an erasure adds, by what it keeps in float64:

    - every text's embedding rows, [texts, rows, dim];
    - RECE's c′ of every concept, twice per epoch (the rows, and the padded copy the edit keeps);
    - the chunk of rows the accumulated updates and the derivations work on (with targets and results), ×4;
    - a dozen d×d matrices (grams, transforms, their factors).
    """
    texts = concepts + other_texts
    embeddings = texts * rows * dim
    derived = 2 * max(epochs, 0) * concepts * rows * dim
    chunk = 4 * min(CHUNK_ROWS, concepts * rows) * dim
    square = 12 * dim * dim
    return int(SAFETY * 8 * (embeddings + derived + chunk + square))


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory free for new allocations: the device's free memory for CUDA, MemAvailable on Linux (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(base, config) -> None:
    """Refuse, in one line and before any work, an erasure whose estimate exceeds the free memory."""
    others = 3 + len(config.preserve) + len(config.check) + (1 if config.preserve_empty else 0)
    if config.method == "robust" and config.templates:
        others += len(ROBUST_TEMPLATES) * (len(config.concepts) + 1)  # each concept in each template, and alone
    rows = [max(v.encoder.max_length, sum(v.family.erase_lengths(config.max_sequence_length))) for v in base.views]
    need = sum(erase_bytes(len(config.concepts), others, n, v.dim, config.epochs) for n, v in zip(rows, base.views))
    free = available_bytes(base.encoder.device)
    limit = os.environ.get("RECE_MEMORY_LIMIT")  # bytes; lets a user (and the tests) set the budget
    if limit:
        free = min(free, int(limit)) if free is not None else int(limit)
    if free is not None and need > free:
        raise ReceError(
            f"erasing {len(config.concepts)} concepts needs about {need / 1e9:.1f} GB and {free / 1e9:.1f} GB is free; "
            "erase fewer concepts per edit (split --concept-prompts and apply the edits in order)"
            + (" or lower --epochs" if config.epochs > 1 else "")
        )
