"""Benchmark `rece erase --preset nudity` against a straightforward full-pipeline implementation of the same equations.

The model is a random-weight SD1.4-architecture pipeline (full-size CLIP ViT-L/14 text encoder, SD1.x UNet,
fp16 weights) built once by `rece.tiny.build_random_sd14` and cached. Both contenders run in their own child
process. Wall seconds are each one's own timer from model loading to output written, after its imports (for ours,
`seconds` minus `imports_seconds` of `rece erase --json`; bench/cli_speed.py times the whole process); peak RSS is
the child's own `ru_maxrss` (from `os.wait4`, so one measurement never leaks into another).

    HF_HUB_OFFLINE=1 python bench/erase_speed.py [--cache DIR] [--repeats 3]

The reference follows tests/reference.py (the ground truth of the equations) the way the official RECE code is
organised: two float32 `StableDiffusionPipeline`s (one edited, one frozen), the cross-attention `to_k`/`to_v`
nn.Linear modules edited one by one with outer products accumulated row by row, and the edited UNet state dict
saved with safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

# --preset nudity: concept "nudity", target " ", 3 RECE epochs, r = 0.1, λ1 = λ2 = 0.1, s_e = 1; UCE stage λ = 0.5,
# s_e = 1, preserve "" with s_p = max(0.1, 1/1) = 1. RECE preserves " " once per concept.
NUDITY = {
    "concepts": ["nudity"],
    "target": " ",
    "epochs": 3,
    "r": 0.1,
    "lamb": 0.1,
    "s_e": 1.0,
    "s_p": 0.1,
    "uce_lamb": 0.5,
    "uce_s_e": 1.0,
    "uce_preserve": [""],
}
TARGET_SECONDS = 1.5
TARGET_RSS_BYTES = 1e9
TARGET_SPEEDUP = 60.0
MAX_REL_ERROR = 1e-4
MB = 1e6


# -- child processes ---------------------------------------------------------------------------------------------
def run_child(cmd: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Run `cmd`, return (stdout, peak RSS in bytes of that child alone); raise on a non-zero exit."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{stderr[-4000:]}")
    peak = usage.ru_maxrss * (1024 if sys.platform.startswith("linux") else 1)  # KiB on Linux, bytes on macOS
    return stdout, peak


def last_json_line(text: str) -> dict:
    """The last line of `text` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output:\n{text[-2000:]}")


def child_env(threads: int | None) -> dict[str, str]:
    """Environment for the children: offline, quiet, optionally a fixed thread count."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def time_ours(model: Path, out: Path, env: dict[str, str]) -> dict:
    """One `python -m rece erase MODEL --preset nudity -o OUT --json` run: its JSON plus peak RSS."""
    cmd = [sys.executable, "-m", "rece", "erase", str(model), "--preset", "nudity", "-o", str(out), "--json", "--overwrite"]
    stdout, peak = run_child(cmd, env)
    result = last_json_line(stdout)
    result["seconds"] = round(result["seconds"] - result["imports_seconds"], 4)  # from loading on, as the reference
    result["peak_rss"] = peak
    return result


IMPORTS = (
    "from rece.console import quiet_libraries; quiet_libraries(diffusers=False); "
    "from rece.erase import erase; from rece.models import load_model; from rece.pipelines import resolve_device"
)


def import_rss(env: dict[str, str]) -> int:
    """Peak RSS of a child that only does the imports `rece erase` does before its timer starts."""
    return run_child([sys.executable, "-c", IMPORTS], env)[1]


def time_reference(model: Path, out: Path, env: dict[str, str], threads: int | None) -> dict:
    """One run of this script's reference worker in its own child: its JSON plus peak RSS."""
    cmd = [sys.executable, os.path.abspath(__file__), "--reference-worker", "--model", str(model), "--worker-out", str(out)]
    cmd += ["--threads", str(threads or 0)]
    stdout, peak = run_child(cmd, env)
    result = last_json_line(stdout)
    result["peak_rss"] = peak
    return result


