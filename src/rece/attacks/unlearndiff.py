"""`unlearndiff`: a white-box prompt attack in the style of UnlearnDiff (Zhang et al., ECCV 2024) and P4D (Chin et al.,
ICML 2024), on every family.

For each prompt of the set, the original (unedited) model draws the target image x0 (latents, the prompt's own seed,
the family's own sampling), or `--target-run`'s image is encoded. The attack prepends `adv_tokens` adversarial tokens
to the prompt and optimises them so that the *edited* denoiser, given x_t = noisy(x0, t), predicts what the model was
trained to predict there (`objective.denoising_loss`: ε, x0 or v by the scheduler, flow matching for SD3, FLUX and
Sana, PixArt's noise channels, FLUX's guidance embedding, SDXL's added conditions). The tokens stay discrete as in
PEZ/P4D: soft token embeddings are kept, each forward pass uses their nearest vocabulary tokens (cosine similarity),
and the gradient of the projected embeddings updates the soft ones (straight-through), with Adam (lr, weight decay).
Timesteps are UnlearnDiff's `timesteps` evenly spaced values of [0, T), visited in turn, `iterations` steps each.

The tokens live in the vocabulary of the family's `attack_parts` (`token_rows`; docs/attacks.md says which and
why): SD1/2 its CLIP; SDXL and SD3 both CLIPs (one vocabulary: the same ids in both, a soft embedding in each, the
nearest token by the sum of the two similarities), with gradients through the pooled vector too; FLUX T5, whose rows
alone carry tokens, CLIP's pooled vector reading the tokens' decoded text; SD3's T5 reads that text too; PixArt T5;
Sana Gemma-2, after the pipeline's instruction prefix.

The images are drawn by the family's pipeline from exactly the rows of the final tokens in every space (and SDXL's
pooled vector), stored in adversarial.safetensors; prompts.csv has their decoded text before the prompt.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ReceError
from .common import AttackCase, CaseResult, Target, frozen, model_modules, ordinary_ids, original_latents, space_tensors
from .objective import denoising_loss, image_latents, spaced_timesteps, train_steps
from .params import UnlearnDiffParams as Params
from .token_rows import TokenRows

NAME = "unlearndiff"
FAMILIES = None  # the family's own denoiser, objective and text encoders: every family rece knows
NEEDS_PROMPTS = True
IMAGES_PER_PROMPT = 1


def resolved(target: Target, params: Params) -> dict:
    """The parameters as the manifest records them (the target run's absolute path)."""
    target_run = str(Path(params.target_run).resolve()) if params.target_run else "original model, same prompt and seed"
    return {**asdict(params), "target_run": target_run}


def check(target: Target, params: Params) -> None:
    """Nothing to refuse once the family is known: a missing target image is refused when its case is reached."""


def adversarial_words(count: int) -> list[str]:
    """The placeholder words the adversarial tokens stand in for, in order."""
    return [f"<rece-adv-{k}>" for k in range(count)]


def nearest_tokens(softs: dict[int, torch.Tensor], units: dict[int, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
    """Ids among `candidates` nearest to the soft embeddings [k, d_part] of every carrying part: the largest sum of
    the cosine similarities (`units`: the candidates' unit-length embeddings of each part)."""
    scores = sum(
        (torch.nn.functional.normalize(soft.detach(), dim=-1) @ units[p].T).to(candidates.device) for p, soft in softs.items()
    )
    return candidates[scores.argmax(dim=-1)]


def target_latents(target: Target, params: Params, case: AttackCase, steps: int, guidance: float) -> torch.Tensor:
    """x0 [1, ...] as the pipeline's latent output gives it (FLUX: packed): the original model's image of the case's
    prompt and seed, or the --target-run image."""
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


def optimise(target: Target, params: Params, x0: torch.Tensor, prompt: str, guidance: float, generator: torch.Generator):
    """The optimised adversarial token ids [adv_tokens], the rows maker and (first, last) iteration's loss at each
    timestep."""
    words = adversarial_words(params.adv_tokens)
    maker = TokenRows(target, words)
    first = maker.parts[0]
    candidates = ordinary_ids(maker.tokenizers[first], maker.vocabulary())
    tables = {p: maker.table(p) for p in maker.parts}
    units = {p: torch.nn.functional.normalize(t[candidates.to(t.device)].float(), dim=-1) for p, t in tables.items()}
    start_ids = candidates[torch.randint(len(candidates), (params.adv_tokens,), generator=generator)]
    softs = {p: t[start_ids.to(t.device)].float().clone().requires_grad_(True) for p, t in tables.items()}
    optimizer = torch.optim.Adam(list(softs.values()), lr=params.lr, weight_decay=params.weight_decay)
    text = " ".join(words) + " " + prompt
    history = []
    for t in spaced_timesteps(params.timesteps, train_steps(target.pipe.scheduler)):
        losses = []
        for _ in range(params.iterations):
            hard_ids = nearest_tokens(softs, units, candidates)
            # forward with the projection, gradient to the soft embeddings
            vectors = {p: soft + (tables[p][hard_ids.to(soft.device)].float() - soft).detach() for p, soft in softs.items()}
            rows, attended = maker.rows([text], vectors, hard_ids, written(maker, words, hard_ids))
            noise = torch.randn(x0.shape, generator=generator)
            loss = denoising_loss(target.pipe, x0, rows, attended, torch.tensor([t]), noise, guidance)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append((losses[0], losses[-1]))
    return nearest_tokens(softs, units, candidates).cpu(), maker, history


def written(maker: TokenRows, words: list[str], ids: torch.Tensor) -> dict[str, str]:
    """What the tokenizers of the other parts read for the adversarial words: the tokens' decoded text."""
    return {" ".join(words): maker.tokenizers[maker.parts[0]].decode(ids.tolist())}


def attack_case(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """Optimise the adversarial prefix of one prompt against the edited model."""
    start = time.perf_counter()
    x0 = target_latents(target, params, case, shared["steps"], shared["guidance"])
    target_seconds = time.perf_counter() - start
    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(target.seed * 1_000_003 + case.case_number)
    with frozen(*model_modules(target)):
        adv, maker, history = optimise(target, params, x0, case.prompt, shared["guidance"], generator)
        words = adversarial_words(params.adv_tokens)
        text = " ".join(words) + " " + case.prompt
        vectors = {p: maker.table(p)[adv.to(maker.table(p).device)] for p in maker.parts}
        with torch.no_grad():
            rows, attended = maker.rows([text], vectors, adv, written(maker, words, adv))
    decoded = written(maker, words, adv)[" ".join(words)]
    info = {
        "adversarial_tokens": decoded,
        "loss_start": round(sum(first for first, _ in history) / len(history), 6),  # mean over timesteps, first iteration
        "loss_end": round(sum(last for _, last in history) / len(history), 6),  # ... and last iteration
        "attack_steps": params.timesteps * params.iterations,
        "seconds": round(time.perf_counter() - start, 4),
        "target_seconds": round(target_seconds, 4),
    }
    n = case.case_number
    tensors = {f"ids.{n}": maker.token_ids(text, adv), f"adversarial_ids.{n}": adv, f"target_latents.{n}": x0[0].float().cpu()}
    tensors.update(space_tensors(target, n, rows, attended))
    return CaseResult(prompt=f"{decoded} {case.prompt}", embeds=rows[0][0].cpu(), tensors=tensors, info=info)
