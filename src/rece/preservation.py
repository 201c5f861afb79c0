"""What else an erasure moved: the relative change of each preserved (or held-out) text's keys and values.

For a text with rows p, over every edited layer l: ‖[W′_l p]_l − [W⁰_l p]_l‖ / ‖[W⁰_l p]_l‖. With ΔW_l = W′_l − W⁰_l
this is √(Σ pᵀG_Δp / Σ pᵀG₀p), G_Δ = Σ ΔW_lᵀΔW_l and G₀ = Σ W⁰_lᵀW⁰_l (sums over the text's rows), so a thousand
texts cost two d×d products of their rows, not a pass over every layer each. A shared transform P gives
ΔW_l = W⁰_l(P − I) and G_Δ = (P − I)ᵀG₀(P − I).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it computes: `rece info` describes a report without it
    import torch

WORST = 5  # texts named in a summary
SUM_ROWS = 4096  # rows whose K/V change is computed at once: the sums' working memory is O(SUM_ROWS·d), not O(texts)
CHECK_CHUNK_BYTES = 32 * 2**20  # float64 rows of held-out texts encoded at once (memory flat in their number)


def check_chunk_texts(rows: int, dim: int) -> int:
    """How many held-out texts of `rows` × `dim` rows are encoded and summed at a time."""
    return max(1, CHECK_CHUNK_BYTES // (8 * rows * dim))


EXCESS = 1.0  # a preserved text whose K/V moved by more than their own size is no longer preserved


def delta_gram(gram0: torch.Tensor, transform=None, deltas: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """G_Δ = Σ ΔW_lᵀΔW_l of a space's edit: a shared transform (dense, or factors (L, R) of I + L Rᵀ) or per-layer
    float64 changes."""
    import torch

    if deltas is not None:
        out = torch.zeros_like(gram0)
        for d in deltas.values():
            d = d.to(gram0.device, torch.float64)
            out += d.T @ d
        return out
    if isinstance(transform, tuple):
        left, right = transform
        inner = left.T @ gram0 @ left  # (P − I)ᵀG₀(P − I) = R (LᵀG₀L) Rᵀ
        return right @ inner @ right.T
    change = transform - torch.eye(transform.shape[0], dtype=transform.dtype, device=transform.device)
    return change.T @ gram0 @ change


def text_sums(rows: dict[str, torch.Tensor], gram0: torch.Tensor, gram_delta: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(Σ pᵀG_Δp, Σ pᵀG₀p) over each text's rows: squared K/V change and squared K/V, summed over the layers (SUM_ROWS
    rows at a time)."""
    import torch

    names, out = list(rows), {}
    sizes = [rows[n].shape[0] for n in names]
    start = 0
    while start < len(names):
        stop, count = start, 0
        while stop < len(names) and (count == 0 or count + sizes[stop] <= SUM_ROWS):
            count += sizes[stop]
            stop += 1
        stacked = torch.cat([rows[n] for n in names[start:stop]]).to(gram0.device, torch.float64)
        change = ((stacked @ gram_delta) * stacked).sum(dim=1).split(sizes[start:stop])
        norm = ((stacked @ gram0) * stacked).sum(dim=1).split(sizes[start:stop])
        out.update({n: (c.sum().item(), v.sum().item()) for n, c, v in zip(names[start:stop], change, norm)})
        start = stop
    return out


def merge_sums(*parts: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Add the sums of several spaces (an MMDiT's token rows and pooled vector) text by text."""
    out: dict[str, tuple[float, float]] = {}
    for part in parts:
        for text, (change, norm) in part.items():
            a, b = out.get(text, (0.0, 0.0))
            out[text] = (a + change, b + norm)
    return out


def summary(sums: dict[str, tuple[float, float]]) -> dict | None:
    """{texts, mean, max, worst: [[text, change], ...]} of the relative K/V changes (None when there is no text)."""
    changes = {t: (max(c, 0.0) / n) ** 0.5 for t, (c, n) in sums.items() if n > 0}  # c: a sum of squares, rounding aside
    if not changes:
        return None
    worst = sorted(changes.items(), key=lambda item: -item[1])[:WORST]
    return {
        "texts": len(changes),
        "mean": round(sum(changes.values()) / len(changes), 6),
        "max": round(worst[0][1], 6),
        "worst": [[t, round(v, 6)] for t, v in worst],
    }


def excess(report: dict) -> str | None:
    """A warning when a preserved text's K/V changed by more than 100 % (None otherwise)."""
    part = (report or {}).get("preserved")
    if not part or part["max"] <= EXCESS:
        return None
    text, value = part["worst"][0]
    return (
        f"the preserved texts' keys/values changed by up to {100 * value:.0f} % ('{text[:30]}'), more than 100 %: "
        "this edit does not preserve them; use fewer --epochs"
    )


def describe(report: dict, which: dict[str, str] | None = None) -> list[str]:
    """Lines for `rece info`: each group's mean and max relative K/V change and its worst texts; `which` says what a
    group's texts are ({"preserved": "the preserve texts and ''"})."""
    lines = []
    for group, title in (("preserved", "preserved"), ("check", "check texts")):
        part = report.get(group)
        if not part:
            continue
        worst = ", ".join(f"'{t[:30]}' {v:.3g}" for t, v in part["worst"][:3])
        n = part["texts"]
        texts = f"{n} text{'s' if n != 1 else ''}" + (f" ({which[group]})" if (which or {}).get(group) else "")
        lines.append(f"{title:13s} K/V change over {texts}: mean {part['mean']:.3g}, max {part['max']:.3g} ({worst})")
    warning = excess(report)
    return lines + ([f"warning       {warning}"] if warning else [])
