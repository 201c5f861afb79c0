"""Edits: the result of an erasure, as an object that knows the new weights of the edited layers.

An edit is either one d×d transform P shared by every edited layer (W' = W·P; the "replace" technique on all
layers) or per-layer deltas (W' = W + ΔW). Its metadata records the method, every parameter, the concepts,
library versions and a fingerprint of the base model's edited weights. The file format is `edit_file`, putting
edits into models `apply`, LoRA export `lora` and the text summary `edit_summary`; the methods here lead there.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import apply as applying
from .config import LORA_TOLERANCE
from .edit_file import FORMAT, FORMAT_VERSION, edit_tensors, read_edit_file, write_edit_file
from .edit_summary import summarize
from .errors import ReceError
from .families import family_named
from .lora import LORA_FORMATS, denoiser_config, kohya_modules, kohya_state, lora_state, save_lora
from .models import BaseModel, load_model
from .provenance import file_sha256, library_versions, utc_now
from .weights import kv_fingerprint


@dataclass
class Edit:
    """An erasure's result. `transform` (d×d, float64) or `deltas` ({layer: ΔW}) describe the new weights."""

    metadata: dict
    transform: torch.Tensor | None = None
    deltas: dict[str, torch.Tensor] | None = None
    derived: list[torch.Tensor] = field(default_factory=list)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_transform(cls, transform, base: BaseModel, config, derived, seconds: float, robust: dict | None = None) -> Edit:
        meta = cls._metadata("transform", base, config, list(base.kv), seconds)
        if robust is not None:
            meta["robust"] = robust
        return cls(meta, transform=transform.cpu(), derived=[d.cpu() for d in derived])

    @classmethod
    def from_deltas(cls, deltas, base: BaseModel, config, derived, seconds: float, robust: dict | None = None) -> Edit:
        meta = cls._metadata("layers", base, config, list(deltas), seconds)
        if robust is not None:
            meta["robust"] = robust
        return cls(meta, deltas={n: d.cpu() for n, d in deltas.items()}, derived=[d.cpu() for d in derived])

    @staticmethod
    def _metadata(kind: str, base: BaseModel, config, edited: list[str], seconds: float) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "method": config.method,
            "concepts": list(config.concepts),
            "config": config.to_dict(),
            "base": {
                "source": base.source,
                "fingerprint": base.fingerprint(),
                "pipeline": base.kind,
                "dim": base.dim,
                "dtype": str(base.dtype).replace("torch.", ""),
                "layers": list(base.kv),
                "shapes": {n: list(w.shape) for n, w in base.kv.items()},
                **({"edits": base.edits} if base.edits else {}),  # erased from the model with these edits applied
            },
            "edited_layers": edited,
            "seconds": round(seconds, 4),
            "created": utc_now(),
            "versions": library_versions(),
        }

    # -- properties ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def concepts(self) -> list[str]:
        return self.metadata["concepts"]

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def layers(self) -> list[str]:
        return self.metadata["edited_layers"]

    @property
    def sequence_lengths(self) -> list[int]:
        """The T5 rows per prompt the erasure covered (FLUX, SD3), the one to draw with first; [] for other families."""
        return list(self.metadata.get("sequence_lengths") or [])

    @property
    def base_fingerprint(self) -> str:
        """The fingerprint of the base model's edited weights this edit was made from (`kv_fingerprint`)."""
        return self.metadata["base"]["fingerprint"]

    def edit_id(self) -> str:
        """What tells this edit from others on a pipeline's stack of applied edits: creation time, concepts, config."""
        return json.dumps([self.metadata["created"], self.metadata["concepts"], self.metadata["config"]], sort_keys=True)

    # -- the new weights ----------------------------------------------------------------------
    def delta64(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        """W′ − W of layer `name` in float64, for its original weight `w0`."""
        if self.kind == "transform":
            eye = torch.eye(self.transform.shape[0], dtype=torch.float64, device=w0.device)
            return w0.to(torch.float64) @ (self.transform.to(w0.device, torch.float64) - eye)
        return self.deltas[name].to(w0.device, torch.float64)

    def edited_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The edited version of one original weight, in the weight's dtype and device."""
        w64 = weight.detach().to(torch.float64)
        if self.kind == "transform":
            new = w64 @ self.transform.to(w64.device, torch.float64)
        else:
            new = w64 + self.deltas[name].to(w64.device, torch.float64)
        return new.to(weight.dtype)

    def edited_kv(
        self, kv: dict[str, torch.Tensor], allow_other_base: bool = False, source: str = "model", family=None
    ) -> dict[str, torch.Tensor]:
        """New weights for the edited layers of `kv` (original weights); checks the base model first."""
        self.check_base(kv, allow_other_base, source, family)
        return {n: self.edited_weight(n, kv[n]) for n in self.layers}

    def check_family(self, family, source: str = "model") -> None:
        """Refuse a model of another family than the edit's base (`family`: the model's; None: not known)."""
        recorded = self.metadata["base"].get("pipeline")
        if family is None or recorded is None or family_named(recorded).pipelines == family.pipelines:
            return
        raise ReceError(
            f"this edit was made for a {recorded} model ({self.metadata['base']['source']}) but '{source}' is a "
            f"{family.name} model; an edit applies to its own family only (--allow-other-base allows fine-tunes of the base)"
        )

    def check_base(self, kv: dict[str, torch.Tensor], allow_other_base: bool = False, source: str = "model", family=None) -> None:
        """Refuse a model of another family or architecture, and another base model unless `allow_other_base`."""
        self.check_family(family, source)
        missing = [n for n in self.layers if n not in kv]
        if missing:
            raise ReceError(f"'{source}' has no layer {missing[0]} that this edit changes; it is a different architecture")
        shapes = self.metadata["base"]["shapes"]
        for n in self.layers:
            if list(kv[n].shape) != shapes[n]:
                raise ReceError(
                    f"layer {n} of '{source}' is {list(kv[n].shape)}, the edit expects {shapes[n]}; "
                    "it is a different architecture"
                )
        if not allow_other_base and kv_fingerprint(kv) != self.base_fingerprint:
            before = self.metadata["base"].get("edits") or []
            after = f" after its edit(s) {', '.join(e['path'] for e in before)}" if before else ""
            raise ReceError(
                f"this edit was made for base model {self.base_fingerprint} ({self.metadata['base']['source']}{after}) but "
                f"'{source}' is {kv_fingerprint(kv)}; use the same base model"
                + (" with those edits applied first, in order" if before else "")
                + ", or pass --allow-other-base (allow_other_base=True) for a fine-tune of it"
            )

    # -- what the other modules do with it ----------------------------------------------------
    def apply(self, pipe, allow_other_base: bool = False):
        """Edit a diffusers pipeline in place (revert with `revert`). Returns the pipeline."""
        return applying.apply_edit(self, pipe, allow_other_base)

    def revert(self, pipe):
        """Restore the exact weights the pipeline had before this edit was applied."""
        return applying.revert_edit(self, pipe)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the edit as safetensors + JSON metadata (atomically)."""
        return write_edit_file(path, self.metadata, edit_tensors(self.transform, self.deltas, self.derived))

    def summary(self) -> str:
        return summarize(self.metadata, self.transform)

    def to_lora(
        self,
        model,
        path: str | os.PathLike | None = None,
        tolerance: float = LORA_TOLERANCE,
        max_rank: int | None = None,
        allow_other_base: bool = False,
        format: str = "diffusers",
    ) -> dict[str, torch.Tensor]:
        """LoRA weights that reproduce the edited layers (written to `path`): diffusers/PEFT keys for
        `pipe.load_lora_weights` (default), kohya keys for ComfyUI / Automatic1111 / Forge, or kohya-named `.diff`
        full differences (exact).

        One rank for all layers: the smallest at which every layer satisfies
        ‖W_lora − W_edit‖_F ≤ tolerance·‖W_edit‖_F (from each ΔW's SVD), capped by `max_rank`; a layer that needs its
        full width is written exactly (full-rank factors; `.diff` in kohya's format), as the file's metadata records
        (`lora.read_lora_record`).
        """
        if format not in LORA_FORMATS:
            raise ReceError(f"unknown LoRA format '{format}'; choose one of {', '.join(LORA_FORMATS)}")
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 < tolerance < 1):
            raise ReceError(f"tolerance must be a number in (0, 1), got {tolerance!r}; fix --tolerance (e.g. {LORA_TOLERANCE:g})")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise ReceError(f"max rank must be a whole number >= 1, got {max_rank!r}; fix --max-rank")
        base = model if isinstance(model, BaseModel) else load_model(model)
        self.check_base(base.kv, allow_other_base, base.source, base.family)
        deltas = {n: self.delta64(n, base.kv[n].to(torch.float64)) for n in self.layers}
        if format == "diffusers":
            state, rank, exact = lora_state(deltas, base.kv, base.family.denoiser, tolerance, max_rank)
        else:
            modules = kohya_modules(base.family, list(self.layers), denoiser_config(base))
            state, rank, exact = kohya_state(deltas, base.kv, modules, format, tolerance, max_rank)
        if path is not None:
            save_lora(path, state, rank, tolerance, self.metadata, format, exact)
        return state


def load_edit(path: str | os.PathLike) -> Edit:
    """Read an edit file, validating that it is a complete rece edit."""
    metadata, transform, deltas, derived = read_edit_file(path)
    return Edit(metadata, transform=transform, deltas=deltas, derived=derived)


def edited_base(base: BaseModel, paths: Sequence[str | os.PathLike]) -> BaseModel:
    """`base` with the edit files `paths` applied in order: what a further erasure starts from (`--base-edit`), so
    that its edit applies after them (`rece apply MODEL PREVIOUS... NEW`)."""
    kv, records = dict(base.kv), list(base.edits)
    for path in paths:
        edit = load_edit(path)
        kv.update(edit.edited_kv(kv, source=base.source, family=base.family))
        records.append({"path": str(Path(path).resolve()), "sha256": file_sha256(path), "concepts": edit.concepts})
    spaces = [replace(v, kv={n: kv[n] for n in v.kv}, edits=records, _fingerprint=None, _gram=None) for v in base.spaces]
    return replace(base, kv=kv, spaces=spaces, edits=records, _fingerprint=None, _gram=None)
