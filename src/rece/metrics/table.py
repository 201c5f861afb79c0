"""The results table of `rece evaluate` and `rece report`: one row per run, one column per summary value."""

from __future__ import annotations

import math


def results_columns(results: dict[str, dict[str, dict]]) -> list[tuple[str, str, str]]:
    """(metric, summary key, column title) of every summary value of `results`, in first-seen order."""
    columns = []
    for entries in results.values():
        for metric, entry in entries.items():
            for key in entry["summary"]:
                col = key if len(entries) == 1 and len({m for e in results.values() for m in e}) == 1 else f"{metric}: {key}"
                if (metric, key, col) not in columns:
                    columns.append((metric, key, col))
    return columns


def results_rows(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list]]:
    """Header and rows (run name, then raw summary values, None where missing) of the results table."""
    columns = results_columns(results)
    header = ["run"] + [c for _, _, c in columns]
    rows = [[run] + [entries.get(m, {}).get("summary", {}).get(k) for m, k, _ in columns] for run, entries in results.items()]
    return header, rows


def results_table(results: dict[str, dict[str, dict]]) -> str:
    """A plain-text table: one row per run, one column per summary value of each metric (as the paper's tables read)."""
    header, rows = results_rows(results)
    lines = [[row[0]] + [format_value(v, title) for v, title in zip(row[1:], header[1:])] for row in rows]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def format_value(value, title: str = "") -> str:
    """A summary value as every table shows it (terminal and page alike): a percentage (a column titled '... %') with
    2 decimals, any other float with 3 (an LPIPS of 0.123), missing as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if title.endswith("%") else f"{value:.3f}"
    return str(value)
