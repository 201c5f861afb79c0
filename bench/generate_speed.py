"""Images per second of `rece generate` against a plain diffusers loop over the same prompts, seeds and settings.

    HF_HUB_OFFLINE=1 python bench/generate_speed.py                        # tiny SD pipeline on the CPU (~1 min)
    HF_HUB_OFFLINE=1 python bench/generate_speed.py --model ./sd-v1-4 --device cuda --steps 50 --height 512 --width 512

Both contenders use one pipeline object, loaded once (float32, no safety checker, as `rece generate` loads it), so
model loading is left out of both. `rece generate` is `rece.generate.generate_run(pipe, ...)`: everything it does
per run is timed (prompt set check and hash, K/V fingerprint, manifest and prompts.csv, resume scan, batching,
one CPU generator per image, atomic PNG writes). The plain loop reads the same CSV rows, calls the pipeline on
batches of the same size with one `torch.Generator("cpu").manual_seed(seed)` per image and saves each image as PNG.
Each repeat writes into a fresh folder. After `--warmup` untimed rounds, the contenders alternate for `--repeats`
rounds (so a busy machine slows both alike); the medians give the rates and the overhead
(rece seconds / plain seconds - 1), target ≤ 5 %. The images of both must be identical (same seeds).

Default model: a tiny random SD1.x pipeline built by `rece.tiny.build_tiny_sd` in a temporary folder (or `--cache`).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from machine import describe

TARGET_OVERHEAD = 0.05
WORDS = ("red", "green", "blue", "yellow", "circle", "square", "triangle", "cat", "dog", "car", "tree", "house")


def write_prompt_set(path: Path, count: int) -> Path:
    """A prompt set CSV of `count` rows (case_number, prompt, evaluation_seed) in the I2P layout."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "prompt", "evaluation_seed"])
        for i in range(count):
            writer.writerow([i, f"a {WORDS[i % 4]} {WORDS[4 + i % len(WORDS[4:])]} in a painting", 1000 + i])
    return path


def sync(device: str) -> None:
    """Wait for queued GPU work so that timers measure it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_rece(pipe, prompts: Path, out: Path, opts: dict) -> float:
    """Seconds of one `rece generate` run into the fresh folder `out`."""
    from rece.generate import generate_run

    sync(opts["device"])
    start = time.perf_counter()
    generate_run(pipe, prompts, out, progress=False, **opts)
    sync(opts["device"])
    return time.perf_counter() - start


def time_plain(pipe, prompts: Path, out: Path, opts: dict) -> float:
    """Seconds of a plain diffusers loop (CSV rows, batches, one CPU generator per image, PNG files) into `out`."""
    sync(opts["device"])
    start = time.perf_counter()
    with open(prompts, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out.mkdir()
    size = opts["batch_size"]
    for i in range(0, len(rows), size):
        batch = rows[i : i + size]
        images = pipe(
            prompt=[r["prompt"] for r in batch],
            num_inference_steps=opts["steps"],
            guidance_scale=opts["guidance"],
            height=opts["height"],
            width=opts["width"],
            generator=[torch.Generator("cpu").manual_seed(int(r["evaluation_seed"])) for r in batch],
            output_type="pil",
        ).images
        for row, image in zip(batch, images):
            image.save(out / f"{row['case_number']}_0.png")
    sync(opts["device"])
    return time.perf_counter() - start


def max_pixel_difference(a: Path, b: Path) -> int:
    """Largest absolute pixel difference between the same-named PNGs of two folders."""
    names = sorted(p.name for p in a.glob("*.png"))
    if names != sorted(p.name for p in b.glob("*.png")):
        raise SystemExit(f"error: '{a}' and '{b}' hold different image files")
    diffs = [np.abs(np.asarray(Image.open(a / n), np.int16) - np.asarray(Image.open(b / n), np.int16)).max() for n in names]
    return int(max(diffs))


def load(model: str | None, cache: Path, device: str):
    """The pipeline under test, built (tiny SD) when no --model is given, on `device`."""
    import diffusers
    import transformers

    from rece.pipelines import load_pipeline
    from rece.tiny import build_tiny_sd

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    if model is None:
        folder = cache / "tiny-sd"
        if not (folder / "model_index.json").is_file():
            build_tiny_sd(folder)
        model = str(folder)
    return load_pipeline(model).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers SD folder (default: tiny SD built by rece.tiny.build_tiny_sd)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts (one image each) per run (8)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (4)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (7.5)")
    parser.add_argument("--height", type=int, default=32, help="image height (32)")
    parser.add_argument("--width", type=int, default=32, help="image width (32)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per contender (5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1; 0 keeps torch's default)")
    parser.add_argument("--cache", type=Path, default=None, help="folder for the tiny model (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = dict(
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        device=device,
    )
    with tempfile.TemporaryDirectory(prefix="rece-generate-speed-") as tmp:
        tmp = Path(tmp)
        pipe = load(args.model, args.cache or tmp, device)
        prompts = write_prompt_set(tmp / "prompts.csv", args.prompts)
        times: dict[str, list[float]] = {"rece": [], "plain": []}
        for round_ in range(args.warmup + args.repeats):
            for name, timer in (("rece", time_rece), ("plain", time_plain)):
                seconds = timer(pipe, prompts, tmp / f"{name}-{round_}", opts)
                if round_ >= args.warmup:
                    times[name].append(seconds)
        difference = max_pixel_difference(tmp / "rece-0" / "images", tmp / "plain-0")
    n = args.prompts
    median = {k: statistics.median(v) for k, v in times.items()}
    overhead = median["rece"] / median["plain"] - 1
    print(
        f"model {args.model or 'tiny SD (rece.tiny.build_tiny_sd)'} on {device}, {n} prompts, {args.steps} steps, "
        f"{args.width}×{args.height}, guidance {args.guidance}, batch {args.batch_size}, "
        f"{args.repeats} repeats after {args.warmup} warm-up, torch threads {torch.get_num_threads()}"
    )
    for name, label in (("rece", "rece generate"), ("plain", "plain diffusers")):
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{label:16s} {n / median[name]:8.2f} img/s  (median {median[name]:.3f} s; runs {runs})")
    verdict = "met" if overhead <= TARGET_OVERHEAD else "NOT met"
    print(f"overhead         {100 * overhead:+8.2f} %  (target ≤ {100 * TARGET_OVERHEAD:.0f} %: {verdict})")
    print(f"max pixel difference between the two image sets: {difference}")
    return 0 if difference == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
