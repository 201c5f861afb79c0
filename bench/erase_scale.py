"""Erase 1, 10, 100 and 1,000 concepts in one edit: time, peak RSS and where the time goes.

Models: the full-size random SD1.4 architecture (`rece.tiny.build_random_sd14`: CLIP ViT-L/14 at full depth) and an
SDXL one with the released shapes of everything rece reads (CLIP-L and OpenCLIP bigG at full width but `--text-layers`
layers, bf16; the 140 K/V layers of the UNet, fp16; the UNet itself is never built, so its folder holds only those).
Concepts are the first N distinct artists of ../shared/benchmarks/artists1734_prompts.csv (column `artist`; made-up
names when the file is absent), erased with `--preset art` (UCE, and RECE with one epoch), each run in its own child
process (peak RSS = that child's `ru_maxrss`).

    HF_HUB_OFFLINE=1 python bench/erase_scale.py [--models sd14 sdxl] [--counts 1 10 100 1000] [--methods uce rece]

Prints per run: total seconds and its split — text encoding, G₀, RECE's derivations, the closed-form updates, the
preservation report, the rest (edit metadata), the write — peak RSS, and the edit's size; then each model's
seconds-per-concept from the largest two counts (linear growth: about equal).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from family_erase import _save, _text_encoders  # noqa: E402  (bench scripts share their builders)
from machine import describe  # noqa: E402

ARTISTS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "artists1734_prompts.csv"

CHILD = r"""
import json, resource, sys, time
import torch
threads = int(sys.argv[4])
if threads: torch.set_num_threads(threads)
from rece.console import quiet_libraries; quiet_libraries(diffusers=False)
import rece, transformers
from rece import closed_form as cf, preservation
from rece.models import load_model
from rece.text import PromptEncoder
from rece.models import BaseModel
erase_module = sys.modules["rece.erase"]
spent = {"encode": 0.0, "gram": 0.0, "derive": 0.0, "update": 0.0, "report": 0.0}
def timed(owner, name, key):
    f = getattr(owner, name)
    def wrapper(*a, **k):
        t = time.perf_counter(); out = f(*a, **k); spent[key] += time.perf_counter() - t; return out
    setattr(owner, name, wrapper)
timed(PromptEncoder, "encode", "encode"); timed(BaseModel, "original_gram", "gram")
timed(cf.EditedGrams, "derive", "derive"); timed(erase_module, "shared_step", "update")
timed(preservation, "text_sums", "report"); timed(preservation, "delta_gram", "report")
names = [line for line in open(sys.argv[2]).read().splitlines() if line]
for encoder in ("CLIPTextModel", "CLIPTextModelWithProjection"): getattr(transformers, encoder)
t0 = time.perf_counter(); base = load_model(sys.argv[1]); t1 = time.perf_counter()
edit = rece.erase(base, names, preset="art", method=sys.argv[5], progress=False); t2 = time.perf_counter()
edit.save(sys.argv[3]); t3 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "erase": t2 - t1, "write": t3 - t2, **spent,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def artist_names(count: int) -> list[str]:
    """The first `count` distinct artists of the benchmark CSV (made-up names past its end or without it)."""
    names: list[str] = []
    if ARTISTS.is_file():
        with open(ARTISTS, newline="") as f:
            for row in csv.DictReader(f):
                if row["artist"] not in names:
                    names.append(row["artist"])
                if len(names) == count:
                    break
    return names + [f"painter number {i}" for i in range(len(names), count)]


def sdxl_layers() -> dict[str, tuple[int, int]]:
    """SDXL's 140 cross-attention K/V weights (diffusers names) and their shapes (out, 2048)."""
    blocks = [("down_blocks.1", 2, 2, 640), ("down_blocks.2", 2, 10, 1280), ("mid_block", 1, 10, 1280),
              ("up_blocks.0", 3, 10, 1280), ("up_blocks.1", 3, 2, 640)]  # fmt: skip
    out = {}
    for prefix, attentions, depth, width in blocks:
        for a in range(attentions):
            for t in range(depth):
                for kv in ("k", "v"):
                    out[f"{prefix}.attentions.{a}.transformer_blocks.{t}.attn2.to_{kv}.weight"] = (width, 2048)
    return out


