"""Train a shapes model from a seed: `python -m rece.toy.train -o DIR [--arch unet|mmdit|dit] [--steps N] [--seed S]`.

Stage 1 trains the autoencoder (`shapes`: pixel space, to identity; `shapes-mmdit` and `shapes-dit`: to an 8×8×4
latent, by the same recipe); stage 2 trains the denoiser and the text encoders jointly with 10 % caption dropout (for
classifier-free guidance): the UNet (`shapes`) with x0 ("sample") prediction, the MMDiT (`shapes-mmdit`) with flow
matching, the PixArt DiT (`shapes-dit`) with v prediction. State is saved every `--save-every` steps; rerunning the
same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ReceError
from ..io import atomic_dir, run_folder_lock
from ..tiny import save_clip_tokenizer
from . import dit, mmdit
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
        # copies: safetensors refuses tensors that share memory (T5's tied `shared` / `encoder.embed_tokens`)
        save_file({k: v.clone().contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
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


def _clip_tokenizer(path: Path):
    return save_clip_tokenizer(path, WORDS)


def _dit_tokenizer(path: Path):
    return dit.make_tokenizer(path, WORDS)


@dataclass(frozen=True)
class Arch:
    """What differs between the shapes models: the trained modules (by state name), the loss, the exported folder."""

    autoencoder: Callable  # (work, seed, vae_steps, log) -> the trained autoencoder (stage 1)
    build: Callable  # tokenizer -> {name: module}, the optimiser's parameter order
    loss: Callable  # (modules, vae, tokenizer, images, texts, generator) -> loss
    export: Callable  # (folder, vae, modules, tokenizer) -> None; writes the pipeline
    tokenizers: tuple[str, ...]  # the exported folder's CLIP tokenizer subfolders (given vocab.json + merges.txt)
    steps: int
    lr: float
    vae_steps: int
    tokenizer: Callable = _clip_tokenizer  # WORK/tokenizer -> the tokenizer the text encoders read


def _unet_modules(tokenizer) -> dict:
    text_encoder = make_text_encoder(tokenizer)  # built first: the shipped weights' random init order
    return {"unet": make_unet(), "text_encoder": text_encoder}


@functools.cache
def _train_scheduler():
    """The UNet's training scheduler, built once (not on every step)."""
    return make_train_scheduler()


def _unet_loss(modules, vae, tokenizer, x0, texts, gen):  # pixel space: the autoencoder is the identity
    return denoising_loss(modules["unet"], modules["text_encoder"], tokenizer, _train_scheduler(), x0, texts, gen)


