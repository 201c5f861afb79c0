"""`rece demo`, `generate`, `attack`, `evaluate`, `report`, `sweep`, `robustness` and `toy`: run folders and what they show."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..errors import ReceError
from ..metrics.params import ClipScoreParams, NudenetParams
from ..options import add_option, add_option_groups, add_options, field_of, finite_float, help_of, option_values
from ..toy import door
from .edit_commands import MODEL_HELP, add_erase_arguments, add_pipeline_file_arguments, erase_config


def cmd_demo(args) -> int:
    from ..demo import run_demo

    metrics = run_demo(
        args.output,
        concept=args.concept,
        method=args.method,
        model=args.model,
        per_combo=args.per_combo,
        steps=args.steps,
        guidance=args.guidance,
        overwrite=args.overwrite,
    )
    return 0 if metrics["erased"] else 1  # an edit that erased nothing is a failure, not a demo


def cmd_generate(args) -> int:
    from ..generate import generate_run
    from ..launch import is_secondary_rank
    from ..prompt_sets import load_prompt_set
    from ..runs import IMAGES, expected_images, finished_images

    start = time.perf_counter()
    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "model", "prompts", "output", "edit")}
    options["text_encoders"] = options.pop("text_encoder")
    try:
        out = generate_run(args.model, args.prompts, args.output, edits=args.edit, **options)
    except ReceError:
        if is_secondary_rank():  # every rank gets the same error; one line from rank 0 is enough
            raise SystemExit(2) from None
        raise
    if not is_secondary_rank():
        names = set(expected_images(load_prompt_set(args.prompts, args.limit), args.images_per_prompt))
        done = len(names & finished_images(out / IMAGES))
        seconds = time.perf_counter() - start
        print(f"{done} of {len(names)} images in {out / IMAGES}; manifest.json and prompts.csv in {out} ({seconds:.1f} s)")
    return 0


def add_attack_parameters(p: argparse.ArgumentParser) -> None:
    """One group per attack with its Params' flags; a parameter several attacks take lists each one's default."""
    from ..attacks import ATTACKS

    classes = {name: entry.Params for name, entry in ATTACKS.items()}
    add_option_groups(p, classes, lambda attack, _: f"{attack} parameters (defaults: the paper's)")


def cmd_attack(args) -> int:
    from ..attacks import ATTACKS, residual_table, run_attack
    from ..runs import IMAGES, finished_images, read_manifest

    parameters = {}
    for entry in ATTACKS.values():
        parameters.update(option_values(args, entry.Params))
    start = time.perf_counter()
    out = run_attack(
        args.model, args.edit, args.attack, args.output,
        prompts=args.prompts, concepts=args.concept, seed=args.seed, steps=args.steps, guidance=args.guidance,
        images_per_prompt=args.images_per_prompt, batch_size=args.batch_size, limit=args.limit, device=args.device,
        detector=args.detector, allow_other_base=args.allow_other_base, overwrite=args.overwrite, **parameters,
    )  # fmt: skip
    for concept, name, value in residual_table(out):
        print(f"{concept}: ‖W′x − W⁰c‖/‖W⁰c‖ = {value:.4f} for {name}")
    done = len(finished_images(out / IMAGES))
    seconds = time.perf_counter() - start
    print(f"{done} images in {out / IMAGES}; adversarial.safetensors, prompts.csv, manifest.json in {out} ({seconds:.1f} s)")
    detector = (read_manifest(out).get("attack") or {}).get("detector")
    # without a detector the concepts imply, `rece evaluate` needs one named: print the command that works
    print(f"score it with: rece evaluate {out}" + ("" if detector else " --detector DETECTOR (shapes, nudenet or classify)"))
    return 0


def cmd_evaluate(args) -> int:
    from ..metrics import METRICS, check_metrics, evaluate, results_table

    metrics = check_metrics(args.metric) if args.metric else None
    options = {}
    for entry in METRICS.values():
        options.update(option_values(args, entry.Params))
    results = {run: evaluate(run, metrics, **options) for run in args.runs}
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print(results_table(results))
        print(f"results in {', '.join(os.path.join(r, 'metrics.json') for r in args.runs)}")
    return 0


def cmd_report(args) -> int:
    from ..report import write_report

    out = write_report(args.runs, args.output, max_images=args.max_images)
    print(f"wrote {out} ({len(args.runs)} folder(s))")
    return 0


def key_values(items: list[str] | None, flag: str) -> dict:
    """KEY=VALUE options as a dict (numbers parsed; keys with '-' as '_')."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ReceError(f"{flag} takes KEY=VALUE (got '{item}'), e.g. {flag} iterations=10")
        for kind in (int, float):
            try:
                out[key.replace("-", "_")] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key.replace("-", "_")] = value
    return out


