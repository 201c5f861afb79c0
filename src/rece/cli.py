"""The `rece` command line: erase, apply, info, lora, demo, generate, attack, evaluate, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from .errors import ReceError


def _quiet_libraries(diffusers: bool = True) -> None:
    """Keep the terminal for rece's own output: no library progress bars or advisory logs.

    diffusers=False leaves diffusers unimported (and its logging as is): `rece erase` from a folder or hub id never
    builds a diffusers object, and importing diffusers costs about 80 MB of memory."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if diffusers:
        import diffusers as diffusers_module

        diffusers_module.utils.logging.set_verbosity_error()
        diffusers_module.utils.logging.disable_progress_bar()


def _finite_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def _add_erase_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="diffusers folder, hub id, single-file .safetensors checkpoint, or 'tiny'")
    p.add_argument("--concept", "-c", action="append", default=None, help="concept to erase (repeatable)")
    p.add_argument("--concept-prompts", help="file of more texts to erase: one per line, or a CSV with a 'prompt' column")
    p.add_argument("--preset", help="paper settings: nudity, unsafe, art, object, object-hard")
    p.add_argument("--method", default=None, help="rece (UCE + RECE epochs, default), uce, or robust (no embedding undoes it)")
    p.add_argument("--target", default=None, help="what erased concepts map to (default ' ')")
    p.add_argument("--preserve", action="append", default=None, help="text whose keys/values must not change (repeatable)")
    p.add_argument("--preserve-prompts", help="file of more texts to preserve: one per line, or a CSV with a 'prompt' column")
    p.add_argument("--no-preserve-empty", action="store_true", help="do not add '' to UCE's preserved texts")
    p.add_argument("--epochs", type=int, default=None, help="RECE epochs")
    p.add_argument("--regularization", type=_finite_float, default=None, help="r of the derived embedding")
    p.add_argument("--regularization-type", default=None, help="regzero (default) or standard")
    p.add_argument("--regularization-text", default=None, help="anchor text of 'standard' regularization")
    p.add_argument("--lamb", type=_finite_float, default=None, help="λ1 of the RECE step (0.1)")
    p.add_argument("--erase-scale", type=_finite_float, default=None, help="s_e of the RECE step (1)")
    p.add_argument("--preserve-scale", type=_finite_float, default=None, help="λ2 of the RECE step (0.1)")
    p.add_argument("--uce-lamb", type=_finite_float, default=None, help="λ of the UCE stage (0.5)")
    p.add_argument("--uce-erase-scale", type=_finite_float, default=None, help="s_e of the UCE stage (1)")
    p.add_argument("--uce-preserve-scale", type=_finite_float, default=None, help="s_p of the UCE stage (max(0.1, 1/#preserved))")
    p.add_argument("--technique", default=None, help="replace (default) or tensor")
    p.add_argument("--layers", action="append", default=None, help="edit only K/V layers matching this regex (repeatable)")
    p.add_argument("--rank", type=int, default=None, help="robust: concept directions removed (default: by --energy)")
    p.add_argument("--energy", type=_finite_float, default=None, help="robust: share of the concept's energy removed (0.9)")
    p.add_argument("--projection", default=None, help="robust: keys (default; K/V output directions), oblique, orthogonal")
    p.add_argument("--tradeoff", type=_finite_float, default=None, help="robust keys: weight of preserved energy (5)")
    p.add_argument("--no-map-to-target", action="store_true", help="robust: project only, without UCE's map to the target")
    p.add_argument(
        "--no-templates", action="store_true", help="robust: estimate from the given texts only, not also from built-in templates"
    )
    p.add_argument("--device", default="cpu", help="torch device for text encoding and the math (cpu, cuda, cuda:1)")
    p.add_argument("--config", default=None, help="diffusers folder or hub id with the configs of a single-file checkpoint")


