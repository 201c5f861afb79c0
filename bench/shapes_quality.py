"""Quality bars of the shapes model, measured with the analytic detector (issue: shapes world).

Prints: prompt following (25 steps); erasing shapes and colours with UCE, RECE and robust mode side by side
(erased rate, other-shape accuracy relative to baseline, colour accuracy of the other prompts, how often the erased
prompts' images still show their prompt's colour (a shape erased) or shape (a colour erased), edit seconds, and how
often a fresh closed-form c′ derived against the edit brings the concept back); and the RECE mechanism: images generated
from the derived embedding c′ after UCE, after RECE, and from a fresh c′ derived against the RECE model.

    HF_HUB_OFFLINE=1 python bench/shapes_quality.py [--model shapes-mmdit] [--per-combo 6] [--steps 25] [--concepts triangle red]
        [--set uce_preserve_scale=0.1 "target= "]   # the recipe (rece.toy.door.erasure_arguments) with settings changed

c′ is derived in every space the model reads the prompt in (shapes-mmdit: the joint rows and the pooled vector).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import rece
from machine import describe
from rece import closed_form as cf
from rece.models import from_pipeline
from rece.pipelines import load_pipeline
from rece.toy.detector import detect
from rece.toy.door import GUIDANCE, erasure_arguments
from rece.toy.evaluate import accuracy, erasure_metrics, generate, grid_prompts
from rece.toy.world import FULL_TEMPLATES, SHAPES


def fresh_derived(base, edit, concept: str, r: float) -> list[torch.Tensor]:
    """c′ derived in closed form against the edited model (the RECE step's derivation, applied once more), one
    [1, L, d] float32 tensor per space the model reads the prompt in."""
    rows = []
    for view in base.views:
        kv = {n: w.to(torch.float64) for n, w in view.kv.items()}
        edited = [edit.edited_weight(n, w) if n in edit.layers else w for n, w in kv.items()]  # --layers: some kept
        rows.append(cf.derive_against(view.encoder.encode([concept])[0], edited, kv.values(), r)[None].float())
    return rows


def repeated(rows: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Each space's rows repeated for n images."""
    return [r.expand(n, -1, -1) for r in rows]


def shows(images: np.ndarray, concept: str) -> float:
    attr = "shape" if concept in SHAPES else "color"
    return float(np.mean([getattr(detect(img), attr) == concept for img in images]))


def setting(text: str) -> tuple[str, float | str]:
    """KEY=VALUE of --set: the value as a number when it reads as one, else as text."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    try:
        return key, float(value)
    except ValueError:
        return key, value


def recipe_of(concept: str, args: argparse.Namespace) -> dict:
    """The model's erasure recipe for `concept`, with the settings of --set."""
    return {**erasure_arguments(concept, args.model), **dict(args.set)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="shapes (the UNet model), shapes-mmdit or shapes-dit")
    parser.add_argument("--per-combo", type=int, default=6)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--concepts", nargs="+", default=["triangle", "cross", "red", "blue"])
    parser.add_argument("--word-only", action="store_true", help="also erase the bare word with the paper's defaults")
    parser.add_argument("--probe-images", type=int, default=24)
    parser.add_argument("--methods", nargs="+", default=["uce", "rece", "robust"], help="erasure methods side by side")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--layers", help="erase only the layers matching this regex (uce / rece; keys 'family@REGEX')")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", type=setting,
        help="override a recipe setting (rece.erase keyword; a number, or text), e.g. uce_preserve_scale=0.1 'target= '",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {"machine": describe()}
    print(results["machine"], flush=True)
    pipe = load_pipeline(args.model)
    base = from_pipeline(pipe, args.model)
    prompts, seeds, shapes, colors = grid_prompts(args.per_combo)
    t = time.time()
    baseline = generate(pipe, prompts, seeds, args.steps, args.guidance)
    acc = accuracy(baseline, shapes, colors)
    acc.pop("detected")
    results["prompt_following"] = acc
    print(
        f"prompt following ({len(seeds)} images, {args.steps} steps, {time.time() - t:.0f} s): "
        f"colour {acc['color']:.3f}, shape {acc['shape']:.3f}, per shape {json.dumps(acc['per_shape'])}"
    )
    # Erasure: each concept with UCE and RECE, measured on the trained template and on held-out ones
    held_out = [t for t in FULL_TEMPLATES if t != "a {color} {shape}"]
    grids = {"a {color} {shape}": (prompts, seeds, shapes, colors, baseline)}
    for k, template in enumerate(held_out, start=1):
        p, s, sh, co = grid_prompts(args.per_combo, seed=10_000 * k, template=template)
        grids[template] = (p, s, sh, co, generate(pipe, p, s, args.steps, args.guidance))
    print(
        f"{'concept':9s} {'method':6s} {'recipe':7s} {'prompts':9s} {'erased':>7s} {'others/base':>11s} {'colours':>8s} "
        f"{'on erased':>9s} {'seconds':>8s} {'fresh c′ r=0.1':>14s} {'r=1e-3':>7s}"
    )
    probe_seeds = list(range(args.probe_images))
    for concept in args.concepts:
        recipes = {"family": recipe_of(concept, args), "word": {"concepts": [concept]}}
        target = recipes["family"]["target"]  # what the erased prompts are drawn like: the floor of the erased rate
        drawn = shows(generate(pipe, [target] * len(probe_seeds), probe_seeds, args.steps, args.guidance), concept)
        results[f"{concept}/target"] = {"target": target, "shows": drawn}
        print(f"{concept}: the recipe's target {target!r} itself shows {concept} in {100 * drawn:.1f} % of {len(probe_seeds)}")
        if args.layers:  # one space of an MMDiT only (e.g. ^context_embedder): which path carries the concept
            recipes = {f"family@{args.layers}": {**recipes["family"], "layers": [args.layers]}}
        for method in args.methods:
            for recipe, settings in recipes.items():
                if recipe == "word" and not args.word_only:
                    continue
                edit = rece.erase(base, method=method, **settings)
                edit.apply(pipe)
                rows = {}
                for template, (p, s, sh, co, base_images) in grids.items():
                    images = generate(pipe, p, s, args.steps, args.guidance)
                    before = erasure_metrics(base_images, sh, co, concept)
                    after = erasure_metrics(images, sh, co, concept)
                    rows[template] = (after, after["other_shape_accuracy"] / max(before["other_shape_accuracy"], 1e-9))
                fresh = {}  # a closed-form c′ derived against this edit (the attack RECE itself uses, once more)
                for r in (0.1, 1e-3):
                    emb = repeated(fresh_derived(base, edit, concept, r), len(probe_seeds))
                    images = generate(pipe, seeds=probe_seeds, prompt_embeds=emb, steps=args.steps, guidance=args.guidance)
                    fresh[f"r={r:g}"] = shows(images, concept)
                edit.revert(pipe)
                for label, keys in (("trained", [list(grids)[0]]), ("held-out", held_out)):
                    erased = float(np.mean([rows[t][0]["erased_rate"] for t in keys]))
                    kept = float(np.mean([rows[t][1] for t in keys]))
                    colours = float(np.mean([rows[t][0]["color_accuracy"] for t in keys]))
                    kept_key = "erased_colours" if concept in SHAPES else "erased_shapes"
                    on_erased = float(np.mean([rows[t][0][kept_key] for t in keys]))
                    results[f"{concept}/{method}/{recipe}/{label}"] = {
                        "erased_rate": erased,
                        "other_shape_kept": kept,
                        "color_accuracy": colours,
                        kept_key: on_erased,
                        "seconds": edit.metadata["seconds"],
                        "fresh_derived": fresh,
                    }
                    print(
                        f"{concept:9s} {method:6s} {recipe:7s} {label:9s} {erased:7.3f} {kept:11.3f} {colours:8.3f} "
                        f"{on_erased:9.3f} {edit.metadata['seconds']:8.3f} {fresh['r=0.1']:14.3f} {fresh['r=0.001']:7.3f}",
                        flush=True,
                    )
    # The RECE mechanism, on the first concept (its word is the first erased text)
    concept = args.concepts[0]
    settings = recipe_of(concept, args)
    uce = rece.erase(base, method="uce", **settings)
    for r, label in ((0.1, "r=0.1"), (1e-3, "r=1e-3")):
        rece_edit = rece.erase(base, method="rece", **{**settings, "regularization": r})
        derived = fresh_derived(base, uce, concept, r)  # c′ of the concept word against UCE: RECE's first epoch's
        fresh = fresh_derived(base, rece_edit, concept, r)
        row = {}
        for name, edit, emb in (
            ("c′ on UCE", uce, derived),
            ("same c′ on RECE", rece_edit, derived),
            ("fresh c′ on RECE", rece_edit, fresh),
        ):
            edit.apply(pipe)
            images = generate(
                pipe,
                seeds=probe_seeds,
                prompt_embeds=repeated(emb, len(probe_seeds)),
                steps=args.steps,
                guidance=args.guidance,
            )
            edit.revert(pipe)
            row[name] = shows(images, concept)
        results[f"derived/{label}"] = row
        print(f"derived embedding, {label}: '{concept}' shown in " + ", ".join(f"{k}: {v:.2f}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
