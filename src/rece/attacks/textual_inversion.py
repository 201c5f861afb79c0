"""`textual-inversion`: Concept Inversion, the attack of "Circumventing Concept Erasure Methods for Text-to-Image
Generative Models" (Pham et al., ICLR 2024): Textual Inversion (Gal et al., ICLR 2023) run on the *edited* model, on
every family.

A new word (the placeholder, e.g. "<triangle>") gets a token embedding v, initialised from `initializer`'s first
token, and only v is trained: on a few images of the concept (`images`, or `train_images` drawn by the original model
from the prompt set with the family's own sampling), with captions from Textual Inversion's templates ("a photo of a
{}", ...), the edited model frozen, minimising the family's denoising loss (`objective.denoising_loss`: ε / v / x0,
flow matching, PixArt's noise channels, FLUX's guidance embedding, SDXL's added conditions). Then every prompt of
the set is drawn with the concept word replaced by the placeholder (or the placeholder prepended when the prompt does
not name the concept), from exactly the rows the learned word gives in every space.

The word lives in the vocabulary of the family's `attack_parts` (`token_rows`; docs/attacks.md): SD1/2 its CLIP;
SDXL and SD3 both CLIPs (a vector of each one's width, as diffusers' SDXL textual inversion trains), gradients
through the pooled vector too; FLUX T5; PixArt T5; Sana Gemma-2. The other encoders (FLUX's CLIP, SD3's T5) read the
prompt without the placeholder: they have no word for it, and its written form ("<triangle>") would hand them the
concept's own word, which is not the attack's to use.

adversarial.safetensors keeps v as `token_embedding` ([d_tok]; the second carrying encoder's as `token_embedding1`);
for SD1/2, `pipe.load_textual_inversion({placeholder: v})` loads it.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ReceError
from .common import AttackCase, CaseResult, Target, frozen, model_modules, original_latents, slug, space_tensors
from .objective import denoising_loss, image_latents, train_steps
from .params import TextualInversionParams as Params
from .token_rows import TokenRows

NAME = "textual-inversion"
FAMILIES = None  # a new word of the family's own text encoders, trained through its own denoiser: every family
NEEDS_PROMPTS = True
IMAGES_PER_PROMPT = 1
TEMPLATES = ("a photo of a {}", "a picture of a {}", "a drawing of a {}", "a {}")
TRAIN_SEED_OFFSET = 100_000  # training images use seeds the evaluation images of a set rarely use
WEIGHT_DECAY = 1e-2  # diffusers' textual_inversion.py AdamW default


def resolved(target: Target, params: Params) -> dict:
    """The parameters as the manifest records them (the concept's initializer and placeholder filled in)."""
    images = str(Path(params.images).resolve()) if params.images else "drawn by the original model from the prompt set"
    return {
        **asdict(params),
        "images": images,
        "initializer": params.initializer or target.concepts[0],
        "placeholder": placeholder_name(params, target.concepts[0]),
        "effective_lr": params.effective_lr,
    }


def check(target: Target, params: Params) -> None:
    """Nothing to refuse once the family is known: the word and its initializer are checked as training starts."""


def placeholder_name(params: Params, concept: str) -> str:
    """The new word: --placeholder, else '<concept>'."""
    return params.placeholder or f"<{slug(concept)}>"


def initializer_id(maker: TokenRows, text: str) -> int:
    """The first token of `text` in the carrying vocabulary, as a word inside a prompt reads (after a space): the
    word v starts from."""
    tokenizer = maker.tokenizers[maker.parts[0]]
    ids = tokenizer(" " + maker.family.preprocess(text), add_special_tokens=False).input_ids
    words = [i for i in ids if i < maker.vocabulary() and i not in tokenizer.all_special_ids]
    if not words:
        raise ReceError(f"--initializer '{text}' has no token; pass a word")
    return int(words[0])


def vector_key(index: int) -> str:
    """The name of the learned vector of the `index`-th carrying encoder in adversarial.safetensors."""
    return "token_embedding" if index == 0 else f"token_embedding{index}"


def unwritten(maker) -> dict[str, str]:
    """What the encoders without the learned word read for it: nothing (the placeholder dropped, its space with it)."""
    return {f" {maker.words[0]}": "", maker.words[0]: ""}


def insert_placeholder(prompt: str, concept: str, placeholder: str) -> str:
    """The prompt with the concept (whole words, any case) replaced by the placeholder, else the placeholder prepended."""
    pattern = re.compile(r"(?<!\w)" + re.escape(concept) + r"(?!\w)", re.IGNORECASE)
    if pattern.search(prompt):
        return pattern.sub(placeholder, prompt)
    return f"{placeholder} {prompt}".strip()


def training_latents(target: Target, params: Params, sampling: dict) -> torch.Tensor:
    """Latents of the concept's training images: files of --images, else the original model's images of the set."""
    if params.images:
        from ..runs import image_files

        names = image_files(Path(params.images))[: params.train_images]
        if not names:
            raise ReceError(f"--images '{params.images}' has no images; put a few images of the concept there")
        return image_latents(target.pipe, [Path(params.images) / n for n in names])
    rows = target.rows
    picks = [(rows[j % len(rows)].prompt, target.seed + TRAIN_SEED_OFFSET + j) for j in range(params.train_images)]
    return original_latents(target, [p for p, _ in picks], [s for _, s in picks], sampling["steps"], sampling["guidance"])


def train(target: Target, params: Params, latents: torch.Tensor, maker: TokenRows, init_id: int, guidance: float,
          generator: torch.Generator) -> tuple[dict[int, torch.Tensor], float]:  # fmt: skip
    """Learn the placeholder's vector in each carrying encoder on `latents` with the edited model frozen; (the vectors
    [1, d_part] by part, mean loss of the last step)."""
    vectors = {p: maker.table(p)[init_id].clone().float()[None].requires_grad_(True) for p in maker.parts}
    optimizer = torch.optim.AdamW(list(vectors.values()), lr=params.effective_lr, weight_decay=WEIGHT_DECAY)
    stand_in, placeholder = torch.tensor([init_id]), maker.words[0]
    count, loss_value = train_steps(target.pipe.scheduler), float("nan")
    for _ in range(params.train_steps):
        optimizer.zero_grad()
        total = 0.0
        for _ in range(params.gradient_accumulation):
            pick = torch.randint(len(latents), (params.train_batch_size,), generator=generator)
            texts = [
                TEMPLATES[int(i)].format(placeholder)
                for i in torch.randint(len(TEMPLATES), (params.train_batch_size,), generator=generator)
            ]
            t = torch.randint(count, (params.train_batch_size,), generator=generator)
            x0 = latents[pick]
            noise = torch.randn(x0.shape, generator=generator)
            rows, attended = maker.rows(texts, vectors, stand_in, unwritten(maker))
            loss = denoising_loss(target.pipe, x0, rows, attended, t, noise, guidance)
            (loss / params.gradient_accumulation).backward()
            total += loss.item() / params.gradient_accumulation
        optimizer.step()
        loss_value = total
    return {p: v.detach() for p, v in vectors.items()}, loss_value


def prepare(target: Target, params: Params, store: dict, sampling: dict) -> tuple[dict, dict]:
    """Learn the placeholder's vectors once (kept as `token_embedding`, `token_embedding1`; reused on resume)."""
    if vector_key(0) in store:
        return {k: v for k, v in store.items() if k.startswith(vector_key(0))}, {}
    maker = TokenRows(target, [placeholder_name(params, target.concepts[0])])
    init_id = initializer_id(maker, params.initializer or target.concepts[0])
    start = time.perf_counter()
    latents = training_latents(target, params, sampling)
    image_seconds = time.perf_counter() - start
    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(target.seed)
    with frozen(*model_modules(target)):
        vectors, loss = train(target, params, latents, maker, init_id, sampling["guidance"], generator)
    info = {
        "placeholder": maker.words[0],
        "initializer_token": maker.tokenizers[maker.parts[0]].convert_ids_to_tokens(init_id),
        "training_images": len(latents),
        "final_loss": round(loss, 6),
        "attack_steps": params.train_steps,
        "seconds": round(time.perf_counter() - start, 4),
        "training_images_seconds": round(image_seconds, 4),
    }
    return {vector_key(j): vectors[p][0].cpu() for j, p in enumerate(maker.parts)}, info


def cases(target: Target, params: Params) -> list[AttackCase]:
    """One case per prompt row, labelled with the first concept."""
    return [AttackCase(r.case_number, r.prompt, r.seed, target.concepts[0], dict(r.labels)) for r in target.rows]


def attack_case(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """The case's prompt with the learned word in place of the concept, as rows of every space."""
    maker = TokenRows(target, [placeholder_name(params, case.concept)])
    init_id = initializer_id(maker, params.initializer or case.concept)
    text = insert_placeholder(case.prompt, case.concept, maker.words[0])
    vectors = {p: shared[vector_key(j)][None] for j, p in enumerate(maker.parts)}
    with torch.no_grad():
        rows, attended = maker.rows([text], vectors, torch.tensor([init_id]), unwritten(maker))
    tensors = space_tensors(target, case.case_number, rows, attended)
    return CaseResult(prompt=text, embeds=rows[0][0].cpu(), tensors=tensors, info={"attack_steps": 0})
