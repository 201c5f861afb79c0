"""`rece erase`, `apply`, `info` and `lora`: make an edit file, put it into a model, show it, export it as a LoRA."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..config import LORA_TOLERANCE, PRESETS, EraseConfig
from ..elapsed import waited
from ..io import check_not_input, check_output_path, disk_full_reported, read_prompt_file
from ..options import add_options, finite_float, option_values

MODEL_HELP = "diffusers folder, hub id, single-file .safetensors checkpoint, 'shapes', 'shapes-mmdit', 'shapes-dit' or 'tiny'"
TEXT_ENCODER_HELP = (
    "a text encoder file that goes with a single-file MODEL that lacks it (ComfyUI's models/text_encoders: clip_l, "
    "clip_g, t5xxl; repeatable, recognised by its contents)"
)

VAE_HELP = "the VAE file that goes with a single-file MODEL that lacks one (ComfyUI's models/vae, e.g. FLUX.1's ae.safetensors)"


def add_text_encoder_argument(p: argparse.ArgumentParser) -> None:
    """--text-encoder FILE, repeatable."""
    p.add_argument("--text-encoder", action="append", default=[], metavar="FILE", help=TEXT_ENCODER_HELP)


def add_pipeline_file_arguments(p: argparse.ArgumentParser, config_help: str) -> None:
    """What builds a whole pipeline from a single file: --config (its configs, `config_help`), --text-encoder FILE
    (repeatable) and --vae FILE."""
    p.add_argument("--config", default=None, help=config_help)
    add_text_encoder_argument(p)
    p.add_argument("--vae", default=None, metavar="FILE", help=VAE_HELP)


def add_erase_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, every EraseConfig field as a flag (from the config's own defaults and help), and the prompt files."""
    p.add_argument("model", help=MODEL_HELP)
    add_options(p, EraseConfig)
    p.add_argument("--concept-prompts", help="file of more texts to erase: one per line, or a CSV with a 'prompt' column")
    p.add_argument("--preserve-prompts", help="file of more texts to preserve: one per line, or a CSV with a 'prompt' column")
    p.add_argument(
        "--check-prompts",
        help="file of held-out texts (e.g. the concepts' neighbours) whose K/V change is reported in the edit, not preserved",
    )
    p.add_argument("--device", default="cpu", help="torch device for text encoding and the math (cpu, cuda, cuda:1)")
    p.add_argument(
        "--config",
        default=None,
        help="folder or hub id with a single-file checkpoint's tokenizer folders (tokenizer/, tokenizer_2/, ...; default: "
        "the family's reference hub repository, cached)",
    )


def erase_config(args: argparse.Namespace, recipe: dict | None = None) -> EraseConfig:
    """The EraseConfig of the erase options on the command line; `recipe` (the shapes door's) fills in the texts."""
    values = option_values(args, EraseConfig)
    concepts, preserve = values.pop("concepts"), values.pop("preserve")
    if recipe is not None:
        concepts, preserve, values["target"], values["templates"] = (
            recipe["concepts"], recipe["preserve"], recipe["target"], recipe["templates"],
        )  # fmt: skip
        values["targets"] = recipe.get("targets")
        for key in ("regularization", "uce_preserve_scale"):  # the recipe's unless given on the command line
            if key in recipe and values.get(key) is None:
                values[key] = recipe[key]
    if args.concept_prompts:
        if concepts is None and args.preset in PRESETS:  # the file adds to the preset's concepts
            concepts = list(PRESETS[args.preset].get("concepts", []))
        concepts = (concepts or []) + read_prompt_file(args.concept_prompts, "--concept-prompts")
    if args.preserve_prompts:
        preserve = (preserve or []) + read_prompt_file(args.preserve_prompts, "--preserve-prompts")
    if getattr(args, "check_prompts", None):
        values["check"] = (values.get("check") or []) + read_prompt_file(args.check_prompts, "--check-prompts")
    preset = values.pop("preset")
    return EraseConfig.create(concepts, preset, preserve=preserve, **values)


