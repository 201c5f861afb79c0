"""`derived`: RECE's closed-form probe as an attack. No gradients, no prompts.

For each erased concept c (from the edit's metadata) the attack derives the embedding
c′ = argmin Σ_l ‖W_l c′ − W⁰_l c‖² + r‖c′‖² (RECE's eq., `closed_form.derive_embedding`), the embedding that makes a
model with K/V weights W reproduce the original model's keys and values for c, and generates from c′ as
`prompt_embeds`. By default W are the weights of the model under attack (a fresh c′: the honest attack).
`derive_from` takes W from another edit file instead (the RECE paper's figure derives c′ against UCE and tests it on
RECE) or from the base model ("base", a control: c′ ≈ c).

It reports, per concept, the relative residual ‖W′x − W⁰c‖ / ‖W⁰c‖ on the attacked model W′ of the concept's own
embedding (what the erasure changed), of the c′ the edit stored at each RECE iteration, and of the attack's c′.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import closed_form as cf
from ..attack_options import BASE, SELF, DerivedOptions
from ..edit import load_edit
from .common import AttackCase, CaseResult, Target

NAME = "derived"
NEEDS_PROMPTS = False
IMAGES_PER_PROMPT = 10
FAMILIES = None  # closed form on the family's own rows and layers: every family rece knows


@dataclass
class Params(DerivedOptions):
    """The derived attack's parameters (`rece.attack_options`) and how its manifest records them."""

    def resolved(self, target: Target) -> dict:
        """The parameters as the manifest records them (the edit's r filled in, the source edit by checksum)."""
        from ..provenance import file_id

        source = self.derive_from or SELF
        return {
            "regularization": regularization(self, target),
            "regularization_type": edit_config(target).get("regularization_type", "regzero"),
            "derive_from": source if source in (SELF, BASE) else file_id(source),
        }


def edit_config(target: Target) -> dict:
    """The erase config recorded in the attacked edit ({} without an edit)."""
    return (target.edit.metadata.get("config") or {}) if target.edit is not None else {}


def regularization(params: Params, target: Target) -> float:
    """r: the given one, else the edit's, else RECE's default 0.1."""
    if params.regularization is not None:
        return float(params.regularization)
    return float(edit_config(target).get("regularization", 0.1) or 0.1)


def cases(target: Target, params: Params) -> list[AttackCase]:
    """One case per concept; image k of every case uses seed + k."""
    return [AttackCase(i, c, target.seed, c) for i, c in enumerate(target.concepts)]


def full_weights(target: Target, edit=None) -> dict[str, torch.Tensor]:
    """Every K/V weight after `edit` (the attacked edit when None), unedited layers as they were."""
    edited = target.edited_kv if edit is None else edit.edited_kv(target.original_kv, allow_other_base=True)
    return {**target.original_kv, **edited}


def source_weights(target: Target, params: Params) -> tuple[dict[str, torch.Tensor], str]:
    """The weights c′ is derived against, and their name in reports."""
    source = params.derive_from or SELF
    if source == SELF:
        return full_weights(target), "the attacked model"
    if source == BASE:
        return dict(target.original_kv), "the base model"
    other = load_edit(source)
    other.check_base(target.original_kv, allow_other_base=False, source=target.model_name or "the attacked model")
    return full_weights(target, other), f"{other.method} edit {Path(source).name}"


def residuals(target: Target, view, concept: str, concept_rows: torch.Tensor, derived_rows: torch.Tensor) -> dict[str, float]:
    """‖W′x − W⁰c‖/‖W⁰c‖ on the attacked model's layers of one space (the token rows' for a model with several) for
    x = c, the c′ stored at each RECE iteration, and the attack's c′."""
    weights = full_weights(target)
    names = list(view.kv)
    attacked = [weights[n] for n in names]
    originals = [target.original_kv[n] for n in names]
    out = {"concept c": cf.relative_residual(attacked, originals, concept_rows, concept_rows)}
    erased = target.edit.concepts if target.edit is not None else []
    index = erased.index(concept) if concept in erased else None
    for epoch, stored in enumerate(target.edit.derived if index is not None else []):
        if index < stored.shape[0]:
            rows = stored[index, : concept_rows.shape[0]].to(concept_rows)
            out[f"c′ of RECE iteration {epoch + 1} (stored in the edit)"] = cf.relative_residual(
                attacked, originals, rows, concept_rows
            )
    out["attack c′"] = cf.relative_residual(attacked, originals, derived_rows, concept_rows)
    return {k: round(v, 6) for k, v in out.items()}


def prepare(target: Target, params: Params, store: dict, sampling: dict) -> tuple[dict, dict]:
    """Nothing is shared between cases."""
    return {}, {}


def derive_in_space(target: Target, view, weights: dict, concept: str, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the concept's attended rows, c′) in one space: c′ against `weights` on that space's layers."""
    encoder = view.encoder
    count = encoder.token_counts([concept])[0] if view.family.masks_padding else None
    concept_rows = encoder.encode([concept])[0][:count]
    anchor = None
    config = edit_config(target)
    if config.get("regularization_type") == "standard":
        anchor = encoder.encode([config.get("regularization_text", " ")])[0][: concept_rows.shape[0]]
    device = concept_rows.device
    originals = [target.original_kv[n].to(device) for n in view.kv]
    edited = [weights[n].to(device) for n in view.kv]
    return concept_rows, cf.derive_against(concept_rows, edited, originals, r, anchor)


def attack_case(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """Derive c′ for the case's concept in every space the model reads the prompt in, and report the residuals."""
    start = time.perf_counter()
    weights, source = source_weights(target, params)
    r = regularization(params, target)
    views = target.base.views
    derived = [derive_in_space(target, view, weights, case.concept, r) for view in views]
    (concept_rows, rows), length = derived[0], max(derived[0][1].shape[0], views[0].encoder.max_length)
    padded = rows.new_zeros(length, rows.shape[-1])  # rows the model masks stay zero
    padded[: rows.shape[0]] = rows
    tensors = {f"embeds{i}.{case.case_number}": d.to(torch.float32) for i, (_, d) in enumerate(derived) if i > 0}
    if views[0].family.masks_padding:
        tensors[f"attended.{case.case_number}"] = torch.tensor(rows.shape[0])
    info = {
        "derived_against": source,
        "residuals": residuals(target, views[0], case.concept, concept_rows, rows),
        "attack_steps": 1,
        "seconds": round(time.perf_counter() - start, 4),
    }
    prompt = f"c′ of '{case.concept}' derived against {source} (r {r:g})"
    return CaseResult(prompt=prompt, embeds=padded.to(torch.float32), tensors=tensors, info=info)
