"""`textual-inversion`: Concept Inversion, the attack of "Circumventing Concept Erasure Methods for Text-to-Image
Generative Models" (Pham et al., ICLR 2024): Textual Inversion (Gal et al., ICLR 2023) run on the *edited* model.

A new word (the placeholder, e.g. "<triangle>") gets a token embedding v, initialised from `initializer`'s, and only v
is trained: on a few images of the concept (`images`, or `train_images` drawn by the original model from the prompt
set), with captions from Textual Inversion's templates ("a photo of a {}", ...), the edited model frozen, minimising
the usual denoising loss. Then every prompt of the set is generated with the concept word replaced by the placeholder
(or the placeholder prepended when the prompt does not name the concept).

adversarial.safetensors keeps v as `token_embedding` ([d_tok]); `pipe.load_textual_inversion({placeholder: v})` loads it.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..attack_options import TextualInversionOptions
from ..errors import ReceError
from .common import (
    AttackCase,
    CaseResult,
    Target,
    denoising_target,
    encode_token_embeddings,
    frozen,
    image_latents,
    original_latents,
    slug,
    token_embedding_table,
    tokenize,
)

NAME = "textual-inversion"
FAMILIES = ("sd",)  # a new token of the one CLIP encoder, trained through pipe.unet
NEEDS_PROMPTS = True
IMAGES_PER_PROMPT = 1
TEMPLATES = ("a photo of a {}", "a picture of a {}", "a drawing of a {}", "a {}")
TRAIN_SEED_OFFSET = 100_000  # training images use seeds the evaluation images of a set rarely use
WEIGHT_DECAY = 1e-2  # diffusers' textual_inversion.py AdamW default


@dataclass
class Params(TextualInversionOptions):
    """Concept Inversion's parameters (`rece.attack_options`) and how its manifest records them."""

    def resolved(self, target: Target) -> dict:
        out = asdict(self)
        out["images"] = str(Path(self.images).resolve()) if self.images else "drawn by the original model from the prompt set"
        out["initializer"] = self.initializer or target.concepts[0]
        out["placeholder"] = placeholder_name(self, target.concepts[0])
        out["effective_lr"] = self.effective_lr
        return out


def placeholder_name(params: Params, concept: str) -> str:
    """The new word: --placeholder, else '<concept>'."""
    return params.placeholder or f"<{slug(concept)}>"


def placeholder_tokenizer(pipe, placeholder: str):
    """A copy of the pipeline's tokenizer that knows the placeholder as one token; (tokenizer, placeholder id)."""
    tokenizer = copy.deepcopy(pipe.tokenizer)
    if tokenizer.add_tokens([placeholder]) == 0 and len(tokenizer.tokenize(placeholder)) != 1:
        raise ReceError(f"cannot add the placeholder '{placeholder}' to the tokenizer; choose another --placeholder")
    return tokenizer, tokenizer.convert_tokens_to_ids(placeholder)


def initializer_id(pipe, text: str) -> int:
    """The first token of `text` (the word v starts from)."""
    ids = tokenize(pipe, [text])[0]
    words = [int(i) for i in ids[1:] if int(i) not in (pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id)]
    if not words:
        raise ReceError(f"--initializer '{text}' has no token; pass a word")
    return words[0]


def insert_placeholder(prompt: str, concept: str, placeholder: str) -> str:
    """The prompt with the concept (whole words, any case) replaced by the placeholder, else the placeholder prepended."""
    pattern = re.compile(r"(?<!\w)" + re.escape(concept) + r"(?!\w)", re.IGNORECASE)
    if pattern.search(prompt):
        return pattern.sub(placeholder, prompt)
    return f"{placeholder} {prompt}".strip()


