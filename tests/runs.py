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