def _unet_export(folder: Path, vae, modules, tokenizer) -> None:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(
        vae=vae,
        text_encoder=modules["text_encoder"],
        tokenizer=tokenizer,
        unet=modules["unet"],
        scheduler=make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def _mmdit_modules(tokenizer) -> dict:
    tokenizer.model_max_length = mmdit.CLIP_ROWS
    encoders = mmdit.make_text_encoders(tokenizer)
    return {"transformer": mmdit.make_transformer(), "text_encoder": encoders[0], "text_encoder_2": encoders[1]}


def _mmdit_autoencoder(work: Path, seed: int, vae_steps: int, log, fit=mmdit.fit_latent_scale, train_vae=mmdit.train_vae):
    """Stage 1 of shapes-mmdit and shapes-dit: the latent autoencoder (kept in WORK/vae.safetensors), on its own
    random streams, trained by `train_vae`, its latent scale fitted by `fit`."""
    from safetensors.torch import load_file, save_file

    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        vae = mmdit.make_vae()
        if (work / "vae.safetensors").exists():
            vae.load_state_dict(load_file(work / "vae.safetensors"))
        else:
            rng = np.random.default_rng(seed + 1)
            train_vae(vae, lambda n: batch(rng, n, dropout=0.0)[0], vae_steps, log)
            save_file(vae.state_dict(), work / "vae.safetensors")
    fit(vae, batch(np.random.default_rng(seed + 7), 512, dropout=0.0)[0])
    return vae.requires_grad_(False)


def _mmdit_loss(modules, vae, tokenizer, x0, texts, gen):
    encoders = [modules["text_encoder"], modules["text_encoder_2"]]
    return mmdit.flow_matching_loss(modules["transformer"], vae, tokenizer, encoders, x0, texts, gen)


def _mmdit_export(folder: Path, vae, modules, tokenizer) -> None:
    encoders = [modules["text_encoder"], modules["text_encoder_2"]]
    mmdit.export_pipeline(folder, vae, encoders, tokenizer, modules["transformer"])


def _dit_autoencoder(work: Path, seed: int, vae_steps: int, log):
    """Stage 1 of shapes-dit: shapes-mmdit's autoencoder, its learning rate cooling down (`dit.train_vae`), scaled
    without a shift (the PixArt pipeline applies none)."""
    return _mmdit_autoencoder(work, seed, vae_steps, log, fit=dit.fit_latent_scale, train_vae=dit.train_vae)


def _dit_modules(tokenizer) -> dict:
    encoder = dit.make_text_encoder(tokenizer)  # built first, as the other recipes build their encoders
    return {"transformer": dit.make_transformer(), "text_encoder": encoder}


@functools.cache
def _dit_scheduler():
    """shapes-dit's scheduler (its ᾱ_t for training), built once."""
    return dit.make_scheduler()


def _dit_loss(modules, vae, tokenizer, x0, texts, gen):
    encoder = modules["text_encoder"]
    return dit.v_prediction_loss(modules["transformer"], vae, tokenizer, encoder, x0, texts, gen, _dit_scheduler())


def _dit_export(folder: Path, vae, modules, tokenizer) -> None:
    dit.export_pipeline(folder, vae, modules["text_encoder"], tokenizer, modules["transformer"])


ARCHS = {
    "unet": Arch(_autoencoder, _unet_modules, _unet_loss, _unet_export, ("tokenizer",), steps=3200, lr=1e-3, vae_steps=500),
    "mmdit": Arch(_mmdit_autoencoder, _mmdit_modules, _mmdit_loss, _mmdit_export, ("tokenizer", "tokenizer_2"), 4000, 1e-3, 1500),
    "dit": Arch(_dit_autoencoder, _dit_modules, _dit_loss, _dit_export, (), 10000, 1e-3, 1500, tokenizer=_dit_tokenizer),
}


def train(
    output: Path,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    lr: float | None = None,
    vae_steps: int | None = None,
    threads: int = 1,
    save_every: int = 250,
    work: Path | None = None,
    snapshot_every: int = 0,
    cooldown: float = 0.2,
    ship: str = "ema",
    arch: str = "unet",
    log=print,
) -> Path:
    """Train and write the pipeline folder to `output`; resumable through `work` (default OUTPUT.work), which one
    live run holds at a time."""
    spec = ARCHS[arch]
    steps = spec.steps if steps is None else steps
    lr = spec.lr if lr is None else lr
    vae_steps = spec.vae_steps if vae_steps is None else vae_steps
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    output = Path(output)
    work = Path(work) if work else output.with_name(output.name + ".work")
    # two runs resuming from one state would overwrite each other's saves: the second is refused
    with run_folder_lock(work):
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = spec.tokenizer(work / "tokenizer")
        vae = spec.autoencoder(work, seed, vae_steps, log)
        live = spec.build(tokenizer)
        ema = {name: copy.deepcopy(module) for name, module in live.items()}
        params = [p for module in live.values() for p in module.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        rng = np.random.default_rng(seed)
        modules = {**live, **{f"ema_{name}": module for name, module in ema.items()}}
        start = _load_state(work / "state", modules, opt, rng) if (work / "state").exists() else 0
        if start:
            log(f"resuming at step {start}")
        gen = torch.Generator().manual_seed(seed + start)
        t0, losses = time.time(), []
        for step in range(start, steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, steps, lr, cooldown)
            x0, texts = batch(rng, batch_size)
            loss = spec.loss(live, vae, tokenizer, x0, texts, gen)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            _update_ema([(ema[name], live[name]) for name in live], step)
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
                _export(work / "snapshots" / f"step-{done}", spec, vae, ema, tokenizer, work, {"seed": seed, "steps": done})
        meta = {
            "arch": arch,
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
        return _export(output, spec, vae, ema if ship == "ema" else live, tokenizer, work, meta)


def _export(output: Path, spec: Arch, vae, modules: dict, tokenizer, work: Path, meta: dict) -> Path:
    """Write the pipeline folder (tokenizers also as vocab.json + merges.txt) atomically."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(output, overwrite=True) as tmp:
        spec.export(tmp, vae, modules, tokenizer)
        for sub in spec.tokenizers:
            for name in ("vocab.json", "merges.txt"):
                (tmp / sub / name).write_bytes((work / "tokenizer" / name).read_bytes())
        (tmp / "training.json").write_text(json.dumps(meta, indent=2))
    return output


def main(argv: list[str] | None = None) -> int:
    """`python -m rece.toy.train`: train the shapes model into -o DIR (resuming from DIR.work)."""
    parser = argparse.ArgumentParser(prog="python -m rece.toy.train", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, help="pipeline folder to write")
    models = "unet: shapes; mmdit: shapes-mmdit; dit: shapes-dit"
    parser.add_argument("--arch", choices=sorted(ARCHS), default="unet", help=models)
    parser.add_argument("--steps", type=int, default=None, help="training steps (unet 3200, mmdit 4000, dit 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (1e-3)")
    parser.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps (unet 500, mmdit and dit 1500)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size on 2 cores)")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--snapshot-every", type=int, default=0, help="also export the EMA pipeline every N steps")
    parser.add_argument("--cooldown", type=float, default=0.2, help="share of the steps over which the lr decays to 0")
    parser.add_argument("--ship", choices=["ema", "live"], default="ema", help="which weights the output pipeline gets")
    args = parser.parse_args(argv)
    try:
        _train_from(args)
    except ReceError as error:  # the -o folder's state held by another live run
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _train_from(args: argparse.Namespace) -> Path:
    """`train` with the command line's settings."""
    return train(
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
        arch=args.arch,
        log=lambda m: print(m, flush=True),
    )


if __name__ == "__main__":
    raise SystemExit(main())
