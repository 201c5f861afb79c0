"""One table, UCE | RECE | robust side by side on the shapes model, from the outputs of the two benches that measure them.

    HF_HUB_OFFLINE=1 python bench/shapes_quality.py --json quality.json          # erased, preserved, fresh c′, edit s
    HF_HUB_OFFLINE=1 python bench/attack_asr.py --methods uce rece robust --work runs/asr   # attacks (writes asr.json)
    python bench/robust_table.py quality.json runs/asr/asr.json [--concept triangle] [--markdown]
    python bench/robust_table.py --model UNet q.json asr.json --model MMDiT q2.json asr2.json   # models side by side

Prints, per method: edit seconds, the share of images showing the concept for the prompts naming it (templates the
recipe names / held-out ones), the other shapes' accuracy relative to the original model, colour accuracy, how often
a fresh closed-form c′ brings the concept back (r = 0.1 / 1e-3), and each attack's success rate, with the robust-mode
issue's bars beside them, and below the table the machine each input file was measured on (as the benches record it).
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
        if "erased_colours" in trained:  # newer measurements: the erased prompts' own colours
            on_erased = (trained["erased_colours"] + held["erased_colours"]) / 2
            rows.setdefault("erased prompts' colours", {})[method] = percent(on_erased)
        if fresh:
            rows.setdefault("fresh c′ (r = 0.1 / 1e-3)", {})[method] = f"{percent(fresh['r=0.1'])} / {percent(fresh['r=0.001'])}"
        if f"{concept}/target" in quality:  # the recipe's target prompt itself: what erased prompts are drawn like
            target = quality[f"{concept}/target"]
            rows.setdefault("target prompt shows it", {})[method] = f"{percent(target['shows'])} ('{target['target']}')"
    return rows


def attack_rows(data: dict | list) -> dict[str, dict[str, str]]:
    """Rows of the attack success rates (attack_asr.py's asr.json: rows of [attack, method, asr %, prompt asr %, seconds])."""
    table = data["rows"] if isinstance(data, dict) else data  # a bare list: written before the benches named their machine
    rows: dict[str, dict[str, str]] = {}
    original = next((row[2] for row in table if row[:2] == ["none (prompts)", "original"]), None)  # unedited model
    for name, method, asr, _prompt_asr, _seconds in table:
        label = "no attack (prompts)" if name == "none (prompts)" else name
        rows.setdefault(label, {})[method] = "n/a" if asr is None else f"{asr:.1f} %"  # n/a: family not supported
        if name == "none (prompts)" and None not in (asr, original) and method != "original" and asr >= original:
            rows[label][method] += " (erased nothing)"  # the attack rows of this method measure no erasure
    return {k: rows[k] for k in [("no attack (prompts)" if a == "none (prompts)" else a) for a in ATTACKS] if k in rows}


def render(rows: dict[str, dict[str, str]], markdown: bool, columns: list[str] | None = None) -> str:
    """The rows as a text or Markdown table; `columns` are the cells' keys (default: the methods) in order."""
    columns = columns or list(METHODS)
    header = ["", *columns, "bar (robust)"]
    lines = [[label, *(cells.get(c, "–") for c in columns), BARS.get(label, "")] for label, cells in rows.items()]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def machines(paths: list[Path]) -> list[str]:
    """One line per input file that names the machine it was measured on (files from older benches name none)."""
    lines = []
    for path in paths:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("machine"):
            lines.append(f"- {path.name}: {data['machine']}")
    return lines


def model_rows(quality: Path, attacks: Path | None, concept: str) -> dict[str, dict[str, str]]:
    """Every row of one model's measurements: the erasure (shapes_quality.py --json) then the attacks (asr.json)."""
    rows = quality_rows(json.loads(quality.read_text()), concept)
    if attacks is not None:
        rows.update(attack_rows(json.loads(attacks.read_text())))
    return rows


def side_by_side(models: list[tuple[str, dict[str, dict[str, str]]]]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Several models' rows merged, each cell keyed 'method LABEL'; rows in the order they first appear."""
    merged: dict[str, dict[str, str]] = {}
    for label, rows in models:
        for name, cells in rows.items():
            merged.setdefault(name, {}).update({f"{m} {label}": v for m, v in cells.items()})
    return merged, [f"{m} {label}" for label, _ in models for m in METHODS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quality", type=Path, nargs="?", help="JSON written by bench/shapes_quality.py --json")
    parser.add_argument("attacks", type=Path, nargs="?", help="asr.json written by bench/attack_asr.py")
    parser.add_argument(
        "--model", nargs="+", action="append", metavar="LABEL QUALITY [ATTACKS]", help="one model's files (repeatable)"
    )
    parser.add_argument("--concept", default="triangle")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    models = [(m[0], Path(m[1]), Path(m[2]) if len(m) > 2 else None) for m in args.model or [] if 2 <= len(m) <= 3]
    if len(models) != len(args.model or []) or (not models and args.quality is None):
        parser.error("pass QUALITY [ATTACKS], or --model LABEL QUALITY [ATTACKS] once per model")
    missing = [str(p) for p in [args.quality, args.attacks, *(f for m in models for f in m[1:])] if p and not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}; pass the --json of shapes_quality.py and attack_asr.py's asr.json")
    if not models:
        rows, columns = model_rows(args.quality, args.attacks, args.concept), None
    else:
        rows, columns = side_by_side([(label, model_rows(q, a, args.concept)) for label, q, a in models])
    if not rows:
        parser.error(f"no measurement of '{args.concept}' in the files given")
    print(render(rows, args.markdown, columns))
    measured = machines([p for p in [args.quality, args.attacks, *(f for m in models for f in m[1:])] if p])
    if measured:
        print("\nmeasured on:\n" + "\n".join(measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
