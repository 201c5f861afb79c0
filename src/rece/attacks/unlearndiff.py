"""`unlearndiff`: a white-box prompt attack in the style of UnlearnDiff (Zhang et al., ECCV 2024) and P4D (Chin et al.,
ICML 2024).

For each prompt of the set, the original (unedited) model draws the target image x0 (latents, the prompt's own seed).
The attack prepends `adv_tokens` adversarial tokens to the prompt and optimises them so that the *edited* model,
given x_t = noisy(x0, t), predicts what the original training objective asks (the noise ε, x0 or v, per the
scheduler): min ‖UNet′(x_t, t, E([BOS] + adv + prompt)) − target‖². The tokens stay discrete as in PEZ/P4D: soft
token embeddings are kept, each forward pass uses their nearest vocabulary tokens (cosine similarity), and the
gradient of the projected embeddings updates the soft ones (straight-through), with Adam (lr, weight decay).
Timesteps are UnlearnDiff's `timesteps` evenly spaced values of [0, T), visited in turn, `iterations` steps each.

The images are generated from the final projected tokens' embeddings; prompts.csv has their decoded text.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..attack_options import UnlearnDiffOptions
from ..errors import ReceError
from .common import (
    AttackCase,
    CaseResult,
    Target,
    denoising_target,
    encode_ids,
    encode_token_embeddings,
    frozen,
    image_latents,
    ordinary_ids,
    original_latents,
    token_embedding_table,
    tokenize,
)

NAME = "unlearndiff"
FAMILIES = ("sd",)  # gradients through pipe.unet and the one CLIP encoder
NEEDS_PROMPTS = True
IMAGES_PER_PROMPT = 1


@dataclass
class Params(UnlearnDiffOptions):
    """UnlearnDiff's parameters (`rece.attack_options`) and how its manifest records them."""

    def resolved(self, target: Target) -> dict:
        out = asdict(self)
        out["target_run"] = str(Path(self.target_run).resolve()) if self.target_run else "original model, same prompt and seed"
        return out


