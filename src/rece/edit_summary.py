"""The text summary of an edit (`rece info`, `rece erase`, the demo report)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .preservation import describe

if TYPE_CHECKING:
    import torch


def summarize(metadata: dict, transform: torch.Tensor | np.ndarray | None) -> str:
    """What an edit does, in a few aligned lines: concepts, method, parameters, the edit's shape and its base.
    `transform`: the d×d transform of a "transform" edit, a torch tensor or a numpy array (`rece info` reads no torch)."""
    m, c = metadata, metadata["config"]
    lines = [
        f"concepts      {', '.join(m['concepts'])}",
        f"method        {m['method']}" + (f" (preset {c['preset']})" if c.get("preset") else ""),
        f"target        {c['target']!r}   preserve {c['preserve'] or '-'}",
    ]
    if m["method"] == "rece":
        lines.append(
            f"rece          epochs {c['epochs']}, r {c['regularization']:g} ({c['regularization_type']}), "
            f"λ1 {c['lamb']:g}, λ2 {c['preserve_scale']:g}"
        )
    if m["method"] == "robust" and "robust" in m:
        r = m["robust"]
        residual = ", ".join(f"{k} {v:.3f}" for k, v in r["fresh_residual"].items())
        lines.append(f"robust        rank {r['rank']} removed; fresh c′ residual {residual} (0 = concept recoverable)")
        how = [f"projection {c.get('projection', 'keys')}", f"tradeoff μ {c.get('tradeoff', 5.0):g}"]
        how.append("rank fixed" if c.get("rank") is not None else f"rank by energy {c.get('energy', 0.9):g}")
        how.append("mapped to target first" if c.get("map_to_target", True) else "projection only")
        how.append("built-in templates" if c.get("templates", True) else "given texts only")
        lines.append("              " + ", ".join(how))
    lines.append(f"uce           λ {c['uce_lamb']:g}, erase scale {c['uce_erase_scale']:g}, technique {c['technique']}")
    if m["kind"] == "transform":
        change = np.asarray(transform, dtype=np.float64) - np.eye(transform.shape[0])
        rank = int(np.linalg.matrix_rank(change))  # the tolerance torch's matrix_rank uses too: σ_max·max(m, n)·ε
        kind = f"one {m['base']['dim']}×{m['base']['dim']} transform, rank of M − I {rank}"
    else:
        kind = "per-layer deltas"
    lines.append(f"edit          {kind}, {len(m['edited_layers'])} of {len(m['base']['layers'])} K/V layers")
    lines.append(f"base          {m['base']['source']} (fingerprint {m['base']['fingerprint']}, {m['base']['pipeline']})")
    lines.extend(describe(m.get("preservation") or {}))
    return "\n".join(lines)