def _erase_config(args):
    """The EraseConfig of the erase options on the command line (`rece erase`, `rece sweep`)."""
    from .erase import PRESETS, EraseConfig
    from .io import read_prompt_file

    concepts, preserve = args.concept, args.preserve
    if args.concept_prompts:
        if concepts is None and args.preset in PRESETS:  # the file adds to the preset's concepts
            concepts = list(PRESETS[args.preset].get("concepts", []))
        concepts = (concepts or []) + read_prompt_file(args.concept_prompts, "--concept-prompts")
    if args.preserve_prompts:
        preserve = (preserve or []) + read_prompt_file(args.preserve_prompts, "--preserve-prompts")
    return EraseConfig.create(
        concepts,
        args.preset,
        method=args.method,
        target=args.target,
        preserve=preserve,
        preserve_empty=False if args.no_preserve_empty else None,
        epochs=args.epochs,
        regularization=args.regularization,
        regularization_type=args.regularization_type,
        regularization_text=args.regularization_text,
        lamb=args.lamb,
        erase_scale=args.erase_scale,
        preserve_scale=args.preserve_scale,
        uce_lamb=args.uce_lamb,
        uce_erase_scale=args.uce_erase_scale,
        uce_preserve_scale=args.uce_preserve_scale,
        technique=args.technique,
        layers=args.layers,
        rank=args.rank,
        energy=args.energy,
        projection=args.projection,
        tradeoff=args.tradeoff,
        map_to_target=False if args.no_map_to_target else None,
        templates=False if args.no_templates else None,
    )


def cmd_erase(args) -> int:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401  (imports outside the timer)

    from .edit import load_edit  # noqa: F401
    from .erase import erase
    from .io import check_output_path
    from .models import load_model

    config = _erase_config(args)
    check_output_path(args.output)
    start = time.perf_counter()
    base = load_model(args.model, args.device, config=args.config)
    loaded = time.perf_counter()
    edit = erase(base, config=config)
    edit.save(args.output)
    seconds = time.perf_counter() - start
    if args.json:
        print(
            json.dumps(
                {
                    "seconds": round(seconds, 4),
                    "load_seconds": round(loaded - start, 4),
                    "erase_seconds": edit.metadata["seconds"],
                    "concepts": edit.concepts,
                    "method": edit.method,
                    "output": str(args.output),
                    "kind": edit.kind,
                    "base_fingerprint": edit.fingerprint,
                }
            )
        )
    else:
        print(edit.summary())
        print(f"wrote {args.output} in {seconds:.2f} s (load {loaded - start:.2f} s, erase {edit.metadata['seconds']:.2f} s)")
    return 0


def cmd_apply(args) -> int:
    from .edit import load_edit, write_applied_pipeline
    from .models import load_model

    edits = [load_edit(p) for p in args.edit]
    base = load_model(args.model, "cpu", config=args.config)
    out = write_applied_pipeline(base, edits, args.output, allow_other_base=args.allow_other_base, overwrite=args.overwrite)
    print(f"wrote pipeline {out} with {len(edits)} edit(s): {', '.join(c for e in edits for c in e.concepts)}")
    return 0