def placeholder_embeds(pipe, tokenizer, place_id: int, safe_id: int, texts: list[str], vector: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings [n, 77, d] of texts in which the placeholder token's embedding is `vector` (gradients flow)."""
    ids = tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    mask = ids == place_id
    safe = torch.where(mask, torch.full_like(ids, safe_id), ids)  # the encoder's lookup (and EOS position) never sees the new id
    table = token_embedding_table(pipe)
    token_embeds = table[safe.to(table.device)]
    token_embeds = torch.where(mask.to(table.device).unsqueeze(-1), vector.to(table.dtype).expand_as(token_embeds), token_embeds)
    return encode_token_embeddings(pipe, safe, token_embeds)


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


def train(target: Target, params: Params, latents: torch.Tensor, init_id: int, generator: torch.Generator):
    """Learn the placeholder's embedding on `latents` with the edited model frozen; (v, mean loss of the last step)."""
    pipe = target.pipe
    tokenizer, place_id = placeholder_tokenizer(pipe, placeholder_name(params, target.concepts[0]))
    vector = token_embedding_table(pipe)[init_id].clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([vector], lr=params.effective_lr, weight_decay=WEIGHT_DECAY)
    scheduler = pipe.scheduler
    device, dtype = pipe.unet.device, pipe.unet.dtype
    latents = latents.to(device, dtype)
    placeholder = tokenizer.convert_ids_to_tokens(place_id)
    loss_value = float("nan")
    for _ in range(params.train_steps):
        optimizer.zero_grad()
        total = 0.0
        for _ in range(params.gradient_accumulation):
            pick = torch.randint(len(latents), (params.train_batch_size,), generator=generator)
            texts = [
                TEMPLATES[int(i)].format(placeholder)
                for i in torch.randint(len(TEMPLATES), (params.train_batch_size,), generator=generator)
            ]
            x0 = latents[pick.to(device)]
            t = torch.randint(scheduler.config.num_train_timesteps, (params.train_batch_size,), generator=generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
            hidden = placeholder_embeds(pipe, tokenizer, place_id, init_id, texts, vector)
            pred = pipe.unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=hidden.to(dtype)).sample
            loss = torch.nn.functional.mse_loss(pred.float(), denoising_target(scheduler, x0, noise, t).float())
            (loss / params.gradient_accumulation).backward()
            total += loss.item() / params.gradient_accumulation
        optimizer.step()
        loss_value = total
    return vector.detach(), loss_value


def prepare(target: Target, params: Params, store: dict, sampling: dict) -> tuple[dict, dict]:
    """Learn the placeholder's embedding once (kept as `token_embedding`; reused when the run resumes)."""
    if "token_embedding" in store:
        return {"token_embedding": store["token_embedding"]}, {}
    pipe = target.pipe
    init_id = initializer_id(pipe, params.initializer or target.concepts[0])
    start = time.perf_counter()
    latents = training_latents(target, params, sampling)
    image_seconds = time.perf_counter() - start
    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(target.seed)
    with frozen(pipe.unet, pipe.text_encoder, pipe.vae):
        vector, loss = train(target, params, latents, init_id, generator)
    info = {
        "placeholder": placeholder_name(params, target.concepts[0]),
        "initializer_token": pipe.tokenizer.convert_ids_to_tokens(init_id),
        "training_images": len(latents),
        "final_loss": round(loss, 6),
        "attack_steps": params.train_steps,
        "seconds": round(time.perf_counter() - start, 4),
        "training_images_seconds": round(image_seconds, 4),
    }
    return {"token_embedding": vector.cpu()}, info


def cases(target: Target, params: Params) -> list[AttackCase]:
    """One case per prompt row, labelled with the first concept."""
    return [AttackCase(r.case_number, r.prompt, r.seed, target.concepts[0], dict(r.labels)) for r in target.rows]


def attack_case(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """The case's prompt with the learned word in place of the concept."""
    pipe = target.pipe
    placeholder = placeholder_name(params, case.concept)
    tokenizer, place_id = placeholder_tokenizer(pipe, placeholder)
    init_id = initializer_id(pipe, params.initializer or case.concept)
    text = insert_placeholder(case.prompt, case.concept, placeholder)
    with torch.no_grad():
        embeds = placeholder_embeds(pipe, tokenizer, place_id, init_id, [text], shared["token_embedding"])[0].float()
    return CaseResult(prompt=text, embeds=embeds.cpu(), info={"attack_steps": 0})
