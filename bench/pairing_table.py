"""RECE's pairing on a masked encoder, compared (docs/method.md): one `rece robustness` run per `--pairing`, as a table.

    for p in position attended unshared; do
      rece robustness shapes-dit --concept circle ... --concept yellow --methods uce rece \\
          --attacks derived derived-from-uce --quick --erase-option pairing=$p -o runs/pair-$p
    done
    python bench/pairing_table.py runs/pair-position runs/pair-attended runs/pair-unshared

A row per concept × method (UCE from the first run: the pairing changes RECE's step only), then the means over the
concepts. A run made with `--erase-option uce_rows=…` changes UCE's stage too: its UCE rows are shown, labelled.
`erased prompts keep`: their colour when a shape is erased, their shape when a colour is.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

MEASURES = ("named", "others", "colours", "kept", "attack:derived", "attack:derived-from-uce")
HEADER = ("named", "others", "colours", "erased prompts keep", "fresh c′", "c′ from UCE")


def run_label(options: dict) -> str:
    """What a run changed, for its rows' labels: its pairing, and its UCE rows when set ("unshared, UCE rows last")."""
    rows = [f"UCE rows {options['uce_rows']}"] if "uce_rows" in options else []
    return ", ".join([options.get("pairing", "default"), *rows])


def run_cells(folder: Path, first: bool) -> dict:
    """{(concept, labelled method, measure): value} of a run; UCE's rows from the first run and the runs that set
    `uce_rows` only."""
    options = json.loads((folder / "robustness.json").read_text())["settings"].get("erase_options") or {}
    label, own_uce = run_label(options), "uce_rows" in options
    cells = {}
    with open(folder / "robustness.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            method, measure = row["method"], row["measure"]
            if method == "none" or (method == "uce" and not (first or own_uce)):
                continue
            if measure in ("erased_colours", "erased_shapes"):
                measure = "kept"
            name = f"uce (UCE rows {options['uce_rows']})" if method == "uce" and own_uce else method
            cells[row["concept"], name if method == "uce" else f"{method} ({label})", measure] = float(row["value"])
    return cells


def table(cells: dict, methods: list[str], concepts: list[str]) -> list[str]:
    lines = ["| concept | method | " + " | ".join(HEADER) + " |", "|---|---|" + "---|" * len(HEADER)]
    means = defaultdict(list)
    for concept in concepts:
        for method in methods:
            values = [cells.get((concept, method, m)) for m in MEASURES]
            for m, v in zip(MEASURES, values):
                if v is not None:
                    means[method, m].append(v)
            text = ["–" if v is None else f"{v:.0f}" for v in values]
            lines.append(f"| {concept} | {method} | " + " | ".join(text) + " |")
    lines += ["", "| method | " + " | ".join(HEADER) + " |", "|---|" + "---|" * len(HEADER)]
    for method in methods:
        text = [f"{sum(v) / len(v):.0f}" if (v := means.get((method, m))) else "–" for m in MEASURES]
        lines.append(f"| {method} | " + " | ".join(text) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="rece robustness folders, one per --erase-option")
    args = parser.parse_args()
    cells, methods = {}, ["uce"]
    for i, folder in enumerate(args.runs):
        found = run_cells(folder, i == 0)
        cells.update(found)
        methods += sorted({k[1] for k in found} - set(methods), key=lambda m: (not m.startswith("uce"), m))
    concepts = list(dict.fromkeys(k[0] for k in cells))
    print("\n".join(table(cells, methods, concepts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
