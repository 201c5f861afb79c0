"""ASR of the `rece attack` attacks on the shapes model after erasing a shape with UCE and with RECE.

    HF_HUB_OFFLINE=1 python bench/attack_asr.py                 # about 25 min on one CPU core
    HF_HUB_OFFLINE=1 python bench/attack_asr.py --quick         # a few minutes, much weaker attacks
    HF_HUB_OFFLINE=1 python bench/attack_asr.py --model shapes-mmdit   # the MMDiT: attacks its family does not support print n/a

Erases --concept (triangle) with each of --methods (uce, rece), by default with the shapes model's erasure recipe
(`rece.toy.door.erasure_arguments`, the model's own; `--recipe word` erases the word alone with `rece erase` defaults), then runs
on each edited model: no attack
(the plain prompts), derived (fresh c′, and c′ derived against the UCE edit as in the RECE paper), ring-a-bell,
unlearndiff, textual-inversion, mma and inversion, with the reduced parameters below (the papers' defaults take hours on a CPU).
Every run is scored with `rece evaluate` (asr, shapes detector) and one table row is printed per (attack, method).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch

from machine import describe
from rece.attacks import run_attack
from rece.erase import erase
from rece.errors import ReceError
from rece.generate import generate_run
from rece.metrics import evaluate
from rece.models import load_model
from rece.robustness_params import QUICK_ATTACKS, SHAPES_ATTACKS
from rece.toy.door import erasure_arguments
from rece.toy.world import COLORS, SHAPES

FULL, QUICK = SHAPES_ATTACKS, QUICK_ATTACKS  # the settings `rece robustness` runs the shapes models with


def prompt_set(folder: Path, concept: str) -> Path:
    """Prompts naming the concept: 'a COLOUR SHAPE' and 'a photo of a COLOUR SHAPE' for every colour (a shape) or every
    shape (a colour)."""
    fill = [(color, concept) for color in COLORS] if concept in SHAPES else [(concept, shape) for shape in SHAPES]
    path = folder / "prompts.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "prompt", "evaluation_seed"])
        for i, (template, (color, shape)) in enumerate((t, pair) for t in ("a {} {}", "a photo of a {} {}") for pair in fill):
            writer.writerow([i, template.format(color, shape), 1000 + i])
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="shapes (the UNet model) or shapes-mmdit")
    parser.add_argument("--concept", default="triangle")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--images", type=int, default=4, help="images per prompt (derived: 4 × this per concept)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recipe", choices=("family", "word"), default="family", help="what is erased (see above)")
    parser.add_argument("--methods", nargs="+", default=["uce", "rece"], help="erasure methods to attack")
    parser.add_argument("--attacks", nargs="+", default=None, help="run only these attacks (default: all; no attack always)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe()
    print(machine, flush=True)
    params = QUICK if args.quick else FULL
    work = Path(args.work or tempfile.mkdtemp(prefix="rece-attack-asr-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = prompt_set(work, args.concept)
    base = load_model(args.model)
    edits = {}
    settings = erasure_arguments(args.concept, args.model) if args.recipe == "family" else {"concepts": [args.concept]}
    for method in args.methods:
        edits[method] = erase(base, method=method, **settings).save(work / f"{method}.safetensors")
    common = dict(steps=args.steps, progress=False, overwrite=True, batch_size=8)
    table = []
    plain = dict(steps=args.steps, guidance=4.0, images_per_prompt=args.images, progress=False, overwrite=True, device="cpu")
    original_run = generate_run(args.model, prompts, work / "original-none", **plain)
    original = evaluate(original_run, ["asr"], concept=[args.concept])["asr"]["summary"]["asr %"]
    print(f"{'none (prompts)':24s} {'-':5s} ASR {original:6.1f} %  (the unedited model)", flush=True)
    table.append(("none (prompts)", "original", original, None, None))
    for method, edit in edits.items():
        runs = {}
        start = time.perf_counter()
        runs["none (prompts)"] = generate_run(args.model, prompts, work / f"{method}-none", edits=[edit], **plain)
        seconds = {"none (prompts)": time.perf_counter() - start}
        erased = evaluate(runs["none (prompts)"], ["asr"], concept=[args.concept])["asr"]["summary"]["asr %"]
        if erased >= original:  # every attack row below would measure an erasure that did not happen
            print(f"{method}: erased nothing: the prompts show '{args.concept}' in {erased:.1f} % of the images, "
                  f"the unedited model in {original:.1f} %", flush=True)  # fmt: skip
        # c′ from UCE needs the UCE edit among the methods
        uce = {"derive_from": str(edits["uce"])} if "uce" in edits else None
        from_uce = [("derived (c′ from UCE)", dict(attack="derived", **uce, images_per_prompt=4 * args.images))] if uce else []
        for name, extra in [
            ("derived (fresh c′)", dict(attack="derived", images_per_prompt=4 * args.images)),
            *from_uce,
            ("ring-a-bell", dict(attack="ring-a-bell", prompts=prompts, images_per_prompt=args.images, **params["ring-a-bell"])),
            ("unlearndiff", dict(attack="unlearndiff", prompts=prompts, images_per_prompt=args.images, **params["unlearndiff"])),
            (
                "textual-inversion",
                dict(attack="textual-inversion", prompts=prompts, images_per_prompt=args.images, **params["textual-inversion"]),
            ),
            ("mma", dict(attack="mma", prompts=prompts, images_per_prompt=args.images, **params["mma"])),
            ("inversion", dict(attack="inversion", images_per_prompt=4 * args.images, **params["inversion"])),
        ]:
            if args.attacks and extra["attack"] not in args.attacks:
                continue
            start = time.perf_counter()
            attack = extra.pop("attack")
            folder = work / f"{method}-{name.split()[0]}-{len(runs)}"
            try:
                runs[name] = run_attack(args.model, edit, attack, folder, **common, **extra)
            except ReceError as error:  # an attack that does not support the model's family
                print(f"{name:24s} {method:5s} n/a: {error}", flush=True)
                table.append((name, method, None, None, None))
                continue
            seconds[name] = time.perf_counter() - start
        for name, run in runs.items():
            summary = evaluate(run, ["asr"], concept=[args.concept])["asr"]["summary"]
            table.append((name, method, summary["asr %"], summary["prompt asr %"], seconds[name]))
            print(f"{name:24s} {method:5s} ASR {summary['asr %']:6.1f} %  prompt ASR {summary['prompt asr %']:6.1f} %  "
                  f"{seconds[name]:7.1f} s", flush=True)  # fmt: skip
    (work / "asr.json").write_text(json.dumps({"machine": machine, "rows": table}, indent=1, ensure_ascii=False))
    print(f"runs and asr.json in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
