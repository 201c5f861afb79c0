"""What the unedited shapes models draw when a prompt names no shape or no colour: the floor an attack that leaves the
concept out reaches without bringing it back (docs/robust.md).

    python bench/shapes_floor.py [--images 24] [--models shapes shapes-mmdit]

For each prompt, the share of images the detector reads as each shape and each colour (seeds 5000 on).
"""

from __future__ import annotations

import argparse
import collections

from machine import describe

PROMPTS = (" ", "a photo of", "a shape", "a red shape", "a blue shape")  # no shape named; the first two no colour


def shares(found: list[str], names) -> str:
    """'name %' for each of `names`, in order."""
    counts = collections.Counter(found)
    return " | ".join(f"{100 * counts[n] / len(found):.0f}" for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="images per prompt")
    parser.add_argument("--models", nargs="+", default=["shapes", "shapes-mmdit"])
    args = parser.parse_args()
    print(describe(), flush=True)
    from rece.pipelines import load_pipeline
    from rece.toy.detector import detect
    from rece.toy.evaluate import generate
    from rece.toy.world import COLORS, SHAPES

    header = ["model", "prompt", *(f"{s} %" for s in SHAPES), *(f"{c} %" for c in COLORS)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for model in args.models:
        pipe = load_pipeline(model)
        for prompt in PROMPTS:
            images = generate(pipe, [prompt] * args.images, list(range(5000, 5000 + args.images)))
            found = [detect(image) for image in images]
            row = [model, repr(prompt), shares([f.shape for f in found], SHAPES), shares([f.color for f in found], COLORS)]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