def build_sdxl(root: Path, text_layers: int) -> Path:
    """A folder with SDXL's text encoders (full width, `text_layers` layers) and its K/V tensors (random, fp16)."""
    import torch

    folder = root / "sdxl"
    kinds = [("tokenizer", "text_encoder", "clip-l"), ("tokenizer_2", "text_encoder_2", "clip-g+proj")]
    index = _text_encoders(folder, kinds, text_layers)
    torch.manual_seed(0)
    tensors = {k: (torch.randn(*shape) * 2048**-0.5).half() for k, shape in sdxl_layers().items()}
    config = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 2048, "layers_per_block": 2,
              "addition_embed_type": "text_time", "transformer_layers_per_block": [1, 2, 10]}  # fmt: skip
    _save(tensors, folder / "unet", config)
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"], **index}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def measure(folder: Path, names: list[str], method: str, threads: int, work: Path) -> dict:
    """One erasure in a child process: its timings, peak RSS and the edit's size."""
    prompts, edit = work / "names.txt", work / "edit.safetensors"
    prompts.write_text("\n".join(names))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RECE_GRAM_CACHE": "0"}
    cmd = [sys.executable, "-c", CHILD, str(folder), str(prompts), str(edit), str(threads), method]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{folder.name} {len(names)} {method}: {out.stderr.strip().splitlines()[-1]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["edit_mb"] = edit.stat().st_size / 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd14", "sdxl"], choices=["sd14", "sdxl"])
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=["uce", "rece"], choices=["uce", "rece"])
    parser.add_argument("--text-layers", type=int, default=2, help="layers of SDXL's text encoders (full width) (2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's choice)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rece" / "bench-sd14"), help="SD1.4 folder")
    args = parser.parse_args()
    print(describe(args.threads or None), flush=True)  # the children's threads
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'model':6s} {'method':6s} {'N':>5s} {'total s':>8s} {'encode':>7s} {'G0':>6s} {'derive':>7s} "
              f"{'update':>7s} {'report':>7s} {'rest':>6s} {'write':>6s} {'peak RSS':>9s} {'edit MB':>8s}")  # fmt: skip
        for model in args.models:
            if model == "sd14":
                from rece.tiny import build_random_sd14

                folder = Path(args.cache)
                if not (folder / "model_index.json").is_file():
                    build_random_sd14(folder)
            else:
                folder = build_sdxl(work, args.text_layers)
            for method in args.methods:
                per_concept = []
                for count in args.counts:
                    r = measure(folder, artist_names(count), method, args.threads, work)
                    total = r["load"] + r["erase"] + r["write"]
                    named = r["encode"] + r["gram"] + r["derive"] + r["update"] + r["report"]
                    rest = r["load"] + r["erase"] - named
                    per_concept.append((count, total))
                    print(f"{model:6s} {method:6s} {count:5d} {total:8.2f} {r['encode']:7.2f} {r['gram']:6.2f} "
                          f"{r['derive']:7.2f} {r['update']:7.2f} {r['report']:7.2f} {rest:6.2f} {r['write']:6.2f} "
                          f"{r['rss'] / 1e9:7.2f}GB {r['edit_mb']:8.1f}", flush=True)  # fmt: skip
                if len(per_concept) >= 3:
                    (n1, t1), (n2, t2), (n3, t3) = per_concept[-3:]
                    print(f"{model:6s} {method:6s} seconds per added concept: {(t2 - t1) / (n2 - n1):.3f} "
                          f"({n1}->{n2}), {(t3 - t2) / (n3 - n2):.3f} ({n2}->{n3})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
