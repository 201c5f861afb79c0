"""Base models: what an erasure reads from a model, its prompt encoder and the original weights of the edited layers.

The fast path reads only the text encoder(s) and the edited tensors from the denoiser's safetensors file(s); no
denoiser is built. The text encoders compute in float32 on their mapped files, with half-precision weights cast
when used, so no float32 copy is made. A pipeline object already in memory works too. Which encoders and layers
these are is the model family's business (`rece.families`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import closed_form as cf
from . import gram_cache
from .errors import ReceError
from .families import Family, family_of_index, family_of_pipeline
from .hub import snapshot
from .sources import NAMED_MODELS, check_components, read_model_index, resolve_model
from .text import PromptEncoder
from .text_encoders import load_text_encoder
from .tokenizer_cache import load_tokenizer
from .weights import check_finite, kv_fingerprint, read_component_tensors, read_edited_weights


@dataclass
class BaseModel:
    """What an erasure needs from a model: its family, prompt encoder and the original weights of the edited layers.

    `kv` maps denoiser module names (e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`)
    to their weights (out × d), sorted by name.
    """

    family: Family
    encoder: PromptEncoder
    kv: dict[str, torch.Tensor]
    source: str
    folder: Path | None = None
    pipeline: object | None = field(default=None, repr=False)
    spaces: list[BaseModel] = field(default_factory=list, repr=False)  # one view per space of a multi-space family
    edits: list[dict] = field(default_factory=list)  # edit files applied before erasing from it (`--base-edit`)
    denoiser_config: dict | None = None  # what a single file says of its denoiser (read without a pipeline)
    _fingerprint: str | None = field(default=None, repr=False)
    _gram: torch.Tensor | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """The family's name, as edit files record it ('sd', 'sdxl')."""
        return self.family.name

    @property
    def views(self) -> list[BaseModel]:
        """Each space the model reads the prompt in: its `spaces`, or the model itself when it has one space."""
        return self.spaces or [self]

    @property
    def dim(self) -> int:
        return next(iter(self.kv.values())).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.kv.values())).dtype

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = kv_fingerprint(self.kv)
        return self._fingerprint

    def original_gram(self) -> torch.Tensor:
        """G₀ = Σ W⁰ᵀW⁰ over the edited layers (float64, on the encoder's device), computed once per base model and
        kept in the gram cache (`rece.gram_cache`), so the next erasure from the same base reads it."""
        if self._gram is None:
            device = self.encoder.device
            self._gram = gram_cache.read_cached_gram(self, device)
            if self._gram is None:
                self._gram = cf.weight_gram(w.to(device) for w in self.kv.values())
                gram_cache.write_cached_gram(self, self._gram)
        return self._gram


def load_model(
    model, device: str | torch.device = "cpu", config: str | None = None, text_encoders: Sequence[str] = (), text: bool = True
) -> BaseModel:
    """Resolve MODEL (pipeline object, diffusers folder, hub id, single-file checkpoint, `shapes`, `shapes-mmdit`,
    `shapes-dit` or `tiny`); `text_encoders`: split text encoder files that go with a single-file checkpoint;
    `text=False`: a single file's edited weights alone (a LoRA needs no text encoder: `encoder` is then None)."""
    source = resolve_model(model)
    if text_encoders and source.kind != "single-file":
        raise ReceError(f"--text-encoder goes with a single-file checkpoint; '{source.name}' brings its own text encoders")
    if source.kind == "single-file" and source.path.suffix in (".safetensors", ".gguf"):
        return from_checkpoint(source.path, device, config=config, text_encoders=text_encoders, text=text)
    if source.kind == "pipeline":
        return from_pipeline(model, source=source.name)
    if source.kind == "single-file":
        return from_single_file(source.path, device, config=config)
    if source.kind == "hub":
        return from_folder(download(source.name), device, source=source.name)
    return from_folder(source.path, device, source=source.name if source.name in NAMED_MODELS else None)


def download(repo_id: str) -> Path:
    """Fetch the parts of a hub pipeline that erasure reads (model index, text encoders, tokenizers, denoiser)."""
    return snapshot(repo_id, ["model_index.json", "text_encoder*/*", "tokenizer*/*", "unet/*", "transformer/*", "scheduler/*"])


def from_folder(folder: Path, device: str | torch.device = "cpu", source: str | None = None) -> BaseModel:
    """Read a diffusers pipeline folder: tokenizer(s), text encoder(s) and the edited layers' weights."""
    folder = Path(folder)
    index = read_model_index(folder)
    source = source or str(folder)
    family = family_of_index(index, source)
    denoiser = folder / family.denoiser
    used = [name for tok, enc in family.text_parts if (index.get(enc) or [None, None])[1] is not None for name in (tok, enc)]
    check_components(folder, index, [family.denoiser, *used])
    if family.denoiser not in index or not denoiser.is_dir():
        raise ReceError(f"'{folder}' has no {family.denoiser}; rece edits {family.denoiser}s of the pipelines it supports")
    config = json.loads((denoiser / "config.json").read_text()) if (denoiser / "config.json").is_file() else {}
    family = family.variant(config)
    kv = read_edited_weights(denoiser, family)
    if not kv or not config.get("cross_attention_dim", 1):
        raise ReceError(f"the {family.denoiser} of '{source}' has no {family.edited_title}; it cannot be conditioned on text")
    check_finite(kv, source)
    tokenizers, encoders = [], []
    for i, (sub_tok, sub_enc) in enumerate(family.text_parts):
        entry = index.get(sub_enc)
        if not entry or entry[1] is None:
            continue
        tokenizers.append(load_tokenizer(folder / sub_tok, family.tokenizer_class_of(i)))
        encoders.append(load_text_encoder(folder, sub_enc, entry[1], family.text_encoder_classes, device))
    if not encoders:
        raise ReceError(f"'{source}' has no text encoder; rece needs the pipeline's text encoder(s)")
    projection = _folder_projection(family, denoiser, config, device)
    return _assemble(family, tokenizers, encoders, device, projection, kv, source, folder=folder)


def _assemble(family: Family, tokenizers, encoders, device, projection, kv, source: str, **where) -> BaseModel:
    """The BaseModel of a family's encoders and edited weights; a multi-space family gets one view per space, each
    with its own rows and layers (the model's own encoder and gram are the first space's)."""
    spaces = []
    for space in family.spaces:
        own = {n: w for n, w in kv.items() if space.is_edited_weight(n + ".weight")}
        space = space.bind(own)
        encoder = PromptEncoder(space, tokenizers, encoders, device=device)
        _check_dims(encoder, own, source)
        spaces.append(BaseModel(family=space, encoder=encoder, kv=own, source=source, **where))
    encoder = spaces[0].encoder if spaces else PromptEncoder(family, tokenizers, encoders, device=device, projection=projection)
    if not spaces:
        _check_dims(encoder, kv, source)
    return BaseModel(family=family, encoder=encoder, kv=kv, source=source, spaces=spaces, **where)


def _folder_projection(family: Family, denoiser: Path, config: dict, device):
    """The family's denoiser modules between its text encoder and the edited layers, from the denoiser's files."""
    if not family.text_modules:
        return None
    prefixes = tuple(m + "." for m in family.text_modules)
    module = family.text_projection(config, read_component_tensors(denoiser, lambda key: key.startswith(prefixes)))
    return module.to(device)


def _check_dims(encoder: PromptEncoder, kv: dict[str, torch.Tensor], source: str) -> None:
    d = next(iter(kv.values())).shape[1]
    if encoder.dim != d:
        raise ReceError(
            f"'{source}': text embeddings are {encoder.dim}-wide but the edited layers read {d}; "
            "the pipeline's parts do not match"
        )


def from_pipeline(pipe, source: str = "pipeline", sequence_length: int | None = None) -> BaseModel:
    """Use a diffusers pipeline already in memory (its current weights count as the originals); `sequence_length`: the
    T5 rows per prompt to encode at (FLUX, SD3; None: the family's first)."""
    family = family_of_pipeline(pipe).at_length(sequence_length)
    modules = family.edited_modules(getattr(pipe, family.denoiser))
    kv = {n: m.weight.detach().clone() for n, m in modules.items()}
    if not kv:
        raise ReceError(f"the {family.denoiser} of '{source}' has no {family.edited_title}; it cannot be conditioned on text")
    check_finite(kv, source)
    parts = [(getattr(pipe, tok, None), getattr(pipe, enc, None)) for tok, enc in family.text_parts]
    tokenizers = [t for t, e in parts if e is not None]
    encoders = [e for _, e in parts if e is not None]
    projection = None
    if family.text_modules:  # a float32 copy: the rows are computed in float32 whatever the pipeline's dtype
        modules = [copy.deepcopy(getattr(getattr(pipe, family.denoiser), m)) for m in family.text_modules]
        projection = torch.nn.Sequential(*modules).float().eval()
    return _assemble(family, tokenizers, encoders, encoders[0].device, projection, kv, source, pipeline=pipe)


def from_checkpoint(
    path: Path, device="cpu", config: str | None = None, text_encoders: Sequence[str] = (), text: bool = True
) -> BaseModel:
    """Read a single-file checkpoint without diffusers: the edited layers' and the text encoders' tensors from the file
    (and the split `text_encoders` files), the tokenizers from `config`'s tokenizer folders or the family's hub
    repository (`rece.single_file`); `text=False`: the edited layers alone."""
    from .single_file import checkpoint_family, checkpoint_kv, missing_parts, model_encoders, read_checkpoint_header, text_parts

    header = read_checkpoint_header(path)
    kv, _ = checkpoint_kv(path, header)
    family = checkpoint_family(path, header)
    check_finite(kv, str(path))
    if not text:
        settings = family.checkpoint_config(header)
        return BaseModel(family=family, encoder=None, kv=kv, source=str(path), denoiser_config=settings)
    found = model_encoders(path, header, text_encoders)
    tokenizers, encoders = text_parts(family, found, config, str(path), device)
    try:
        base = _assemble(family, tokenizers, encoders, device, None, kv, str(path))
    except ReceError as exc:  # widths that do not add up: an encoder missing, or one of another model
        absent, first = missing_parts(family, found), str(exc).split(";")[0]
        if absent:
            raise ReceError(f"{first}: '{path}' has no {absent} text encoder; pass it with --text-encoder FILE") from None
        given = ", ".join(e.describe() for e in found)
        raise ReceError(f"{first}: the text encoders ({given}) are not this model's; pass the ones made for it") from None
    base.denoiser_config = family.checkpoint_config(header)
    return base


def from_single_file(path: Path, device="cpu", config: str | None = None) -> BaseModel:
    """Read a single-file checkpoint (see `pipelines.load_single_file_pipeline`)."""
    from .pipelines import load_single_file_pipeline

    pipe = load_single_file_pipeline(path, config).to(device)
    return from_pipeline(pipe, source=str(path))
