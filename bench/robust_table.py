"""One table, UCE | RECE | robust side by side on the shapes model, from the outputs of the two benches that measure them.

    HF_HUB_OFFLINE=1 python bench/shapes_quality.py --json quality.json          # erased, preserved, fresh c′, edit s
    HF_HUB_OFFLINE=1 python bench/attack_asr.py --methods uce rece robust --work runs/asr   # attacks (writes asr.json)
    python bench/robust_table.py quality.json runs/asr/asr.json [--concept triangle] [--markdown]

Prints, per method: edit seconds, the share of images showing the concept for the prompts naming it (templates the
recipe names / held-out ones), the other shapes' accuracy relative to the original model, colour accuracy, how often
a fresh closed-form c′ brings the concept back (r = 0.1 / 1e-3), and each attack's success rate, with the robust-mode
issue's bars beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("uce", "rece", "robust")
ATTACKS = (
    "none (prompts)",
    "derived (fresh c′)",
    "derived (c′ from UCE)",
    "ring-a-bell",
    "unlearndiff",
    "textual-inversion",
)
BARS = {
    "prompts naming it (trained / held-out)": "≤ 5 %",
    "other shapes / baseline": "≥ 0.90",
    "colours": "≥ 95 %",
    "fresh c′ (r = 0.1 / 1e-3)": "≤ 5 %",
    "unlearndiff": "≤ 10 %",
    "textual-inversion": "≤ 10 %",
}


def percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def quality_rows(quality: dict, concept: str) -> dict[str, dict[str, str]]:
    """Rows of the erasure measurements (shapes_quality.py --json), one cell per method."""
    rows: dict[str, dict[str, str]] = {}
    for method in METHODS:
        trained = quality.get(f"{concept}/{method}/family/trained")
        held = quality.get(f"{concept}/{method}/family/held-out")
        if trained is None or held is None:
            continue
        fresh = trained.get("fresh_derived", {})
        rows.setdefault("edit seconds", {})[method] = f"{trained['seconds']:.3f}"
        rows.setdefault("prompts naming it (trained / held-out)", {})[method] = (
            f"{percent(trained['erased_rate'])} / {percent(held['erased_rate'])}"
        )
        kept = (trained["other_shape_kept"] + held["other_shape_kept"]) / 2
        rows.setdefault("other shapes / baseline", {})[method] = f"{kept:.2f}"
        colours = (trained["color_accuracy"] + held["color_accuracy"]) / 2
        rows.setdefault("colours", {})[method] = percent(colours)
        if fresh:
            rows.setdefault("fresh c′ (r = 0.1 / 1e-3)", {})[method] = f"{percent(fresh['r=0.1'])} / {percent(fresh['r=0.001'])}"
    return rows


def attack_rows(table: list) -> dict[str, dict[str, str]]:
    """Rows of the attack success rates (attack_asr.py's asr.json: [attack, method, asr %, prompt asr %, seconds])."""
    rows: dict[str, dict[str, str]] = {}
    for name, method, asr, _prompt_asr, _seconds in table:
        label = "no attack (prompts)" if name == "none (prompts)" else name
        rows.setdefault(label, {})[method] = f"{asr:.1f} %"
    return {k: rows[k] for k in [("no attack (prompts)" if a == "none (prompts)" else a) for a in ATTACKS] if k in rows}


def render(rows: dict[str, dict[str, str]], markdown: bool) -> str:
    header = ["", *METHODS, "bar (robust)"]
    lines = [[label, *(cells.get(m, "–") for m in METHODS), BARS.get(label, "")] for label, cells in rows.items()]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quality", type=Path, help="JSON written by bench/shapes_quality.py --json")
    parser.add_argument("attacks", type=Path, nargs="?", help="asr.json written by bench/attack_asr.py")
    parser.add_argument("--concept", default="triangle")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    rows = quality_rows(json.loads(args.quality.read_text()), args.concept)
    if args.attacks is not None:
        rows.update(attack_rows(json.loads(args.attacks.read_text())))
    if not rows:
        parser.error(f"no measurement of '{args.concept}' in {args.quality}")
    print(render(rows, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
