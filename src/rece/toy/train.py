"""Train the shapes model from a seed: `python -m rece.toy.train -o DIR [--steps N] [--seed S]`.

Stage 1 trains the pixel-space autoencoder to identity; stage 2 trains the UNet and the CLIP text
encoder jointly with x0 ("sample") prediction and 10 % caption dropout (for classifier-free guidance).
State is saved every `--save-every` steps; rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_dir
from ..tiny import save_clip_tokenizer
from .model import make_sample_scheduler, make_text_encoder, make_train_scheduler, make_unet, make_vae
from .world import WORDS, caption, random_scenes, render, to_tensor_range


def batch(rng: np.random.Generator, size: int, dropout: float = 0.1):
    """Rendered images in [-1, 1] and their captions ('' with probability `dropout`)."""
    scenes = random_scenes(size, rng)
    texts = ["" if rng.random() < dropout else caption(s, rng) for s in scenes]
    return torch.from_numpy(to_tensor_range(render(scenes))), texts


def train_vae(vae, rng: np.random.Generator, steps: int, log) -> None:
    """Autoencoder to identity: latent mean = image, decode(latent) = image; log-variance pinned very low."""
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for step in range(steps):
        x, _ = batch(rng, 32, dropout=0.0)
        x = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(step))).clamp(-1, 1)
        moments = vae.encoder(x)
        mean = moments[:, :3]
        loss = (mean - x).pow(2).mean() + (vae.decoder(x) - x).pow(2).mean() + (vae.decoder(mean) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")
    with torch.no_grad():
        vae.encoder.conv_out.weight[3:] = 0
        vae.encoder.conv_out.bias[3:] = -30.0


def learning_rate(step: int, steps: int, peak: float, cooldown: float = 0.2, warmup: int = 200) -> float:
    """Linear warm-up, constant, then a linear cool-down to zero over the last `cooldown` share of the steps.

    Before the cool-down the schedule does not depend on `steps`, so a run can be extended by resuming
    with a larger --steps as long as its cool-down has not started.
    """
    start = int(steps * (1 - cooldown))
    if step >= start:
        return peak * (steps - step) / max(1, steps - start)
    return peak * min(1.0, (step + 1) / warmup)


def _save_state(path: Path, step: int, modules: dict, opt, rng: np.random.Generator) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "rng": rng.bit_generator.state}))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


def _load_state(path: Path, modules: dict, opt, rng: np.random.Generator) -> int:
    from safetensors.torch import load_file

    for name, module in modules.items():
        module.load_state_dict(load_file(path / f"{name}.safetensors"))
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    rng.bit_generator.state = state["rng"]
    return state["step"]


def _autoencoder(work: Path, seed: int, vae_steps: int, log):
    """Stage 1: the autoencoder, trained once and kept in WORK/vae.safetensors for resumed runs."""
    from safetensors.torch import load_file, save_file

    vae = make_vae()
    if (work / "vae.safetensors").exists():
        vae.load_state_dict(load_file(work / "vae.safetensors"))
    else:
        train_vae(vae, np.random.default_rng(seed + 1), vae_steps, log)
        save_file(vae.state_dict(), work / "vae.safetensors")
    return vae


def denoising_loss(
    unet, text_encoder, tokenizer, scheduler, x0: torch.Tensor, texts: list[str], gen: torch.Generator
) -> torch.Tensor:
    """Stage 2's loss: the UNet predicts the clean images x0 from noised ones, conditioned on the captions `texts`."""
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    xt = scheduler.add_noise(x0, noise, t)
    pred = unet(xt, t, text_encoder(ids)[0]).sample
    return (pred - x0).pow(2).mean()


def _update_ema(pairs, step: int) -> None:
    """Move each (ema, live) module's EMA weights towards the live ones (decay warming up to 0.999)."""
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema, live in pairs:
            for pe, pl in zip(ema.parameters(), live.parameters()):
                pe.lerp_(pl, 1 - decay)


def train(
    output: Path,
    steps: int = 3200,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    vae_steps: int = 500,
    threads: int = 1,
    save_every: int = 250,
    work: Path | None = None,
    snapshot_every: int = 0,
    cooldown: float = 0.2,
    ship: str = "ema",
    log=print,
) -> Path:
    """Train and write the pipeline folder to `output`; resumable through `work` (default OUTPUT.work)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    output = Path(output)
    work = Path(work) if work else output.with_name(output.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = save_clip_tokenizer(work / "tokenizer", WORDS)
    vae = _autoencoder(work, seed, vae_steps, log)
    text_encoder, unet = make_text_encoder(tokenizer), make_unet()
    ema_text, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = make_train_scheduler()
    rng = np.random.default_rng(seed)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    start = _load_state(work / "state", modules, opt, rng) if (work / "state").exists() else 0
    if start:
        log(f"resuming at step {start}")
    gen = torch.Generator().manual_seed(seed + start)
    t0, losses = time.time(), []
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr, cooldown)
        x0, texts = batch(rng, batch_size)
        loss = denoising_loss(unet, text_encoder, tokenizer, scheduler, x0, texts, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _update_ema(((ema_unet, unet), (ema_text, text_encoder)), step)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == steps:
            rate = (done - start) / (time.time() - t0)
            log(
                f"step {done}/{steps} loss {np.mean(losses[-50:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{rate:.2f} it/s eta {(steps - done) / rate / 60:.1f} min"
            )
        if done % save_every == 0 and done < steps:
            _save_state(work / "state", done, modules, opt, rng)
        if snapshot_every and done % snapshot_every == 0 and done < steps:
            _export(work / "snapshots" / f"step-{done}", vae, ema_text, tokenizer, ema_unet, work, {"seed": seed, "steps": done})
    meta = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "vae_steps": vae_steps,
        "threads": threads,
        "cooldown": cooldown,
        "ship": ship,
        "final_loss": float(np.mean(losses[-200:])) if losses else None,
    }
    if ship == "ema":
        return _export(output, vae, ema_text, tokenizer, ema_unet, work, meta)
    return _export(output, vae, text_encoder, tokenizer, unet, work, meta)


def _export(output: Path, vae, text_encoder, tokenizer, unet, work: Path, meta: dict) -> Path:
    """Write a StableDiffusionPipeline folder (tokenizer also as vocab.json + merges.txt) atomically."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(output, overwrite=True) as tmp:
        pipe.save_pretrained(tmp)
        for name in ("vocab.json", "merges.txt"):
            (tmp / "tokenizer" / name).write_bytes((work / "tokenizer" / name).read_bytes())
        (tmp / "training.json").write_text(json.dumps(meta, indent=2))
    return output


def main(argv: list[str] | None = None) -> int:
    """`python -m rece.toy.train`: train the shapes model into -o DIR (resuming from DIR.work)."""
    parser = argparse.ArgumentParser(prog="python -m rece.toy.train", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, help="pipeline folder to write")
    parser.add_argument("--steps", type=int, default=3200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size on 2 cores)")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--snapshot-every", type=int, default=0, help="also export the EMA pipeline every N steps")
    parser.add_argument("--cooldown", type=float, default=0.2, help="share of the steps over which the lr decays to 0")
    parser.add_argument("--ship", choices=["ema", "live"], default="ema", help="which weights the output pipeline gets")
    args = parser.parse_args(argv)
    train(
        Path(args.output),
        args.steps,
        args.seed,
        args.batch_size,
        args.lr,
        args.vae_steps,
        args.threads,
        args.save_every,
        snapshot_every=args.snapshot_every,
        cooldown=args.cooldown,
        ship=args.ship,
        log=lambda m: print(m, flush=True),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