def cmd_erase(args) -> int:
    from ..edit import edited_base
    from ..erase import erase  # the libraries the command needs, before its clock starts: their time is `imports`
    from ..models import load_model
    from ..pipelines import resolve_device

    config = erase_config(args)
    inputs = [args.model, args.concept_prompts, args.preserve_prompts, args.check_prompts, args.config, *args.base_edit,
              *args.text_encoder]  # fmt: skip
    check_output_path(args.output, overwrite=args.overwrite, inputs=inputs)
    device = resolve_device(args.device)
    imports = waited()  # Python's start and the imports: the process start (or main()'s call) to here
    start = time.perf_counter()
    base = edited_base(load_model(args.model, device, config=args.config, text_encoders=args.text_encoder), args.base_edit)
    loaded = time.perf_counter()
    edit = erase(base, config=config, progress=False if args.json or args.quiet else None)
    erased = time.perf_counter()
    edit.save(args.output)
    written = time.perf_counter()
    split = {"imports": imports, "load": loaded - start, "erase": erased - loaded, "write": written - erased}
    seconds = max(waited(), imports + written - start)  # the whole wait (/proc's clock has 10 ms steps)
    if args.json:
        record = {
            "seconds": round(seconds, 4),
            **{f"{part}_seconds": round(value, 4) for part, value in split.items()},
            "concepts": edit.concepts,
            "method": edit.method,
            "output": str(args.output),
            "kind": edit.kind,
            "base_fingerprint": edit.base_fingerprint,
            "preservation": edit.metadata.get("preservation"),
        }
        print(json.dumps(record))
    else:
        print(edit.summary())
        parts = ", ".join(f"{part} {value:.2f} s" for part, value in split.items())
        print(f"wrote {args.output} in {seconds:.2f} s ({parts})")
    return 0


def cmd_apply(args) -> int:
    from ..apply import write_applied_pipeline
    from ..checkpoint import applied_checkpoint, refuse_gguf
    from ..edit import load_edit
    from ..models import load_model

    edits = [load_edit(p) for p in args.edit]
    single = args.format == "single-file" or (args.format is None and str(args.output).endswith(".safetensors"))
    check_not_input(Path(args.output), [args.model, *args.edit, args.config])
    refuse_gguf(args.model)
    if single:
        with disk_full_reported(args.output, lambda: os.path.getsize(args.model)):  # the output is the input's size
            out, rounding = applied_checkpoint(args.model, edits, args.output, args.allow_other_base, args.overwrite)
        concepts = ", ".join(c for e in edits for c in e.concepts)
        print(f"wrote checkpoint {out} with {len(edits)} edit(s): {concepts} (only the edited tensors differ)")
        report_float8(rounding, args.model, args.edit)
        return 0
    # a single file's pipeline is built with its parts below: only the edited weights are read here
    base = load_model(args.model, "cpu", config=args.config, text_encoders=args.text_encoder, text=False)
    out = write_applied_pipeline(
        base, edits, args.output, allow_other_base=args.allow_other_base, overwrite=args.overwrite, config=args.config,
        text_encoders=args.text_encoder, vae=args.vae,
    )  # fmt: skip
    print(f"wrote pipeline {out} with {len(edits)} edit(s): {', '.join(c for e in edits for c in e.concepts)}")
    return 0


FLOAT8_LIMIT = 0.10  # the share of the edit's change that the float8 cast may add before rece points to a LoRA


def report_float8(rounding: dict, model: str, edits: list[str]) -> None:
    """How much of the edit the float8 cast rounded away (the worst layer), and the LoRA route when it is over 10 %."""
    if not rounding:
        return
    name, (dtype, worst) = max(rounding.items(), key=lambda item: item[1][1])
    print(f"float8: written back as {dtype}, the cast adds {worst:.1%} of the edit's own change (worst layer: {name})")
    if worst > FLOAT8_LIMIT:
        print(
            f"note: over {FLOAT8_LIMIT:.0%} of the edit is lost to float8 rounding; ComfyUI applies a LoRA in higher "
            f"precision: rece lora {model} {edits[0]} --format diff -o erased-diff.safetensors"
        )