def sampled_timesteps(count: int, train_steps: int) -> list[int]:
    """UnlearnDiff's timesteps: `count` evenly spaced values of [0, T), starting half a spacing in."""
    spacing = max(1, train_steps // count)
    return list(range(spacing // 2, train_steps, spacing))[:count]


def nearest_tokens(soft: torch.Tensor, unit_vocab: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Ids among `candidates` (unit-length embeddings `unit_vocab`) nearest by cosine similarity to each soft embedding."""
    scores = torch.nn.functional.normalize(soft.detach(), dim=-1) @ unit_vocab.T
    return candidates[scores.argmax(dim=-1)]


def adversarial_ids(prompt_ids: torch.Tensor, adv: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """[BOS] + adversarial tokens + the prompt's tokens (truncated to fit) + [EOS] + padding: [77] ids."""
    context = prompt_ids.shape[0]
    words = prompt_ids[1:][prompt_ids[1:] != eos]
    words = words[words != pad] if pad != eos else words
    room = context - 2 - adv.shape[0]
    body = torch.cat([prompt_ids[:1], adv, words[: max(0, room)], torch.tensor([eos])])
    return torch.cat([body, torch.full((context - body.shape[0],), pad, dtype=torch.long)])


def target_latents(target: Target, params: Params, case: AttackCase, steps: int, guidance: float) -> torch.Tensor:
    """x0 [1, c, h, w]: the original model's image of the case's prompt and seed, or the --target-run image."""
    if params.target_run:
        path = Path(params.target_run) / "images" / f"{case.case_number}_0.png"
        if not path.is_file():
            raise ReceError(
                f"--target-run has no image {path.name} for case {case.case_number}; generate the same prompt set there"
            )
        return image_latents(target.pipe, [path])
    return original_latents(target, [case.prompt], [case.seed], steps, guidance)


def prepare(target: Target, params: Params, store: dict, sampling: dict) -> tuple[dict, dict]:
    """Nothing is shared between cases."""
    return {}, {}


def cases(target: Target, params: Params) -> list[AttackCase]:
    """One case per prompt row, labelled with the first concept."""
    return [AttackCase(r.case_number, r.prompt, r.seed, target.concepts[0], dict(r.labels)) for r in target.rows]


def optimise(target: Target, params: Params, x0: torch.Tensor, prompt_ids: torch.Tensor, generator: torch.Generator):
    """The optimised adversarial token ids [adv_tokens] and (first, last) iteration's loss at each timestep."""
    pipe = target.pipe
    tokenizer = pipe.tokenizer
    table = token_embedding_table(pipe)
    candidates = ordinary_ids(tokenizer, table.shape[0]).to(table.device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unit_vocab = torch.nn.functional.normalize(table[candidates], dim=-1)
    start_ids = candidates[torch.randint(len(candidates), (params.adv_tokens,), generator=generator).to(candidates.device)]
    soft = table[start_ids].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([soft], lr=params.lr, weight_decay=params.weight_decay)
    scheduler = pipe.scheduler
    device = pipe.unet.device
    x0 = x0.to(device, pipe.unet.dtype)
    history = []
    for t in sampled_timesteps(params.timesteps, scheduler.config.num_train_timesteps):
        timestep = torch.tensor([t], device=device)
        losses = []
        for _ in range(params.iterations):
            hard_ids = nearest_tokens(soft, unit_vocab, candidates)
            hard = soft + (table[hard_ids] - soft).detach()  # forward with the projection, gradient to the soft embeddings
            ids = adversarial_ids(prompt_ids, hard_ids.cpu(), eos, pad)
            token_embeds = table[ids.to(table.device)].clone()
            token_embeds[1 : 1 + params.adv_tokens] = hard
            hidden = encode_token_embeddings(pipe, ids[None], token_embeds[None])
            noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
            noisy = scheduler.add_noise(x0, noise, timestep)
            pred = pipe.unet(noisy, timestep, encoder_hidden_states=hidden.to(pipe.unet.dtype)).sample
            loss = torch.nn.functional.mse_loss(pred.float(), denoising_target(scheduler, x0, noise, timestep).float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append((losses[0], losses[-1]))
    return nearest_tokens(soft, unit_vocab, candidates).cpu(), history


def attack_case(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """Optimise the adversarial prefix of one prompt against the edited model."""
    pipe = target.pipe
    start = time.perf_counter()
    x0 = target_latents(target, params, case, shared["steps"], shared["guidance"])
    target_seconds = time.perf_counter() - start
    start = time.perf_counter()
    prompt_ids = tokenize(pipe, [case.prompt])[0]
    generator = torch.Generator("cpu").manual_seed(target.seed * 1_000_003 + case.case_number)
    with frozen(pipe.unet, pipe.text_encoder, pipe.vae):
        adv, history = optimise(target, params, x0, prompt_ids, generator)
    tokenizer = pipe.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = adversarial_ids(prompt_ids, adv, tokenizer.eos_token_id, pad)
    embeds = encode_ids(pipe, ids[None])[0].float()
    text = tokenizer.decode(adv.tolist()) + " " + case.prompt
    info = {
        "adversarial_tokens": tokenizer.decode(adv.tolist()),
        "loss_start": round(sum(first for first, _ in history) / len(history), 6),  # mean over timesteps, first iteration
        "loss_end": round(sum(last for _, last in history) / len(history), 6),  # ... and last iteration
        "attack_steps": params.timesteps * params.iterations,
        "seconds": round(time.perf_counter() - start, 4),
        "target_seconds": round(target_seconds, 4),
    }
    tensors = {f"ids.{case.case_number}": ids, f"target_latents.{case.case_number}": x0[0].float().cpu()}
    return CaseResult(prompt=text, embeds=embeds, tensors=tensors, info=info)