def cmd_info(args) -> int:
    from .edit import load_edit

    edit = load_edit(args.edit)
    if args.json:
        print(json.dumps(edit.metadata, indent=2))
    else:
        print(edit.summary())
        m = edit.metadata
        print(f"created       {m['created']} in {m['seconds']} s, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
        if edit.derived:
            print(f"derived       {len(edit.derived)} epoch(s) of derived embeddings c′ stored")
    return 0


def cmd_lora(args) -> int:
    from .edit import load_edit
    from .io import check_output_path
    from .models import load_model

    check_output_path(args.output)
    edit = load_edit(args.edit)
    base = load_model(args.model, "cpu", config=args.config)
    state = edit.to_lora(
        base, args.output, tolerance=args.tolerance, max_rank=args.max_rank, allow_other_base=args.allow_other_base
    )
    rank = next(iter(state.values())).shape[0]
    size = os.path.getsize(args.output) / 2**20
    print(f"wrote LoRA {args.output}: rank {rank}, {len(state) // 2} layers, {size:.2f} MiB (load with pipe.load_lora_weights)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(
        args.output,
        concept=args.concept,
        method=args.method,
        model=args.model,
        per_combo=args.per_combo,
        steps=args.steps,
        guidance=args.guidance,
    )
    return 0


def cmd_generate(args) -> int:
    from .generate import IMAGES, expected_images, finished_images, generate_run, load_prompt_set

    start = time.perf_counter()
    secondary = os.environ.get("RANK", "0") not in ("", "0")  # under accelerate launch / torchrun, rank 0 reports
    try:
        out = generate_run(
            args.model,
            args.prompts,
            args.output,
            edits=args.edit,
            steps=args.steps,
            guidance=args.guidance,
            images_per_prompt=args.images_per_prompt,
            batch_size=args.batch_size,
            height=args.height,
            width=args.width,
            scheduler=args.scheduler,
            limit=args.limit,
            device=args.device,
            num_processes=args.num_processes,
            allow_other_base=args.allow_other_base,
            overwrite=args.overwrite,
            config=args.config,
        )
    except ReceError:
        if secondary:  # every rank gets the same error; one line from rank 0 is enough
            raise SystemExit(2) from None
        raise
    if not secondary:
        names = set(expected_images(load_prompt_set(args.prompts, args.limit), args.images_per_prompt))
        done = len(names & finished_images(out / IMAGES))
        seconds = time.perf_counter() - start
        print(f"{done} of {len(names)} images in {out / IMAGES}; manifest.json and prompts.csv in {out} ({seconds:.1f} s)")
    return 0


def cmd_evaluate(args) -> int:
    from .metrics import check_metrics, evaluate, results_table

    metrics = check_metrics(args.metric) if args.metric else None
    options = dict(
        threshold=args.threshold,
        clip_model=args.clip_model,
        reference=args.reference,
        fid_features=args.fid_features,
        fid_weights=args.fid_weights,
        against=args.against,
        lpips_weights=args.lpips_weights,
        classifier_weights=args.classifier_weights,
        class_names=args.class_names,
        resize=args.classifier_resize,
        batch_size=args.batch_size,
        device=args.device,
        concept=args.concept,
        detector_kind=args.detector,
    )
    results = {run: evaluate(run, metrics, **options) for run in args.runs}
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print(results_table(results))
        print(f"results in {', '.join(os.path.join(r, 'metrics.json') for r in args.runs)}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    out = write_report(args.runs, args.output, max_images=args.max_images)
    print(f"wrote {out} ({len(args.runs)} folder(s))")
    return 0


ATTACK_OPTIONS = {
    "derived": (
        ("--regularization", _finite_float, "r of the derivation (default: the edit's own, 0.1 for RECE presets)"),
        ("--derive-from", str, "derive c′ against: self (the attacked model, default), base, or another edit file"),
    ),
    "ring-a-bell": (
        ("--eta", _finite_float, "strength η of the concept vector (3; the paper uses 3 for nudity, 5.5 for violence)"),
        ("--length", int, "K, tokens of the hard prompt (16; the paper also uses 38 and 77)"),
        ("--population", int, "genetic algorithm population (200)"),
        ("--generations", int, "genetic algorithm generations (3000)"),
        ("--mutation-rate", _finite_float, "chance that a prompt gets one random token (0.25)"),
        ("--crossover-rate", _finite_float, "chance that a parent has two children (0.5)"),
        ("--pairs", str, "CSV of 'sensitive prompt','normal prompt' pairs for the concept vector (shapes: built in)"),
    ),
    "unlearndiff": (
        ("--iterations", int, "optimisation steps per sampled timestep (40)"),
        ("--lr", _finite_float, "learning rate (unlearndiff 0.01; textual-inversion 5e-3, scaled by batch × accumulation)"),
        ("--weight-decay", _finite_float, "Adam weight decay (0.1)"),
        ("--adv-tokens", int, "adversarial tokens prepended to each prompt (5)"),
        ("--timesteps", int, "evenly spaced timesteps visited in turn (50)"),
        ("--target-run", str, "a `rece generate` run of the original model whose images are the targets (default: drawn here)"),
    ),
    "textual-inversion": (
        ("--train-steps", int, "optimisation steps (5000)"),
        ("--train-batch-size", int, "images per step (4)"),
        ("--gradient-accumulation", int, "batches per step (4)"),
        ("--no-scale-lr", None, "use --lr as is (default: lr × batch × accumulation, as CCE's --scale_lr)"),
        ("--train-images", int, "training images drawn by the original model from the prompt set (25)"),
        ("--images", str, "folder of images of the concept to train on instead"),
        ("--initializer", str, "word the new embedding starts from (default: the concept)"),
        ("--placeholder", str, "the new word (default: <concept>)"),
    ),
}


def _attack_parameters(args) -> dict:
    """The attack parameters given on the command line (None: the attack's default)."""
    values = {}
    for options in ATTACK_OPTIONS.values():
        for flag, _, _ in options:
            dest = flag[2:].replace("-", "_")
            if dest == "no_scale_lr":
                values["scale_lr"] = False if args.no_scale_lr else None
            else:
                values[dest] = getattr(args, dest)
    return values


def cmd_attack(args) -> int:
    from .attacks import residual_table, run_attack
    from .generate import IMAGES, finished_images

    start = time.perf_counter()
    out = run_attack(
        args.model,
        args.edit,
        args.attack,
        args.output,
        prompts=args.prompts,
        concepts=args.concept,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        detector=args.detector,
        allow_other_base=args.allow_other_base,
        overwrite=args.overwrite,
        **_attack_parameters(args),
    )
    for concept, name, value in residual_table(out):
        print(f"{concept}: ‖W′x − W⁰c‖/‖W⁰c‖ = {value:.4f} for {name}")
    done = len(finished_images(out / IMAGES))
    seconds = time.perf_counter() - start
    print(f"{done} images in {out / IMAGES}; adversarial.safetensors, prompts.csv, manifest.json in {out} ({seconds:.1f} s)")
    print(f"score it with: rece evaluate {out}")
    return 0


def _shapes_recipe(args) -> bool:
    """`rece sweep shapes --concept triangle`: fill in the shapes model's erasure recipe unless the user chose texts."""
    from .toy.evaluate import erasure_arguments
    from .toy.world import COLORS, SHAPES

    chosen = args.concept_prompts or args.preserve or args.preserve_prompts or args.target is not None or args.preset
    if args.model != "shapes" or chosen or not args.concept or len(args.concept) != 1:
        return False
    if args.concept[0] not in SHAPES and args.concept[0] not in COLORS:
        return False
    recipe = erasure_arguments(args.concept[0])
    args.concept, args.preserve, args.target = recipe["concepts"], recipe["preserve"], recipe["target"]
    args.no_templates = not recipe["templates"]
    if args.regularization is None:
        args.regularization = recipe["regularization"]
    return True


def _key_values(items: list[str] | None, flag: str) -> dict:
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
    from .sweep import run_sweep, sweep_table

    concept = args.concept[0] if args.concept else None
    if _shapes_recipe(args):
        print(f"shapes model: erasing the prompt family of '{concept}' (rece.toy.evaluate.erasure_arguments)")
    config = _erase_config(args)
    start = time.perf_counter()
    record = run_sweep(
        args.model,
        config,
        args.vary.replace("-", "_"),
        args.values,
        args.output,
        concept=concept,
        prompts=args.prompts,
        preserve_prompts=args.preserve_eval,
        attack=args.attack,
        attack_parameters=_key_values(args.attack_param, "--attack-param"),
        preserve_metric=args.preserve_metric,
        metric_options={"clip_model": args.clip_model, "threshold": args.threshold},
        steps=args.steps,
        guidance=args.guidance,
        images_per_prompt=args.images,
        device=args.device,
        overwrite=args.overwrite,
    )
    header, rows = sweep_table(record)
    for row in [header, *rows]:
        print("  ".join(f"{'–' if v is None else (f'{v:.1f}' if isinstance(v, float) else v)!s:>17s}" for v in row))
    out = args.output.rstrip("/")
    print(f"wrote {out}/sweep.json and {out}/sweep.png in {time.perf_counter() - start:.1f} s; "
          f"`rece report {out} -o sweep.html` shows them")  # fmt: skip
    return 0


def cmd_toy_train(args) -> int:
    from .toy.train import main as train_main

    return train_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rece", description="Closed-form concept erasure for Stable Diffusion models (RECE).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("erase", help="erase concepts and write an edit file")
    _add_erase_args(p)
    p.add_argument("-o", "--output", required=True, help="edit file to write (.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("apply", help="write a diffusers pipeline folder with edit(s) applied")
    p.add_argument("model")
    p.add_argument("edit", nargs="+", help="edit file(s), applied in order")
    p.add_argument("-o", "--output", required=True, help="pipeline folder to write")
    p.add_argument("--allow-other-base", action="store_true", help="apply even if the model is not the edit's base (fine-tunes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--config", default=None, help="configs for a single-file checkpoint")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("info", help="show what an edit file contains")
    p.add_argument("edit")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("lora", help="export an edit as LoRA weights for pipe.load_lora_weights")
    p.add_argument("model")
    p.add_argument("edit")
    p.add_argument("-o", "--output", required=True, help="LoRA file to write (.safetensors)")
    p.add_argument("--tolerance", type=_finite_float, default=1e-3, help="max relative error per edited weight (1e-3)")
    p.add_argument("--max-rank", type=int, default=None)
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--config", default=None)
    p.set_defaults(func=cmd_lora)

    p = sub.add_parser("demo", help="erase a concept from the embedded default model and show before/after")
    p.add_argument(
        "-o", "--output", default="rece-demo", help="folder for report.html, grid.png, metrics.json (default rece-demo)"
    )
    p.add_argument(
        "--concept", default="triangle", help="a shape (circle, square, triangle, cross) or colour (red, green, blue, yellow)"
    )
    p.add_argument("--method", default="rece", help="rece (default), uce, or robust (see docs/robust.md)")
    p.add_argument("--model", default="shapes", help="the shapes model (default) or a folder of one")
    p.add_argument("--per-combo", type=int, default=2, help="images per shape × colour prompt")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=_finite_float, default=None, help="classifier-free guidance scale")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate the images of a prompt set into a run folder (resumable, multi-process)")
    p.add_argument("model", help="diffusers folder, hub id, single-file checkpoint, 'shapes' or 'tiny'")
    p.add_argument("--edit", action="append", default=[], help="edit file to apply first (repeatable, applied in order)")
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt set CSV (I2P, COCO-30k, Imagenette, artists formats) or a known name "
        "(i2p, i2p-nudity, coco-30k, imagenette, artists) found in $RECE_BENCHMARKS (i2p, i2p-nudity: else from the hub)",
    )
    p.add_argument("-o", "--output", required=True, help="run folder: images/, manifest.json, prompts.csv")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (50)")
    p.add_argument("--guidance", type=_finite_float, default=7.5, help="guidance scale (7.5); a row's evaluation_guidance wins")
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
    p.add_argument("--config", default=None, help="configs for a single-file checkpoint")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("attack", help="red-team an edited model: derived, ring-a-bell, unlearndiff, textual-inversion")
    p.add_argument("model", help="diffusers folder, hub id, single-file checkpoint, 'shapes' or 'tiny'")
    p.add_argument("--edit", default=None, help="edit file under attack (leave out to attack the original model)")
    p.add_argument("--attack", required=True, help="derived, ring-a-bell, unlearndiff or textual-inversion")
    p.add_argument("--prompts", default=None, help="prompt set CSV or known name (all attacks but derived)")
    p.add_argument(
        "-o", "--output", required=True, help="run folder: adversarial.safetensors, prompts.csv, images/, manifest.json"
    )
    p.add_argument("--concept", action="append", default=None, help="concept to attack (default: the edit's concepts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack (and of derived's images: seed + k) (0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (shapes 25, else 50)")
    p.add_argument("--guidance", type=_finite_float, default=None, help="guidance scale (shapes 4, else 7.5)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="images per case (derived 10, others 1)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (4)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of the prompt set")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--detector", default=None, help="shapes, nudenet or classify (default: what the model and concept imply)")
    p.add_argument("--allow-other-base", action="store_true", help="apply the edit even if the model is not its base")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in the output folder")
    for attack, options in ATTACK_OPTIONS.items():
        group = p.add_argument_group(f"{attack} parameters (defaults: the paper's)")
        for flag, kind, text in options:
            if kind is None:
                group.add_argument(flag, action="store_true", help=text)
            else:
                group.add_argument(flag, type=kind, default=None, help=text)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("sweep", help="vary one erase parameter; plot erased rate, attack success, preservation")
    _add_erase_args(p)
    p.add_argument("--vary", required=True, help="the parameter: rank, tradeoff, energy, epochs, regularization, lamb, ...")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 0,3,5,10")
    p.add_argument("--prompts", default=None, help="prompt set naming the concept (shapes: built in)")
    p.add_argument("--preserve-eval", default=None, help="prompt set that must keep working, with a 'concept' column for asr")
    p.add_argument("--preserve-metric", default="asr", help="asr (share showing their concept; default) or clip-score")
    p.add_argument("--clip-model", default=None, help="clip-score: CLIP folder or hub id (openai/clip-vit-large-patch14)")
    p.add_argument("--threshold", type=_finite_float, default=None, help="nudenet: detection score threshold (0.6)")
    p.add_argument("--attack", default="derived", help="attack run on each edit with its defaults (derived)")
    p.add_argument("--attack-param", action="append", default=None, help="KEY=VALUE attack parameter (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (shapes 25, else 50)")
    p.add_argument("--guidance", type=_finite_float, default=None, help="guidance scale (shapes 4, else 7.5)")
    p.add_argument("--images", type=int, default=2, help="images per prompt (2)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing sweep in the output folder")
    p.add_argument("-o", "--output", required=True, help="sweep folder: runs, sweep.json, sweep.png")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="measure run folders: nudenet, clip-score, fid, lpips, classify (the paper's metrics)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`rece generate` output folder(s); one table row each")
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        help="nudenet, clip-score, fid, lpips, classify, shapes, asr (repeatable or comma-separated; default: asr for "
        "`rece attack` runs, classify for a `class` column, nudenet for I2P `categories`, shapes for the shapes model)",
    )
    p.add_argument("--concept", action="append", default=None, help="shapes / asr: the concept to look for (default: the run's)")
    p.add_argument("--detector", default=None, help="asr: shapes, nudenet or classify (default: the attack's)")
    p.add_argument("--threshold", type=_finite_float, default=None, help="nudenet: detection score threshold (0.6)")
    p.add_argument(
        "--clip-model", default=None, help="clip-score / fid clip features: CLIP folder or hub id (openai/clip-vit-large-patch14)"
    )
    p.add_argument("--reference", default=None, help="fid: folder of reference images")
    p.add_argument("--fid-features", default=None, help="fid: inception (pytorch-fid's weights) or clip")
    p.add_argument("--fid-weights", default=None, help="fid: local pt_inception-2015-12-05 weights file (default: downloaded)")
    p.add_argument("--against", default=None, help="lpips: the run folder to compare with, images matched by file name")
    p.add_argument("--lpips-weights", default=None, help="lpips: LPIPS(net='alex').state_dict() file (default: downloaded)")
    p.add_argument("--classifier-weights", default=None, help="classify: torchvision ResNet-50 state dict (default: downloaded)")
    p.add_argument(
        "--class-names", default=None, help="classify: text file of the 1000 ImageNet names (default: Imagenette's ten)"
    )
    p.add_argument(
        "--classifier-resize",
        type=int,
        default=None,
        help="classify: shorter side before the 224 crop (232: IMAGENET1K_V2; 256: V1)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (16)")
    p.add_argument("--device", default=None, help="torch device for the models (cpu)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="one self-contained HTML page comparing run folders: metrics, edits, images side by side")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`rece generate` output folder(s); one column of images each")
    p.add_argument("-o", "--output", required=True, help="HTML file to write (e.g. report.html)")
    p.add_argument("--max-images", type=int, default=16, help="images (same prompt and seed) shown per run (16)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("toy", help="the shapes world: `rece toy train -o DIR` retrains the shipped shapes model")
    p.add_argument("action", choices=["train"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m rece.toy.train (see rece toy train --help)")
    p.set_defaults(func=cmd_toy_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # erase and info read safetensors and transformers only, unless MODEL is a single-file checkpoint (diffusers)
    light = args.func in (cmd_erase, cmd_info) and not str(getattr(args, "model", "")).endswith((".safetensors", ".ckpt"))
    _quiet_libraries(diffusers=not light)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = args.func(args)
        except ReceError as exc:
            code = 2
            print(f"error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted; nothing partial was written", file=sys.stderr)
            code = 130
        finally:
            from .text import TruncationWarning

            for w in caught:
                if issubclass(w.category, TruncationWarning):
                    print(f"warning: {w.message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