def cmd_info(args) -> int:
    from ..edit_file import edit_contents, read_edit_arrays
    from ..edit_summary import summarize
    from ..lora_file import describe_lora, lora_info

    lora = lora_info(args.edit) if os.path.isfile(args.edit) else None  # rece's LoRA files too
    if lora is not None:
        print(json.dumps(lora, indent=2) if args.json else describe_lora(lora))
        return 0
    metadata, arrays = read_edit_arrays(args.edit)  # numpy: `rece info` needs no torch
    if args.json:
        print(json.dumps(metadata, indent=2))
        return 0
    transform, _, derived = edit_contents(metadata, arrays)
    print(summarize(metadata, transform))
    m = metadata
    print(f"created       {m['created']} in {m['seconds']} s, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    if derived:
        print(f"derived       {len(derived)} epoch(s) of derived embeddings c′ stored")
    return 0


LORA_HINTS = {
    "kohya": "put it in ComfyUI's models/loras or the web UI's models/Lora",
    "diff": "put it in ComfyUI's models/loras or the web UI's models/Lora",
}


def cmd_lora(args) -> int:
    from ..edit import load_edit
    from ..lora import read_lora_record
    from ..models import load_model

    check_output_path(args.output, overwrite=args.overwrite, inputs=[args.model, args.edit, args.config])
    edit = load_edit(args.edit)
    base = load_model(args.model, "cpu", config=args.config, text=False)  # a LoRA reads the edited weights alone
    edit.to_lora(
        base,
        args.output,
        tolerance=args.tolerance,
        max_rank=args.max_rank,
        allow_other_base=args.allow_other_base,
        format=args.format,
    )
    size = os.path.getsize(args.output) / 2**20
    layers = len(edit.layers)
    if args.format == "diff":
        print(f"wrote {args.output}: the exact change of {layers} layers, {size:.2f} MiB ({LORA_HINTS['diff']})")
        return 0
    record = read_lora_record(args.output)
    rank, exact = record["lora_rank"], record["exact_layers"]
    shown = f"rank {rank}" if rank else "every layer exact"
    hint = base.family.lora_hint if args.format == "diffusers" else LORA_HINTS[args.format]
    print(f"wrote LoRA {args.output}: {shown}, {layers} layers, {size:.2f} MiB ({hint})")
    if exact:
        held = "its exact float32 change (.diff)" if args.format == "kohya" else "its full-rank factors, exact"
        names = ", ".join(exact[:2]) + (", ..." if len(exact) > 2 else "")
        print(f"exact: {len(exact)} of {layers} layers need their full width for --tolerance {args.tolerance:g}; "
              f"each holds {held} ({names})")  # fmt: skip
    if args.format == "kohya" and exact:
        print("note: ComfyUI and Automatic1111 read the .diff keys; diffusers' load_lora_weights does not "
              "(use --format diffusers)")  # fmt: skip
    if args.format == "kohya" and base.family.kohya_comfyui_only:
        print("note: this is for ComfyUI; with diffusers use the default --format diffusers (load_lora_weights)")
    shapes = [edit.metadata["base"]["shapes"][n] for n in edit.layers if n not in exact]
    if args.format == "kohya" and shapes and rank * sum(o + i for o, i in shapes) >= sum(o * i for o, i in shapes):
        print("note: at this rank the factors hold as many numbers as the full change; --format diff is exact and no larger")
    return 0


def add_parsers(sub) -> None:
    """The parsers of erase, apply, info and lora."""
    p = sub.add_parser("erase", help="erase concepts and write an edit file")
    add_erase_arguments(p)
    add_text_encoder_argument(p)
    p.add_argument(
        "--base-edit",
        action="append",
        default=[],
        metavar="EDIT",
        help="erase from MODEL with this edit file applied (repeatable, in order): the new edit then applies after it "
        "(rece apply MODEL EDIT NEW)",
    )
    p.add_argument("-o", "--output", required=True, help="edit file to write (.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("apply", help="write a diffusers pipeline folder, or a single-file checkpoint, with edit(s) applied")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("edit", nargs="+", help="edit file(s), applied in order")
    p.add_argument("-o", "--output", required=True, help="pipeline folder to write, or OUT.safetensors for one checkpoint file")
    p.add_argument(
        "--format",
        choices=("folder", "single-file"),
        default=None,
        help="folder, or single-file: the input checkpoint's layout with only the edited tensors changed "
        "(default: single-file when the output ends in .safetensors)",
    )
    p.add_argument("--allow-other-base", action="store_true", help="apply even if the model is not the edit's base (fine-tunes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_pipeline_file_arguments(
        p,
        "diffusers folder or hub id of the same model, for writing a single file's pipeline folder (default: the "
        "reference hub repository, cached)",
    )
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("info", help="show what an edit file (or a LoRA written by rece lora) contains")
    p.add_argument("edit")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("lora", help="export an edit as LoRA weights (diffusers, kohya) or exact differences")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("edit")
    p.add_argument("-o", "--output", required=True, help="LoRA file to write (.safetensors)")
    p.add_argument(
        "--tolerance",
        type=finite_float,
        default=LORA_TOLERANCE,
        help=f"max relative error of each fused weight against the applied edit ({LORA_TOLERANCE:g}); a layer that needs "
        "its full width is written exactly",
    )
    p.add_argument("--max-rank", type=int, default=None, help="cap on the LoRA rank")
    p.add_argument(
        "--format",
        choices=("diffusers", "kohya", "diff"),
        default="diffusers",
        help="diffusers: PEFT keys for pipe.load_lora_weights (default); kohya: lora_unet_* keys for ComfyUI, "
        "Automatic1111, Forge; diff: kohya-named exact full differences",
    )
    p.add_argument("--allow-other-base", action="store_true", help="export even if the model is not the edit's base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--config", default=None, help="configs for a .ckpt checkpoint")
    p.set_defaults(func=cmd_lora)
