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
        f"target        {c['target']!r}",
        f"preserve      {preserved_texts(c)}",
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
