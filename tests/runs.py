"""Helpers shared by the tests of run folders (generate, attack): write a prompt CSV, read a run's images."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def pixels(run_dir):
    """{file name: uint8 array} of a run's images."""
    return {p.name: np.asarray(Image.open(p)) for p in sorted((Path(run_dir) / "images").glob("*.png"))}


def killed_at(module, case_number: int, calls: list | None = None):
    """A stand-in for `module.attack_case` that records each case it is given in `calls` and raises KeyboardInterrupt
    at case `case_number` (the run is killed while attacking it)."""
    real = module.attack_case

    def attack_case(target, params, case, shared):
        if calls is not None:
            calls.append(case.case_number)
        if case.case_number == case_number:
            raise KeyboardInterrupt
        return real(target, params, case, shared)

    return attack_case