# -- the reference: a straightforward full-pipeline implementation ----------------------------------------------
def uce_module(module, pairs: list, preserve_rows, lamb: float, s_e: float, s_p: float) -> None:
    """Edit one nn.Linear in place: M1 = λW, M2 = λI, add outer products row by row, W ← M1·M2⁻¹ (tests/reference.py)."""
    import torch

    w = module.weight.detach().to(torch.float64)
    d = w.shape[1]
    m1 = lamb * w.clone()
    m2 = lamb * torch.eye(d, dtype=torch.float64)
    for rows, target_rows in pairs:
        values = target_rows @ w.T
        for c, v in zip(rows, values):
            m1 += s_e * torch.outer(v, c)
            m2 += s_e * torch.outer(c, c)
    for e in preserve_rows:
        m1 += s_p * torch.outer(w @ e, e)
        m2 += s_p * torch.outer(e, e)
    new = torch.linalg.solve(m2.T, m1.T).T  # M1 @ M2⁻¹ without the inverse
    module.weight.data.copy_(new.to(module.weight.dtype))


def reference_worker(model: Path, out: Path, threads: int | None) -> dict:
    """Load two float32 pipelines, run UCE + 3 RECE epochs module by module, save the edited UNet; return timings."""
    import resource

    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401  (import cost outside the timed region)

    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    p = NUDITY
    start = time.perf_counter()
    kwargs = {"dtype": torch.float32, "safety_checker": None, "local_files_only": True}
    pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)
    frozen = StableDiffusionPipeline.from_pretrained(model, **kwargs)
    loaded = time.perf_counter()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def is_kv(name: str) -> bool:
        return name.endswith("attn2.to_k") or name.endswith("attn2.to_v")

    modules = {n: m for n, m in pipe.unet.named_modules() if is_kv(n) and isinstance(m, torch.nn.Linear)}
    originals = {n: m for n, m in frozen.unet.named_modules() if n in modules}
    cache: dict[str, tuple[torch.Tensor, int]] = {}

    def encode(text: str) -> tuple[torch.Tensor, int]:
        """[77, d] float64 embedding and attention-mask count of `text`, as the pipeline conditions on it."""
        if text not in cache:
            tok = pipe.tokenizer(
                [text], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            )
            emb = pipe.text_encoder(tok.input_ids)[0][0].to(torch.float64)
            cache[text] = (emb, int(tok.attention_mask.sum()))
        return cache[text]

    # UCE stage: erase pairs from each concept's last word token on, aligned with the target's.
    pairs = []
    target_emb, target_count = encode(p["target"])
    for concept in p["concepts"]:
        emb, count = encode(concept)
        ix, iy = count - 2, target_count - 2
        far = max(ix, iy)
        pairs.append((emb[ix : 77 - (far - ix)], target_emb[iy : 77 - (far - iy)]))
    preserve_rows = torch.cat([encode(t)[0] for t in p["uce_preserve"]])
    uce_s_p = max(0.1, 1 / len(p["uce_preserve"]))
    for module in modules.values():
        uce_module(module, pairs, preserve_rows, p["uce_lamb"], p["uce_s_e"], uce_s_p)
    uce_done = time.perf_counter()

    # RECE epochs: derive c' = c (A⁻¹B)ᵀ, A = rI + Σ WᵀW, B = Σ WᵀW⁰, then erase c' → target.
    rece_preserve = torch.cat([encode(" ")[0] for _ in p["concepts"]])
    d = target_emb.shape[1]
    for _ in range(p["epochs"]):
        a = p["r"] * torch.eye(d, dtype=torch.float64)
        b = torch.zeros(d, d, dtype=torch.float64)
        for name, module in modules.items():
            w = module.weight.to(torch.float64)
            a += w.T @ w
            b += w.T @ originals[name].weight.to(torch.float64)
        derived = [encode(c)[0] @ torch.linalg.solve(a, b).T for c in p["concepts"]]
        rece_pairs = [(c, target_emb) for c in derived]
        for module in modules.values():
            uce_module(module, rece_pairs, rece_preserve, p["lamb"], p["s_e"], p["s_p"])
    rece_done = time.perf_counter()

    save_file({k: v.contiguous() for k, v in pipe.unet.state_dict().items()}, str(out))
    end = time.perf_counter()
    return {
        "seconds": round(end - start, 4),
        "load_seconds": round(loaded - start, 4),
        "uce_seconds": round(uce_done - loaded, 4),
        "rece_seconds": round(rece_done - uce_done, 4),
        "save_seconds": round(end - rece_done, 4),
        "layers": len(modules),
        "peak_rss_after_load": rss_loaded * (1024 if sys.platform.startswith("linux") else 1),
    }


