"""The text summary of an edit (`rece info`, `rece erase`, the demo report)."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import numpy as np

from .preservation import describe

if TYPE_CHECKING:
    import torch

WIDTH = 100  # long lines (a preserve list) wrap between words, under their value's column


def summarize(metadata: dict, transform: torch.Tensor | np.ndarray | None) -> str:
    """What an edit does, in a few aligned lines: concepts, method, parameters, the edit's shape and its base.
    `transform`: the d×d transform of a "transform" edit, a torch tensor or a numpy array (`rece info` reads no torch)."""
    m, c = metadata, metadata["config"]
    lines = [
        f"concepts      {', '.join(unbroken(t) for t in m['concepts'])}",
        f"method        {m['method']}" + (f" (preset {c['preset']})" if c.get("preset") else ""),
        f"target        {concept_targets(m['concepts'], c)}",
        f"preserve      {preserved_texts(c)}",
    ]
    if m["method"] == "rece":
        lines.append(
            f"rece          epochs {c['epochs']}, r {c['regularization']:g} ({c['regularization_type']}), "
            f"λ1 {c['lamb']:g}, λ2 {c['preserve_scale']:g}" + (f", pairing {m['pairing']}" if m.get("pairing") else "")
        )
    if m["method"] == "robust" and "robust" in m:
        lines.extend(robust_lines(m["robust"], c, m.get("preservation") or {}))
    lines.append(
        f"uce           λ {c['uce_lamb']:g}, erase scale {c['uce_erase_scale']:g}, technique {c['technique']}"
        + (f", rows {m['uce_rows']}" if m.get("uce_rows") else "")
    )
    if m["kind"] == "transform":
        kind = f"one {m['base']['dim']}×{m['base']['dim']} transform"
        if transform is not None:  # None: described from metadata alone (a LoRA's record of its edit)
            change = np.asarray(transform, dtype=np.float64) - np.eye(transform.shape[0])
            rank = int(np.linalg.matrix_rank(change))  # the tolerance torch's matrix_rank uses too: σ_max·max(m, n)·ε
            kind += f", rank of M − I {rank}"
    else:
        kind = "per-layer deltas"
    lines.append(f"edit          {kind}, {len(m['edited_layers'])} of {len(m['base']['layers'])} K/V layers")
    lines.append(f"base          {m['base']['source']} (fingerprint {m['base']['fingerprint']}, {m['base']['pipeline']})")
    if m.get("sequence_lengths"):
        lengths = m["sequence_lengths"]
        lines.append(f"T5 rows       erased at {' and '.join(map(str, lengths))} per prompt; rece draws with {lengths[0]}")
    for before in m["base"].get("edits") or []:  # erased from the model with these applied: they come first
        lines.append(f"after edit    {before['path']} ({', '.join(before['concepts'])})")
    empty = " and ''" if c.get("preserve_empty", True) and c["preserve"] else ""
    lines.extend(describe(m.get("preservation") or {}, {"preserved": f"the preserve texts{empty}"}))
    return "\n".join(wrapped(line) for line in lines)


def concept_targets(concepts: list[str], config: dict) -> str:
    """The target line: --target, or each concept's own (--concept-target) as 'concept' → 'target'."""
    targets = config.get("targets") or []
    if not targets:
        return repr(config["target"])
    return ", ".join(unbroken(f"{c!r} → {t!r}") for c, t in zip(concepts, targets))


def robust_lines(robust: dict, config: dict, preservation: dict) -> list[str]:
    """Robust mode's settings and trade-off at a glance: how far the best embedding of all stays from the concept's
    keys/values (0: an attack can bring it back), the fresh c′ residuals, and what the preserved texts paid."""
    c = config
    fresh = {k: v for k, v in robust["fresh_residual"].items() if k != "best"}
    residual = ", ".join(f"{k} {v:.3f}" for k, v in fresh.items())
    lines = [f"robust        rank {robust['rank']} removed; fresh c′ residual {residual} (0 = concept recoverable)"]
    how = [f"projection {c.get('projection', 'keys')}", f"tradeoff μ {c.get('tradeoff', 5.0):g}"]
    how.append("rank fixed" if c.get("rank") is not None else f"rank by energy {c.get('energy', 0.9):g}")
    if c.get("projection", "keys") == "keys" and "support" in c:  # older edits predate these two
        unused = robust.get("unused_removed")
        how.append(f"support {c['support']:g}" + (f" ({unused} unused directions removed)" if unused is not None else ""))
        how.append(f"{c['adversarial_rounds']} adversarial rounds")
    how.append("mapped to target first" if c.get("map_to_target", True) else "projection only")
    how.append("built-in templates" if c.get("templates", True) else "given texts only")
    lines.append("              " + ", ".join(how))
    best = robust["fresh_residual"].get("best")
    if best is not None:  # edits made before it was recorded do not have it
        kept = preservation.get("preserved")
        paid = f"preserved K/V change mean {kept['mean']:.3g}, max {kept['max']:.3g}" if kept else "no preserved text"
        lines.append(f"trade-off     best embedding residual {best:.3f} (any embedding at all), for {paid}")
    return lines


def preserved_texts(config: dict) -> str:
    """The preserve list as the summary shows it: how many, then the texts; '' (UCE's default) said apart."""
    texts, empty = list(config["preserve"]), config.get("preserve_empty", True)
    if not texts:
        return "'' (the empty prompt, UCE's default)" if empty else "-"
    count = f"{len(texts)} text{'s' if len(texts) != 1 else ''}" + (" and '' (UCE's default)" if empty else "")
    return f"{count}: " + ", ".join(unbroken(repr(t)) for t in texts)


def unbroken(text: str) -> str:
    """`text` with its spaces made unbreakable for `wrapped`, so that a list wraps between its items."""
    return text.replace(" ", "\xa0")


def wrapped(line: str) -> str:
    """A summary line wrapped between words at WIDTH, continuation lines under the value's column."""
    filled = textwrap.fill(line, WIDTH, subsequent_indent=" " * 14, break_long_words=False, break_on_hyphens=False)
    return filled.replace("\xa0", " ")
