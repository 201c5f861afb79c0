"""`rece demo`: erase a concept from the embedded default model and measure what changed.

Until the trained shapes model ships, the default is `tiny`, a small random-weight SD pipeline built
locally; its images are noise, so the demo measures the cross-attention keys/values directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import closed_form as cf
from .erase import erase
from .io import atomic_file
from .models import load_model

PRESERVED = ("a photo of a dog", "a painting of a house", "a red car", "a portrait of a woman")


def kv_distance(kv: dict, edit, rows: torch.Tensor, reference_rows: torch.Tensor, reference_kv: dict | None = None) -> float:
    """Relative distance between the (edited) keys/values of `rows` and the reference keys/values of `reference_rows`."""
    new = [edit.edited_weight(n, w) if edit else w for n, w in kv.items()]
    ref = list((reference_kv or kv).values())
    return cf.relative_residual(new, ref, rows, reference_rows)


def run_demo(output: str | Path = "rece-demo", concept: str = "nudity", method: str = "rece", model: str = "tiny") -> dict:
    """Erase `concept`, print a before/after table and write OUTPUT/metrics.json."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    base = load_model(model)
    edit = erase(base, [concept], method=method, epochs=2 if method == "rece" else None)
    uce = erase(base, [concept], method="uce") if method == "rece" else edit
    texts = [concept, " "] + list(PRESERVED)
    emb, counts = base.encoder.encode(texts), base.encoder.token_counts(texts)
    c, preserved = emb[0], emb[2:]
    rows, target_rows = cf.uce_token_rows(emb[0], counts[0], emb[1], counts[1])  # the rows UCE maps
    kv = {n: w.to(torch.float64) for n, w in base.kv.items()}
    metrics = {
        "model": base.source,
        "concept": concept,
        "method": method,
        "seconds": edit.metadata["seconds"],
        "before": {
            "concept_to_target": kv_distance(kv, None, rows, target_rows),
            "preserved_change": max(kv_distance(kv, None, p, p) for p in preserved),
        },
        "after": {
            "concept_to_target": kv_distance(kv, edit, rows, target_rows),
            "preserved_change": max(kv_distance(kv, edit, p, p) for p in preserved),
        },
    }
    if method == "rece":
        derived = edit.derived[0][0]  # c′ derived against the UCE-edited model
        metrics["derived_embedding"] = {
            "residual_after_uce": kv_distance(kv, uce, derived, c, kv),
            "residual_after_rece": kv_distance(kv, edit, derived, c, kv),
            "concept_residual_after_uce": kv_distance(kv, uce, c, c, kv),
        }
    with atomic_file(output / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    print(f"erased '{concept}' from {base.source} with {method} in {metrics['seconds']:.2f} s")
    print(f"{'relative key/value distance':44s} {'before':>8s} {'after':>8s}")
    rows = [
        ("concept tokens -> target (lower = erased)", "concept_to_target"),
        ("preserved prompts, change (lower = kept)", "preserved_change"),
    ]
    for label, key in rows:
        print(f"{label:44s} {metrics['before'][key]:8.3f} {metrics['after'][key]:8.3f}")
    if method == "rece":
        d = metrics["derived_embedding"]
        print(
            f"derived c′ reproduces the original concept: residual {d['residual_after_uce']:.3f} after UCE "
            f"(c itself: {d['concept_residual_after_uce']:.3f}), {d['residual_after_rece']:.3f} after RECE"
        )
    print(f"wrote {output / 'metrics.json'}")
    return metrics
