"""The robustness matrix as Markdown, from the CSV `rece robustness` writes (the tables in docs/attacks.md).

    python bench/robustness_table.py runs/shapes-quick [runs/more/robustness.csv ...] [--summary]

A cell of a later file replaces the same cell (model, concept, method, measure) of an earlier one: a folder that
measured one method again (`--methods robust`) updates that method's rows of the whole matrix.

One table per model: a row per concept × method, a column per measure (preservation figures first, then each attack's
ASR), each cell `value (images)`; a missing cell is `–` and counted below the table, so an unfinished matrix is said.
`--summary`: a row per model × method, each cell the mean over the concepts measured (how many, in brackets).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

PRESERVATION = ("named", "others", "colours", "erased_colours", "erased_shapes")
ATTACKS = ("derived", "derived-from-uce", "ring-a-bell", "unlearndiff", "textual-inversion", "mma", "inversion")
METHODS = ("none", "uce", "rece", "robust")


def csv_path(path: str) -> Path:
    """A robustness.csv, given itself or the `rece robustness -o` folder holding it."""
    found = Path(path) / "robustness.csv" if Path(path).is_dir() else Path(path)
    if not found.is_file():
        raise SystemExit(f"error: no robustness.csv at {path}; pass the folder `rece robustness -o` wrote, or its CSV")
    return found


def read_rows(paths: list[str]) -> list[dict]:
    """Every cell of the CSV files (header model,concept,method,measure,value,images), a later file's over an earlier's."""
    cells: dict = {}
    for path in map(csv_path, paths):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                cells[row["model"], row["concept"], row["method"], row["measure"]] = row
    return list(cells.values())


def markdown(rows: list[dict]) -> str:
    """One Markdown table per model, the missing cells counted."""
    out = []
    by_model = defaultdict(dict)
    for r in rows:
        by_model[r["model"]][r["concept"], r["method"], r["measure"]] = r
    for model, cells in by_model.items():
        measures = [m for m in PRESERVATION if any(k[2] == m for k in cells)] + [f"attack:{a}" for a in ATTACKS]
        concepts = list(dict.fromkeys(k[0] for k in cells))
        methods = [m for m in METHODS if any(k[1] == m for k in cells)]
        header = ["concept", "method", *(m.removeprefix("attack:") for m in measures)]
        lines = [f"**{model}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        missing = 0
        for concept in concepts:
            for method in methods:
                values = []
                for m in measures:
                    r = cells.get((concept, method, m))
                    if r is None and not (m == ("erased_colours" if concept in COLOURS else "erased_shapes")):
                        missing += 1
                    values.append("–" if r is None else f"{float(r['value']):.1f} ({r['images']})")
                lines.append("| " + " | ".join([concept, method, *values]) + " |")
        if missing:
            lines += ["", f"{missing} cells not measured yet (–)."]
        out.append("\n".join(lines))
    return "\n\n".join(out)


COLOURS = ("red", "green", "blue", "yellow")  # a colour's prompts are meant to lose it: erased_shapes, no erased_colours


def summary(rows: list[dict]) -> str:
    """One Markdown table: a row per model × method, each measure's mean over the concepts (their count)."""
    values = defaultdict(list)
    for r in rows:
        values[r["model"], r["method"], r["measure"]].append(float(r["value"]))
    measures = [m for m in PRESERVATION if any(k[2] == m for k in values)] + [f"attack:{a}" for a in ATTACKS]
    header = ["model", "method", *(m.removeprefix("attack:") for m in measures)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for method in METHODS:
            cells = [values.get((model, method, m)) for m in measures]
            if any(cells):
                text = ["–" if not c else f"{sum(c) / len(c):.1f} ({len(c)})" for c in cells]
                lines.append("| " + " | ".join([model, method, *text]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="robustness.csv files or the folders holding them")
    parser.add_argument("--summary", action="store_true", help="means over the concepts, a row per model × method")
    args = parser.parse_args()
    rows = read_rows(args.csv)
    print(summary(rows) if args.summary else markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