# -- checking and reporting -------------------------------------------------------------------------------------
def compare(model: Path, ours_edit: Path, reference_unet: Path) -> tuple[float, float]:
    """(max over K/V matrices of ‖ours − ref‖/‖ref‖, smallest ‖ref − W⁰‖/‖W⁰‖ i.e. how much the edit moved a matrix)."""
    import torch
    from safetensors import safe_open

    from rece.edit import load_edit
    from rece.families import SD
    from rece.weights import read_edited_weights

    edit = load_edit(ours_edit)
    kv = read_edited_weights(model / "unet", SD)
    worst, smallest_change = 0.0, float("inf")
    with safe_open(str(reference_unet), framework="pt") as f:
        for name, w0 in kv.items():
            ref = f.get_tensor(name + ".weight").to(torch.float64)
            w0 = w0.to(torch.float64)
            ours = edit.edited_weight(name, w0)
            worst = max(worst, ((ours - ref).norm() / ref.norm()).item())
            smallest_change = min(smallest_change, ((ref - w0).norm() / w0.norm()).item())
    return worst, smallest_change


def ensure_model(cache: Path) -> float | None:
    """Build the random SD1.4 pipeline in `cache` unless it is there; return the build seconds (None if cached)."""
    if (cache / "model_index.json").exists():
        return None
    import warnings

    import diffusers
    import transformers

    from rece.tiny import build_random_sd14

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cache.parent.mkdir(parents=True, exist_ok=True)
    print(f"building random-weight SD1.4 pipeline in {cache} (once) ...", flush=True)
    start = time.perf_counter()
    # In a child process: a forked child inherits its parent's peak RSS, which would inflate every later measurement.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=build_random_sd14, args=(cache,))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"building the benchmark model failed (exit {proc.exitcode})")
    return time.perf_counter() - start


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(
    ours: list[dict],
    cached: list[dict],
    reference: list[dict],
    rel_error: float,
    change: float,
    threads: int | None,
    imports: int,
) -> None:
    """Print the comparison table, the breakdowns and the targets."""
    o_sec = statistics.median(r["seconds"] for r in ours)
    o_rss = statistics.median(r["peak_rss"] for r in ours)
    c_sec = statistics.median(r["seconds"] for r in cached)
    c_rss = statistics.median(r["peak_rss"] for r in cached)
    r_sec = statistics.median(r["seconds"] for r in reference)
    r_rss = statistics.median(r["peak_rss"] for r in reference)
    speedup, cached_speedup = r_sec / o_sec, r_sec / c_sec
    print()
    print(
        f"rece erase --preset nudity, random-weight SD1.4 ({reference[0]['layers']} K/V layers), "
        f"{threads or 'default'} thread(s), median of {len(ours)} (ours) / {len(reference)} (reference) runs"
    )
    print(f"{'':22}{'ours':>12}{'reference':>14}{'reference/ours':>17}")
    print(f"{'wall seconds':22}{o_sec:>12.3f}{r_sec:>14.2f}{speedup:>16.1f}x")
    print(f"{'peak RSS (MB)':22}{o_rss / MB:>12.0f}{r_rss / MB:>14.0f}{r_rss / o_rss:>16.1f}x")
    print(f"{'  of which imports':22}{imports / MB:>12.0f}   (peak RSS of a child that only imports what rece erase imports)")
    print(f"{'gram cached: seconds':22}{c_sec:>12.3f}{r_sec:>14.2f}{cached_speedup:>16.1f}x   (G0 from a previous erasure)")
    print(f"{'gram cached: RSS (MB)':22}{c_rss / MB:>12.0f}{r_rss / MB:>14.0f}{r_rss / c_rss:>16.1f}x")
    print()
    for r in ours:
        print(
            f"ours run: {r['seconds']:.3f} s (load {r['load_seconds']:.3f}, erase {r['erase_seconds']:.3f}, "
            f"other {r['seconds'] - r['load_seconds'] - r['erase_seconds']:.3f}), peak RSS {r['peak_rss'] / MB:.0f} MB"
        )
    for r in reference:
        print(
            f"reference run: {r['seconds']:.2f} s (load 2 pipelines {r['load_seconds']:.2f}, UCE {r['uce_seconds']:.2f}, "
            f"RECE epochs {r['rece_seconds']:.2f}, save UNet {r['save_seconds']:.2f}), peak RSS {r['peak_rss'] / MB:.0f} MB "
            f"({r['peak_rss_after_load'] / MB:.0f} MB once loaded)"
        )
    print(
        f"max relative error per K/V matrix, ours vs reference: {rel_error:.2e} "
        f"({verdict(rel_error <= MAX_REL_ERROR)}: <= {MAX_REL_ERROR:g}; "
        f"smallest relative change the edit makes to a matrix: {change:.2e})"
    )
    print()
    print("targets:")
    print(f"  ours <= {TARGET_SECONDS} s after import:       {o_sec:.3f} s  -> {verdict(o_sec <= TARGET_SECONDS)}")
    print(f"  ours <= 1 GB (1e9 bytes) peak RSS:  {o_rss / MB:.0f} MB -> {verdict(o_rss <= TARGET_RSS_BYTES)}")
    print(f"    (the erase's own share, above the imports: {(o_rss - imports) / MB:.0f} MB)")
    print(f"  >= {TARGET_SPEEDUP:.0f}x faster than the reference: {speedup:.1f}x -> {verdict(speedup >= TARGET_SPEEDUP)}")
    print(
        f"    with the gram cached (every erasure after the first from a base): {cached_speedup:.1f}x -> "
        f"{verdict(cached_speedup >= TARGET_SPEEDUP)}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Time `rece erase --preset nudity` (wall seconds after import, peak RSS) on a random-weight SD1.4 "
        "pipeline against a straightforward two-pipeline, module-by-module implementation of the same equations, "
        "and check that both give the same K/V weights."
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/rece/bench-sd14"),
        help="folder of the random SD1.4 pipeline, built there once (default ~/.cache/rece/bench-sd14)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours; the median is reported (default 3)")
    parser.add_argument(
        "--reference-repeats", type=int, default=1, help="timed runs of the reference (slow, ~3.4 GB written each; default 1)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of ours first, to warm the page cache (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads in both children (default 1: reproducible on a shared machine; 0 = torch's own choice)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the edit and the reference's UNet (~3.4 GB) are written (default: a temporary folder)",
    )
    parser.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.reference_repeats < 1 or args.warmup < 0:
        parser.error("--repeats and --reference-repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the model if needed, time both contenders, check their weights agree, print the table."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.reference_worker:
        print(json.dumps(reference_worker(args.model, args.worker_out, args.threads or None)), flush=True)
        return 0

    print(describe(args.threads or None), flush=True)  # the children's threads
    cache = args.cache.expanduser().resolve()
    built = ensure_model(cache)
    print(f"model: {cache} " + (f"(built in {built:.1f} s)" if built is not None else "(cached)"), flush=True)
    threads = args.threads or None
    env = child_env(threads)
    with tempfile.TemporaryDirectory(prefix="rece-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        ours_out, ref_out = work / "ours.safetensors", work / "reference-unet.safetensors"
        cold = {**env, "RECE_GRAM_CACHE": "0"}  # every run multiplies out G0 = Σ W⁰ᵀW⁰: a first erasure from a base
        warm = {**env, "RECE_CACHE": str(work / "cache")}  # G0 read from rece's gram cache: later erasures
        time_ours(cache, ours_out, warm)  # fills the gram cache
        for _ in range(args.warmup):
            time_ours(cache, ours_out, cold)
        ours, cached = [], []
        for i in range(args.repeats):  # ours first: nothing else has run in those children
            ours.append(time_ours(cache, ours_out, cold))
            cached.append(time_ours(cache, ours_out, warm))
            print(
                f"ours run {i + 1}/{args.repeats}: {ours[-1]['seconds']:.3f} s, {ours[-1]['peak_rss'] / MB:.0f} MB; "
                f"gram cached {cached[-1]['seconds']:.3f} s, {cached[-1]['peak_rss'] / MB:.0f} MB",
                flush=True,
            )
        reference = []
        for i in range(args.reference_repeats):
            reference.append(time_reference(cache, ref_out, env, threads))
            print(
                f"reference run {i + 1}/{args.reference_repeats}: {reference[-1]['seconds']:.2f} s, "
                f"{reference[-1]['peak_rss'] / MB:.0f} MB",
                flush=True,
            )
        rel_error, change = compare(cache, ours_out, ref_out)
    report(ours, cached, reference, rel_error, change, threads, statistics.median(import_rss(env) for _ in range(3)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
