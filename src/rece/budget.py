"""Memory before work: what an erasure will hold at its peak, checked against what is free before it starts."""

from __future__ import annotations

import os
import re

import torch

from .closed_form import CHUNK_ROWS
from .config import ROBUST_TEMPLATES
from .errors import ReceError
from .preservation import SUM_ROWS, check_chunk_texts

SAFETY = 1.25  # allocator slack and temporaries the count below leaves out
LIMIT_ENV = "RECE_MEMORY_LIMIT"  # caps the free memory rece assumes: bytes (1e9) or a size (800MB, 2GB, 1.5GiB)
UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


PER_CHECK_TEXT = 1024  # bytes a held-out text keeps until the report: its string, its sums, its place in the summary
PER_PRESERVE_TEXT = 256  # bytes a preserve text adds: its places in the two stages' counts and its report sums
ENCODE_BATCH = 16  # texts the encoder runs at once (PromptEncoder.encode_unique): its activations, float32


def erase_bytes(
    concepts: int,
    other_texts: int,
    rows: int,
    dim: int,
    epochs: int,
    preserve: int = 0,
    check: int = 0,
    tokenizers: int = 1,
    chunked: bool = True,
) -> int:
    """Peak bytes an erasure adds, by what it keeps in float64:

    - the embedding rows of every text it encodes together, [texts, rows, dim] (its concepts and the `other_texts`);
    - the `preserve` (distinct) texts: up to one chunk (or not `chunked`: robust mode), encoded with the others and
      their rows twice more (the RECE step's weighted rows, and the rows the closed form stacks); beyond, a chunk at
      a time: its rows twice (encoded, weighted) and its token ids, and each stage's d×d sums and factors;
    - RECE's c′ of every concept, twice per epoch (the rows, and the padded copy the edit keeps);
    - the chunk of rows the accumulated updates and the derivations work on (with targets and results), ×4;
    - a dozen d×d matrices (grams, transforms, their factors);
    - the text encoder's activations for one batch, as two float32 [ENCODE_BATCH, rows, dim] tensors;
    - after the erasure, the held-out (`check`) texts, and the many preserved texts again for their report, one chunk
      at a time: its rows, its token ids, three SUM_ROWS × d products; and PER_CHECK_TEXT (PER_PRESERVE_TEXT) for
      each held-out (preserve) text.
    """
    chunk = check_chunk_texts(rows, dim)
    few = preserve <= chunk or not chunked
    texts = concepts + other_texts + (preserve if few else 2)
    embeddings = texts * rows * dim + (2 * (preserve + 2) * rows * dim if few else 0)
    derived = 2 * max(epochs, 0) * concepts * rows * dim
    work = 4 * min(CHUNK_ROWS, concepts * rows) * dim
    square = (12 if few else 18) * dim * dim
    # a chunk at a time: while the preserved texts are summed, or after the erasure (not both at once)
    summing = 0 if few else chunk * rows * (2 * dim + tokenizers)
    reported = max(check, 0 if few else preserve)
    if reported:
        encoded = min(reported, chunk)
        summing = max(summing, encoded * rows * (dim + tokenizers) + 3 * min(SUM_ROWS, reported * rows) * dim)
    encoding = ENCODE_BATCH * rows * dim  # two float32 tensors: one float64's bytes
    floats = embeddings + derived + work + square + encoding + summing
    return int(SAFETY * (8 * floats + PER_CHECK_TEXT * check + PER_PRESERVE_TEXT * preserve))


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


def parse_size(text: str) -> int | None:
    """Bytes of a size as people write it: 1000000000, 1e9, 800MB, 2 GB, 1.5GiB, 512k (None when it is not one)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        return None
    return int(float(match.group(1)) * UNITS[match.group(2) or ""])


def memory_limit() -> int | None:
    """The cap RECE_MEMORY_LIMIT sets (None: not set); a ReceError naming the variable when it is not a size."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return None
    size = parse_size(text)
    if size is None or size < 1:
        raise ReceError(f"{LIMIT_ENV}={text!r} is not a size; set it in bytes (1e9) or with a unit (800MB, 2GB, 1.5GiB)")
    return size


def format_bytes(size: float) -> str:
    """A byte count in the unit that reads best: 512 B, 3.2 kB, 800 MB, 1.5 GB, 2.1 TB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def free_memory(device: str | torch.device = "cpu") -> tuple[int | None, str]:
    """(bytes free for new allocations, what they are): the device's free memory, capped by RECE_MEMORY_LIMIT when it
    is set (None: unknown)."""
    free, limit = available_bytes(device), memory_limit()
    if limit is not None and (free is None or limit < free):
        return limit, f"allowed by {LIMIT_ENV}"
    return free, "free"


def require_memory(need: int, device: str | torch.device, what: str, advice: str) -> None:
    """Refuse in one line, before the work, `what` needing `need` bytes when less is free on `device`."""
    free, where = free_memory(device)
    if free is not None and need > free:
        raise ReceError(f"{what} needs about {format_bytes(need)} and {format_bytes(free)} is {where}; {advice}")


def estimate_bytes(base, config) -> int:
    """What `erase_bytes` expects an erasure of `config` from `base` to add, over every space the model reads."""
    others = 3 + (1 if config.preserve_empty else 0)
    if config.method == "robust" and config.templates:
        others += len(ROBUST_TEMPLATES) * (len(config.concepts) + 1)  # each concept in each template, and alone
    preserve, check, chunked = len(set(config.preserve)), len(set(config.check)), config.method != "robust"
    # rows per text: every sequence length the erasure pairs (FLUX.1 [schnell]: 256 and 512 joined)
    rows = [max(v.encoder.max_length, sum(v.family.erase_lengths(config.max_sequence_length))) for v in base.views]
    return sum(
        erase_bytes(len(config.concepts), others, n, v.dim, config.epochs, preserve, check, len(v.encoder.tokenizers), chunked)
        for n, v in zip(rows, base.views)
    )


def check_memory(base, config) -> None:
    """Refuse, in one line and before any work, an erasure whose estimate exceeds the free memory."""
    advice = (
        "erase fewer concepts per edit: split --concept-prompts and erase each part from the previous result "
        "(rece erase MODEL --base-edit PREVIOUS.safetensors ...), then apply the edits in order"
        + (", or lower --epochs" if config.epochs > 1 else "")
    )
    require_memory(estimate_bytes(base, config), base.encoder.device, f"erasing {len(config.concepts)} concepts", advice)
