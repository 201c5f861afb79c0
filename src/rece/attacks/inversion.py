"""`inversion`: a text-free inversion attack. For each concept, the conditioning the denoiser reads is optimised
directly, not a word and not tokens: every row of every space the family reads (SD's CLIP rows, SDXL's joined rows,
the T5 / Gemma rows past PixArt's and Sana's caption modules, an MMDiT's token rows) and the pooled vector (SDXL's
added text embedding, the MMDiTs' pooled space), through the *edited* denoiser, minimising the denoising loss the
model was trained with (`objective.denoising_loss`: ε, v or flow matching) on reference images of the concept.

It is Concept Inversion (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative Models",
ICLR 2024) with the learned word replaced by the rows themselves: no edit of the text path (which is all a closed-form
erasure changes) can put a concept out of reach of rows that are free, so this is the strongest attack such an edit
can face. The reference images are drawn by the *unedited* model from the concept's own prompt (seeds apart from the
evaluation images'), or read from `--images`. Adam; each step a batch of reference images at timesteps drawn
uniformly from [0, T). The rows start from the empty prompt's (or the concept prompt's: `--init concept`); for
families that mask padding (PixArt, Sana) the attended rows are the concept prompt's count.

The images are drawn from exactly the optimised rows with the family's own sampling (`embeds.{case}`,
`embeds1.{case}` for the pooled vector or second space, `attended.{case}`, as the derived attack stores them).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ReceError
from ..pipelines import denoiser
from ..runs import image_files
from .common import AttackCase, CaseResult, Target, frozen, original_latents, space_tensors
from .objective import conditioning, denoising_loss, image_latents, spaced_timesteps, train_steps
from .params import EMPTY
from .params import InversionParams as Params

NAME = "inversion"
FAMILIES = None  # the rows and the denoiser's own objective: every family rece knows
NEEDS_PROMPTS = False
IMAGES_PER_PROMPT = 10
REFERENCE_SEED_OFFSET = 100_000  # reference images use seeds the evaluation images (seed + k) do not


def resolved(target: Target, params: Params) -> dict:
    """The parameters as the manifest records them (the images' folder absolute, the timestep rule named)."""
    images = str(Path(params.images).resolve()) if params.images else "drawn by the unedited model from the concept prompt"
    return {**asdict(params), "images": images, "timesteps": "uniform in [0, T) at every step"}


def reference_files(params: Params) -> list[Path]:
    """The --images files inverted (the first `reference_images`, in natural order)."""
    folder = Path(params.images)
    return [folder / n for n in image_files(folder)[: params.reference_images]]


def check(target: Target, params: Params) -> None:
    """--images must hold images, of one concept."""
    if params.images is None:
        return
    if not reference_files(params):
        raise ReceError(f"--images '{params.images}' has no images; put a few images of the concept there")
    if len(target.concepts) > 1:
        raise ReceError("--images holds one concept's images; attack one --concept at a time with it")


def cases(target: Target, params: Params) -> list[AttackCase]:
    """One case per concept; image k of every case uses seed + k."""
    return [AttackCase(i, c, target.seed, c) for i, c in enumerate(target.concepts)]


def prepare(target: Target, params: Params, store: dict, sampling: dict) -> tuple[dict, dict]:
    """Nothing is shared between cases."""
    return {}, {}


def reference_latents(target: Target, params: Params, concept: str, sampling: dict) -> torch.Tensor:
    """Latents of the concept's reference images: --images, else drawn by the unedited model from the concept's
    prompt with the family's own sampling, as the pipeline's latent output (what the denoiser is trained on)."""
    if params.images:
        return image_latents(target.pipe, reference_files(params))
    seeds = [target.seed + REFERENCE_SEED_OFFSET + j for j in range(params.reference_images)]
    return original_latents(target, [concept] * len(seeds), seeds, sampling["steps"], sampling["guidance"])


def initial_rows(target: Target, params: Params, concept: str) -> tuple[list[torch.Tensor], list[int]]:
    """The rows the optimisation starts from ([1, L, d] per space, the pooled vector last) and the attended rows (the
    concept prompt's count: what masked families attend)."""
    start = "" if params.init == EMPTY else concept
    rows, counts = conditioning(target, [start, concept])
    return [r[:1].clone() for r in rows], counts[1:]


def batch_loss(pipe, x0: torch.Tensor, variables: list[torch.Tensor], attended: list[int], t: torch.Tensor,
               noise: torch.Tensor, guidance: float) -> torch.Tensor:  # fmt: skip
    """The denoising loss of the rows `variables` ([1, L, d] each) on a batch of reference latents."""
    n = x0.shape[0]
    rows = [v.expand(n, *v.shape[1:]) for v in variables]
    return denoising_loss(pipe, x0, rows, attended * n, t, noise, guidance)


def probe(latents: torch.Tensor, size: int, train: int, generator: torch.Generator) -> tuple:
    """A fixed batch (latents, spaced timesteps, noise) on which the loss is reported before and after."""
    x0 = latents[torch.arange(size) % len(latents)]
    t = torch.tensor(spaced_timesteps(size, train))
    return x0, t[torch.arange(size) % len(t)], torch.randn(x0.shape, generator=generator)


def optimise(target: Target, params: Params, latents: torch.Tensor, rows: list[torch.Tensor], attended: list[int],
             guidance: float, generator: torch.Generator) -> tuple[list[torch.Tensor], dict]:  # fmt: skip
    """Adam on every row of every space: the optimised rows and the probe's loss before and after."""
    pipe = target.pipe
    train = train_steps(pipe.scheduler)
    variables = [r.clone().requires_grad_(True) for r in rows]
    optimizer = torch.optim.Adam(variables, lr=params.lr)
    fixed = probe(latents, params.train_batch_size, train, generator)
    with torch.no_grad():
        loss_start = batch_loss(pipe, fixed[0], variables, attended, *fixed[1:], guidance).item()
    for _ in range(params.train_steps):
        pick = torch.randint(len(latents), (params.train_batch_size,), generator=generator)
        t = torch.randint(train, (params.train_batch_size,), generator=generator)
        noise = torch.randn((params.train_batch_size, *latents.shape[1:]), generator=generator)
        loss = batch_loss(pipe, latents[pick], variables, attended, t, noise, guidance)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        loss_end = batch_loss(pipe, fixed[0], variables, attended, *fixed[1:], guidance).item()
    return [v.detach() for v in variables], {"loss_start": round(loss_start, 6), "loss_end": round(loss_end, 6)}


def attack_case(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """Invert the case's concept: reference latents, then the rows optimised through the edited denoiser."""
    start = time.perf_counter()
    latents = reference_latents(target, params, case.concept, shared)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rows, attended = initial_rows(target, params, case.concept)
    generator = torch.Generator("cpu").manual_seed(target.seed * 1_000_003 + case.case_number)
    with frozen(denoiser(target.pipe)):
        rows, losses = optimise(target, params, latents, rows, attended, shared["guidance"], generator)
    tensors = space_tensors(target, case.case_number, rows, attended)
    info = {
        **losses,
        "init": params.init,
        "reference_images": len(latents),
        "attack_steps": params.train_steps,
        "seconds": round(time.perf_counter() - start, 4),
        "reference_seconds": round(reference_seconds, 4),
    }
    source = f"--images {Path(params.images).name}" if params.images else "the unedited model"
    prompt = f"rows of '{case.concept}' inverted from {len(latents)} images ({source}), from the {params.init} prompt's"
    return CaseResult(prompt=prompt, embeds=rows[0][0].float().cpu(), tensors=tensors, info=info)
