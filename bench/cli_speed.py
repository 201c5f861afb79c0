"""Time the `rece` command as a user feels it: whole processes (Python's start, imports, the work, the exit).

    HF_HUB_OFFLINE=1 python bench/cli_speed.py [--cache DIR] [--repeats 5] [--threads 1]

Commands: `rece --help`, `rece info EDIT` and `rece erase MODEL --preset nudity` on the random-weight, full-size
SD1.4 pipeline that `rece.tiny.build_random_sd14` builds once (the model of erase_speed.py). Each command runs
`--repeats` times in a child process (`python -m rece ...`), timed by the wall clock around it; the median is reported.
One untimed run of each comes first (page cache; rece's tokenizer and gram caches, in a temporary $RECE_CACHE), so
the erase rows are what every erasure after the first from a model costs. Beside the erase it prints the split its
`--json` reports (imports: Python's start and the imports; load; erase; write) and what the rest of the wall time is
(printing and the process exit). Another row times first erasures: each run with an empty $RECE_CACHE, so the
tokenizer is read with transformers once and G₀ is computed. The floors close the table: Python's own start, and
Python's start with `import torch` (which every command that computes needs), plain and with the exit of rece's
commands (`gc.freeze()` first: the exit then skips its last walk over every object).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

TARGETS = {"help": 0.5, "info": 1.0, "erase": 3.0}  # seconds, whole process
PARTS = ("imports", "load", "erase", "write")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one child process `python -m rece ARGV` (`python ARGV` when ARGV starts with -c), and its
    stdout; raise on a non-zero exit."""
    start = time.perf_counter()
    command = [sys.executable, *argv] if argv[0] == "-c" else [sys.executable, "-m", "rece", *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"rece {' '.join(argv)} exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def repeat(argv: list[str], env: dict[str, str], repeats: int, fresh_cache: Path | None = None) -> list[tuple[float, str]]:
    """`repeats` timed runs; with `fresh_cache`, each in its own empty $RECE_CACHE below it (a first run)."""
    runs = []
    for i in range(repeats):
        run_env = env if fresh_cache is None else {**env, "RECE_CACHE": str(fresh_cache / f"run{i}")}
        runs.append(timed(argv, run_env))
    return runs


def split_line(runs: list[tuple[float, str]]) -> str:
    """The median of each part `rece erase --json` reports, and of the wall time it does not cover."""
    records = [json.loads(out) for _, out in runs]
    median = {p: statistics.median(r[f"{p}_seconds"] for r in records) for p in PARTS}
    total = statistics.median(r["seconds"] for r in records)
    rest = statistics.median(wall - r["seconds"] for (wall, _), r in zip(runs, records))
    parts = ", ".join(f"{p} {median[p]:.2f}" for p in PARTS)
    return f"    its --json, median: {parts}; seconds {total:.2f}; outside it (printing, exit) {rest:.2f}"


def row(name: str, runs: list[tuple[float, str]], target: float | None) -> str:
    walls = [w for w, _ in runs]
    median = statistics.median(walls)
    verdict = "" if target is None else f"<= {target:g} s: {'met' if median <= target else 'NOT met'}"
    return f"{name:44s}{median:8.2f}   {' '.join(f'{w:.2f}' for w in walls):34s}{verdict}"


def ensure_model(cache: Path) -> None:
    """Build the random SD1.4 pipeline in `cache` once, in a child process (its memory is not this one's)."""
    if (cache / "model_index.json").exists():
        return
    print(f"building random-weight SD1.4 pipeline in {cache} (once) ...", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    code = "import sys; from rece.tiny import build_random_sd14; build_random_sd14(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(cache)], check=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time `rece --help`, `rece info` and `rece erase` as whole processes.")
    parser.add_argument(
        "--cache", type=Path, default=Path("~/.cache/rece/bench-sd14"), help="folder of the random SD1.4 pipeline (built once)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command; the median is reported (5)")
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP/MKL threads of the children (1: steady on a shared machine; 0: as set)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.cache.expanduser().resolve()
    ensure_model(model)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    print(describe())
    threads = env.get("OMP_NUM_THREADS", "torch's default")
    print(f"rece as whole processes (python -m rece), wall seconds, median of {args.repeats}; OMP_NUM_THREADS {threads}")
    with tempfile.TemporaryDirectory(prefix="rece-cli-bench-") as tmp:
        work = Path(tmp)
        env["RECE_CACHE"] = str(work / "cache")
        edit = work / "nudity.safetensors"
        erase = ["erase", str(model), "--preset", "nudity", "-o", str(edit), "--json", "--overwrite"]
        commands = {"help": ["--help"], "erase": erase, "info": ["info", str(edit)]}
        # the floors: Python's start; and torch's import, plain and with the exit rece's commands make (gc.freeze)
        commands.update(python=["-c", "pass"], torch=["-c", "import torch"], frozen=["-c", "import gc, torch; gc.freeze()"])
        for argv in commands.values():  # warm-up: page cache, tokenizer and gram caches, and the edit info reads
            timed(argv, env)
        results = {name: repeat(argv, env, args.repeats) for name, argv in commands.items()}
        first = repeat(erase, env, args.repeats, fresh_cache=work / "first")
    print(f"{'command':44s}{'median':>8s}   {'runs':34s}target")
    print(row("rece --help", results["help"], TARGETS["help"]))
    print(row("rece info EDIT", results["info"], TARGETS["info"]))
    print(row("rece erase SD1.4 --preset nudity", results["erase"], TARGETS["erase"]))
    print(split_line(results["erase"]))
    print(row("rece erase, first run (empty $RECE_CACHE)", first, None))
    print(split_line(first))
    print(row("floor: python -c pass", results["python"], None))
    print(row("floor: python -c 'import torch'", results["torch"], None))
    print(row("floor: ... 'import torch', exit as rece's", results["frozen"], None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