def cmd_sweep(args) -> int:
    from ..sweep import run_sweep, sweep_table

    concept = args.concepts[0] if args.concepts else None
    chosen = args.concept_prompts or args.preserve or args.preserve_prompts or args.target is not None or args.preset
    recipe = None if chosen else door.recipe_for(args.model, args.concepts, args.method or "rece")
    if recipe is not None:
        print(f"shapes model: erasing the prompt family of '{concept}' (rece.toy.door.erasure_arguments)")
    config = erase_config(args, recipe)
    start = time.perf_counter()
    record = run_sweep(
        args.model, config, args.vary.replace("-", "_"), args.values, args.output,
        concept=concept, prompts=args.prompts, preserve_prompts=args.preserve_eval, attack=args.attack,
        attack_parameters=key_values(args.attack_param, "--attack-param"), preserve_metric=args.preserve_metric,
        metric_options={"clip_model": args.clip_model, "threshold": args.threshold}, steps=args.steps,
        guidance=args.guidance, images_per_prompt=args.images, device=args.device, overwrite=args.overwrite,
    )  # fmt: skip
    header, rows = sweep_table(record)
    for row in [header, *rows]:
        print("  ".join(f"{'–' if v is None else (f'{v:.1f}' if isinstance(v, float) else v)!s:>17s}" for v in row))
    out = args.output.rstrip("/")
    print(f"wrote {out}/sweep.json and {out}/sweep.png in {time.perf_counter() - start:.1f} s; "
          f"`rece report {out} -o sweep.html` shows them")  # fmt: skip
    return 0


def cmd_robustness(args) -> int:
    from ..robustness import CSV_FILE, HTML_FILE, not_erased, run_robustness
    from ..robustness_params import RobustnessConfig

    values = {k: v for k, v in option_values(args, RobustnessConfig).items() if v is not None}
    start = time.perf_counter()
    rows = run_robustness(args.model, args.output, methods=args.methods, attacks=args.attacks, **values)
    out = args.output.rstrip("/")
    print(f"{len(rows)} rows in {out}/{CSV_FILE}, the tables in {out}/{HTML_FILE} ({time.perf_counter() - start:.1f} s)")
    for text in not_erased(rows):
        print(f"warning: {text}", file=sys.stderr)
    return 0


def cmd_toy_train(args) -> int:
    from ..toy.train import main as train_main

    return train_main(args.rest)


