"""Time per attack step of every `rece attack` attack, on the shapes model (and tiny random pipelines of every
family with --families).

    HF_HUB_OFFLINE=1 python bench/attack_cost.py              # about a minute on one CPU core
    HF_HUB_OFFLINE=1 python bench/attack_cost.py --families   # also tiny SD1, SDXL, PixArt, Sana, FLUX.1 and SD3 pipelines

A step is what each attack repeats: derived, one closed-form derivation of c′ (per concept); ring-a-bell, one
generation of the genetic algorithm (the population's text encodings and the selection, crossover, mutation);
unlearndiff, one optimisation iteration (text encoder + UNet forward and backward); textual-inversion, one
training step (batch × accumulation forward and backward passes); mma, one GCG step (the one-hot gradient and 512
candidates decoded, checked and encoded); inversion, one step of batch 4 (the denoiser forward and backward to the
rows). The times come from the attacks' own timers (recorded in each run's manifest) and leave out loading the model,
drawing target/training/reference images and generating the final images, which are timed separately (seconds per
generated image).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import describe
from rece.attacks import ATTACKS, attack_module, run_attack
from rece.erase import erase
from rece.errors import ReceError
from rece.models import load_model

PARAMS = {
    "derived": {},
    "ring-a-bell": dict(population=200, generations=5, length=16),
    "unlearndiff": dict(iterations=5, timesteps=2, adv_tokens=5),
    "textual-inversion": dict(train_steps=5, train_batch_size=4, gradient_accumulation=1, train_images=4),
    "mma": dict(iterations=5, candidates=512, topk=256, length=20),
    "inversion": dict(train_steps=5, train_batch_size=4, reference_images=4),
}


def tiny_families(work: Path) -> dict[str, Path]:
    """Tiny random pipelines of every family, built in `work` (the tests' builders)."""
    from rece.tiny import build_tiny_sd, build_tiny_sdxl
    from rece.tiny_dit import build_tiny_flux, build_tiny_pixart, build_tiny_sana, build_tiny_sd3

    builders = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "pixart": build_tiny_pixart, "sana": build_tiny_sana,
                "flux": build_tiny_flux, "sd3": build_tiny_sd3}  # fmt: skip
    return {name: build(work / f"tiny-{name}") for name, build in builders.items()}


def step_seconds(run: Path) -> list[float]:
    """Seconds per attack step of each case (and of the shared training, if any) recorded in a run's manifest."""
    attack = json.loads((run / "manifest.json").read_text())["attack"]
    infos = [c["info"] for c in attack["cases"].values()] + [attack.get("shared") or {}]
    return [i["seconds"] / i["attack_steps"] for i in infos if i.get("attack_steps")]


# on the tiny pipelines fewer steps of each: the median per step is what is printed (Sana encodes its long instruction)
FEW = {"ring-a-bell": dict(generations=2), "mma": dict(iterations=2), "inversion": dict(train_steps=3)}


def bench_model(model: str | Path, label: str, concept: str, work: Path, steps: int,
                few: bool = False) -> list[tuple[str, str, float, float]]:  # fmt: skip
    """(model, attack, seconds per attack step, seconds per generated image) for each attack."""
    edit = erase(load_model(model), [concept], method="rece").save(work / f"{label}-edit.safetensors")
    prompts = work / f"{label}-prompts.csv"
    with open(prompts, "w", newline="") as f:
        csv.writer(f).writerows(
            [["case_number", "prompt", "evaluation_seed"], [0, f"a red {concept}", 1], [1, f"a blue {concept}", 2]]
        )
    pairs = work / f"{label}-pairs.csv"
    with open(pairs, "w", newline="") as f:
        csv.writer(f).writerows(
            [["sensitive prompt", "normal prompt"], [f"a red {concept}", "a red circle"], [f"a {concept}", "a square"]]
        )
    rows = []
    for attack in ATTACKS:
        params = {**PARAMS.get(attack, {}), **(FEW.get(attack, {}) if few else {})}
        extra = {"prompts": prompts} if attack_module(attack).NEEDS_PROMPTS else {}
        if attack == "ring-a-bell" and model != "shapes":
            extra["pairs"] = str(pairs)
        start = time.perf_counter()
        try:
            run = run_attack(
                model, edit, attack, work / f"{label}-{attack}", steps=steps, images_per_prompt=2, progress=False,
                overwrite=True, device="cpu", **extra, **params,
            )  # fmt: skip
        except ReceError as exc:  # a family an attack does not run on: said, not timed
            print(f"{label:7s} {attack:18s} refused: {exc}", flush=True)
            continue
        total = time.perf_counter() - start
        per_step = statistics.median(step_seconds(run))
        manifest = json.loads((run / "manifest.json").read_text())["attack"]
        attack_seconds = sum(
            c["info"].get("seconds", 0) + c["info"].get("target_seconds", 0) + c["info"].get("reference_seconds", 0)
            for c in manifest["cases"].values()
        )
        shared = manifest.get("shared") or {}
        attack_seconds += shared.get("seconds", 0) + shared.get("training_images_seconds", 0)
        images = len(list((run / "images").glob("*.png")))
        rows.append((label, attack, per_step, max(0.0, total - attack_seconds) / images))
        print(f"{label:7s} {attack:18s} {per_step * 1000:9.1f} ms/step   ≤ {rows[-1][3]:.2f} s/image (incl. loading)", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", action="store_true", help="also time tiny random pipelines of every family")
    parser.add_argument("--only-families", action="store_true", help="time the tiny pipelines only (not the shapes model)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps of the generated images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="rece-attack-cost-"))
    print(f"{'model':7s} {'attack':18s} {'time per attack step':>20s}")
    if not args.only_families:
        bench_model("shapes", "shapes", "triangle", work, args.steps)
    if args.families or args.only_families:
        for label, folder in tiny_families(work).items():
            bench_model(folder, label, "cat", work, min(args.steps, 4), few=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
