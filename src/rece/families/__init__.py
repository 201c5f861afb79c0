"""Model families: one module per kind of pipeline behind the small interface of `base.Family`.

Everything that knows SD1/SD2 or SDXL lives in its family's module; the rest of rece asks the family found here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ReceError
from .base import Family, tokenize
from .flux import FLUX, FLUX_SCHNELL
from .pixart import PIXART_ALPHA, PIXART_SIGMA
from .sana import SANA
from .sd import SD
from .sd3 import SD3
from .sdxl import REFINER_MARKER, SDXL

# most specific first: an SDXL pipeline also has SD's components
FAMILIES: tuple[Family, ...] = (SDXL, SD, PIXART_SIGMA, PIXART_ALPHA, SANA, FLUX, SD3)
VARIANTS: tuple[Family, ...] = (FLUX_SCHNELL,)  # told apart from their pipeline's family by the denoiser's config
SHOWN: tuple[Family, ...] = (SD, SDXL, PIXART_ALPHA, PIXART_SIGMA, SANA, FLUX, SD3)  # the order messages list them in

__all__ = [
    "FAMILIES", "Family", "family_named", "family_of_checkpoint", "family_of_index", "family_of_keys", "family_of_pipeline",
    "titles", "tokenize",
]  # fmt: skip


def listed(words: Sequence[str]) -> str:
    """Words as a sentence lists them: "a, b and c"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def titles(families: Iterable[Family]) -> str:
    """Families' titles as a sentence lists them: "SDXL, FLUX.1 and SD3/SD3.5"."""
    return listed([f.title for f in families])


def titles_where(question: str) -> str:
    """The titles of the families whose answer to `question` (a method name, e.g. 'has_kohya_names') is yes."""
    return titles(f for f in SHOWN if getattr(f, question)())


def supported() -> str:
    """The families rece knows, with their pipeline classes, for error messages."""
    return listed([f"{f.title} ({', '.join(f.pipelines)})" for f in SHOWN])


def family_named(name: str) -> Family:
    """The family recorded under `name` in an edit file or manifest ('sd', 'sdxl')."""
    for family in FAMILIES + VARIANTS:
        if family.name == name:
            return family
    raise ReceError(f"unknown model family '{name}'; rece supports {supported()}")


def family_of_index(index: dict, source: str) -> Family:
    """The family of a diffusers folder, from its model_index.json."""
    for family in FAMILIES:
        if family.matches_index(index):
            return family
    raise ReceError(f"'{source}' is a {index.get('_class_name', 'pipeline')} rece does not know; it supports {supported()}")


def family_of_pipeline(pipe) -> Family:
    """The family of a pipeline object in memory (its variant, by its denoiser's config)."""
    for family in FAMILIES:
        if family.matches_pipeline(pipe):
            return family.variant(dict(getattr(getattr(pipe, family.denoiser, None), "config", None) or {}))
    raise ReceError(f"'{type(pipe).__name__}' is not a pipeline rece knows; it supports {supported()}")


def family_of_checkpoint(path: Path) -> Family:
    """The family of an original-format single-file checkpoint (`family_of_keys` of its tensor names)."""
    if path.suffix != ".safetensors":
        return SD
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return family_of_keys(list(f.keys()))


def family_of_keys(keys: Iterable[str]) -> Family:
    """The family of a single file's tensor names, by a key part only that family's files have (SD otherwise; an SDXL
    refiner by its lone CLIP-G); the part may follow a prefix (ComfyUI saves FLUX under model.diffusion_model.)."""
    keys = list(keys)
    for family in FAMILIES:
        if family.checkpoint_marker and any(family.checkpoint_marker in k for k in keys):
            return family
    if any(k.startswith(REFINER_MARKER) for k in keys):  # one text encoder, OpenCLIP bigG
        return SDXL
    return SD


def is_refiner_checkpoint(path: Path) -> bool:
    """Whether a single file is an SDXL refiner's (its one text encoder is CLIP-G, as conditioner.embedders.0)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    return any(k.startswith(REFINER_MARKER) for k in keys) and not any(SDXL.checkpoint_marker in k for k in keys)