def add_parsers(sub) -> None:
    """The parsers of demo, generate, attack, sweep, robustness, evaluate, report and toy."""
    _add_demo(sub)
    _add_generate(sub)
    _add_attack(sub)
    _add_sweep(sub)
    _add_robustness(sub)
    _add_evaluate(sub)
    p = sub.add_parser("report", help="one self-contained HTML page comparing run folders: metrics, edits, images side by side")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`rece generate` output folder(s); one column of images each")
    p.add_argument("-o", "--output", required=True, help="HTML file to write (e.g. report.html)")
    p.add_argument("--max-images", type=int, default=16, help="images (same prompt and seed) shown per run (16)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("toy", help="the shapes world: `rece toy train -o DIR [--arch mmdit]` retrains a shipped shapes model")
    p.add_argument("action", choices=["train"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m rece.toy.train (see rece toy train --help)")
    p.set_defaults(func=cmd_toy_train)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="erase a concept from the embedded default model and show before/after")
    p.add_argument(
        "-o", "--output", default="rece-demo", help="folder for report.html, grid.png, metrics.json (default rece-demo)"
    )
    p.add_argument(
        "--concept", default="triangle", help="a shape (circle, square, triangle, cross) or colour (red, green, blue, yellow)"
    )
    p.add_argument("--method", default="rece", help="rece (default), uce, or robust (see docs/robust.md)")
    p.add_argument(
        "--model",
        default="shapes",
        help="shapes (default: the UNet model), shapes-mmdit (the MMDiT), shapes-dit (the PixArt DiT) or a shapes folder",
    )
    p.add_argument("--per-combo", type=int, default=2, help="images per shape × colour prompt")
    p.add_argument("--steps", type=int, default=door.STEPS, help=f"sampling steps ({door.STEPS})")
    p.add_argument("--guidance", type=finite_float, default=None, help=f"classifier-free guidance scale ({door.GUIDANCE:g})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o that is not a rece demo folder")
    p.set_defaults(func=cmd_demo)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate the images of a prompt set into a run folder (resumable, multi-process)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--edit", action="append", default=[], help="edit file to apply first (repeatable, applied in order)")
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt set CSV (I2P, COCO-30k, Imagenette, artists formats) or a known name "
        "(i2p, i2p-nudity, coco-30k, imagenette, artists) found in $RECE_BENCHMARKS (i2p, i2p-nudity: else from the hub)",
    )
    p.add_argument("-o", "--output", required=True, help="run folder: images/, manifest.json, prompts.csv")
    add_sampling_arguments(p, "; a row's evaluation_guidance wins")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per row; image k uses seed + k (1)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call; does not change the images (4)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument(
        "--scheduler", default=None, help="ddim, pndm, euler, euler-a, dpm, heun, ddpm, unipc, lms (default: the model's)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of the set")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--num-processes", type=int, default=1, help="local processes, one device each (rows split i %% N)")
    p.add_argument("--allow-other-base", action="store_true", help="apply edits even if the model is not their base")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in the output folder")
    add_pipeline_file_arguments(
        p,
        "diffusers folder or hub id of the same model, for a single-file checkpoint's configs and tokenizers "
        "(default: the reference hub repository, cached)",
    )
    p.set_defaults(func=cmd_generate)


def add_sampling_arguments(p: argparse.ArgumentParser, guidance_note: str = "") -> None:
    """--steps and --guidance: unset, the model is drawn as its family (or the shapes model) is by default."""
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (shapes {door.STEPS}, else the family's: SD 50)")
    guidance = f"guidance scale (shapes {door.GUIDANCE:g}, else the family's: SD 7.5){guidance_note}"
    p.add_argument("--guidance", type=finite_float, default=None, help=guidance)


def _add_attack(sub) -> None:
    from ..attacks import ATTACKS

    p = sub.add_parser("attack", help=f"red-team an edited model: {', '.join(ATTACKS)}")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--edit", default=None, help="edit file under attack (leave out to attack the original model)")
    p.add_argument("--attack", required=True, help=", ".join(ATTACKS))
    p.add_argument("--prompts", default=None, help="prompt set CSV or known name (all attacks but derived)")
    p.add_argument(
        "-o", "--output", required=True, help="run folder: adversarial.safetensors, prompts.csv, images/, manifest.json"
    )
    p.add_argument("--concept", action="append", default=None, help="concept to attack (default: the edit's concepts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack (and of derived's images: seed + k) (0)")
    add_sampling_arguments(p)
    p.add_argument("--images-per-prompt", type=int, default=None, help="images per case (derived 10, others 1)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (4)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of the prompt set")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--detector", default=None, help="shapes, nudenet or classify (default: what the model and concept imply)")
    p.add_argument("--allow-other-base", action="store_true", help="apply the edit even if the model is not its base")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in the output folder")
    add_attack_parameters(p)
    p.set_defaults(func=cmd_attack)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="vary one erase parameter; plot erased rate, attack success, preservation")
    add_erase_arguments(p)
    p.add_argument("--vary", required=True, help="the parameter: rank, tradeoff, energy, epochs, regularization, lamb, ...")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 0,3,5,10")
    p.add_argument("--prompts", default=None, help="prompt set naming the concept (shapes: built in)")
    p.add_argument("--preserve-eval", default=None, help="prompt set that must keep working, with a 'concept' column for asr")
    p.add_argument("--preserve-metric", default="asr", help="asr (share showing their concept; default) or clip-score")
    for metric, cls, name in (("clip-score", ClipScoreParams, "clip_model"), ("nudenet", NudenetParams, "threshold")):
        add_option(p, field_of(cls, name), f"{metric}: {help_of(field_of(cls, name))}")  # the metric's own flag and default
    p.add_argument("--attack", default="derived", help="attack run on each edit with its defaults (derived)")
    p.add_argument("--attack-param", action="append", default=None, help="KEY=VALUE attack parameter (repeatable)")
    add_sampling_arguments(p)
    p.add_argument("--images", type=int, default=2, help="images per prompt (2)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing sweep in the output folder")
    p.add_argument("-o", "--output", required=True, help="sweep folder: runs, sweep.json, sweep.png")
    p.set_defaults(func=cmd_sweep)


def _add_robustness(sub) -> None:
    from ..robustness_params import RobustnessConfig

    p = sub.add_parser(
        "robustness", help="the attack matrix: erase with each method, run every attack on each edit, one CSV and page"
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("-o", "--output", required=True, help="folder: a run folder per measurement, robustness.csv, .html, .json")
    for name, default in (("methods", "uce rece robust"), ("attacks", "all")):
        listed = field_of(RobustnessConfig, name)
        p.add_argument(
            f"--{name}", nargs="+", default=default.split(), metavar=name[:-1].upper(),
            help=f"{listed.metadata['help']} (default: {default})",
        )  # fmt: skip
    add_options(p, RobustnessConfig)
    p.set_defaults(func=cmd_robustness)


def _add_evaluate(sub) -> None:
    from ..metrics import METRICS

    names = ", ".join(METRICS)
    p = sub.add_parser("evaluate", help=f"measure run folders: {names}")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`rece generate` / `rece attack` folder(s); one table row each")
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        help=f"{names} (repeatable or comma-separated; default: asr for `rece attack` runs, classify for a `class` "
        "column, nudenet for I2P `categories`, shapes for the shapes model)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    add_option_groups(p, {name: entry.Params for name, entry in METRICS.items()}, metric_title)
    p.set_defaults(func=cmd_evaluate)


def metric_title(name: str, params: type) -> str:
    """A metric's heading in `rece evaluate --help`: its name and what it measures (its Params' docstring)."""
    return f"{name}: {params.__doc__.strip()}"
