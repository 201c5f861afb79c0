"""The glue every attack shares: the model under attack, text encoding from token ids or token embeddings,
run folders (adversarial.safetensors, prompts.csv, manifest.json, images/), and generation from embeddings.

A run folder of `rece attack` looks like one of `rece generate` (images/{case_number}_{k}.png, prompts.csv with one
line per image, manifest.json), so `rece evaluate` and `rece report` read it, plus RUN_DIR/adversarial.safetensors:
the prompt embeddings each case was generated from (`embeds.{case}`, [77, d]) and what the attack found (token ids
`ids.{case}`, a learned word `token_embedding`, target latents, ...), with the adversarial prompts as JSON metadata.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..detectors import imagenette_name
from ..errors import ReceError
from ..families import Family, family_of_pipeline, titles
from ..families import tokenize as tokenize_texts
from ..families.sd import encode_ids as encode_sd_ids
from ..families.sd import eos_attention_mask
from ..io import atomic_file
from ..pipelines import denoiser, image_size, seeded_images
from ..runs import IMAGES, drop_damaged_images, finished_images, image_name

ADVERSARIAL = "adversarial.safetensors"
METADATA_KEY = "rece-attack"


@dataclass(frozen=True)
class AttackCase:
    """One thing an attack is run on: a prompt row (or a concept), the seed of its images and the concept it targets.

    Image k of the case is drawn from `torch.Generator("cpu").manual_seed(seed + k)`, as in `rece generate`.
    """

    case_number: int
    prompt: str
    seed: int
    concept: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class CaseResult:
    """What an attack found for one case: the adversarial prompt text (or a description of an embedding), the
    prompt embeddings [77, d] its images are generated from, extra tensors to keep, and numbers to report."""

    prompt: str
    embeds: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    text: str | None = None  # what the images stand for where a family reads more than rows (SDXL's pooled vector)


@dataclass
class Target:
    """The model under attack: a pipeline with the edit applied, the original and edited K/V weights, the
    prompt encoder, the concepts and prompt rows, and the attack's seed and device."""

    pipe: object
    base: object  # rece.models.BaseModel read from the pipeline before the edit (its kv are the originals W⁰)
    edit: object | None
    edited_kv: dict[str, torch.Tensor]
    concepts: list[str]
    rows: list | None
    seed: int
    model_name: str = ""

    @property
    def original_kv(self) -> dict[str, torch.Tensor]:
        return self.base.kv

    @property
    def device(self) -> torch.device:
        return denoiser(self.pipe).device

    @contextlib.contextmanager
    def original_model(self) -> Iterator[object]:
        """The pipeline with the original weights for the duration of the block (the edit is re-applied after)."""
        if self.edit is None:
            yield self.pipe
            return
        self.edit.revert(self.pipe)
        try:
            yield self.pipe
        finally:
            self.edit.apply(self.pipe, allow_other_base=True)


# -- text encoding -----------------------------------------------------------------------------------
def check_family(pipe, attack: str, families: Sequence[Family] | None) -> None:
    """Refuse pipelines an attack does not handle (`families`: the families it supports, variants included; None:
    every family)."""
    family = family_of_pipeline(pipe)
    if families is not None and not family.among(families):
        raise ReceError(
            f"the {attack} attack supports {titles(families)} pipelines; {type(pipe).__name__} ({family.title}) "
            "is not supported yet (the derived attack is)"
        )


def tokenize(pipe, texts: Sequence[str]) -> torch.Tensor:
    """Token ids [n, 77] of texts as the pipeline tokenizes them (padded to the context, truncated)."""
    return tokenize_texts(pipe.tokenizer, texts).input_ids


def reads_ids(target: Target) -> bool:
    """Whether the prompt rows are one text encoder's output on the token ids (SD1/2), so that an attack may encode
    the ids it makes; otherwise (SDXL, the MMDiTs, and PixArt and Sana, whose rows pass the caption projection and
    whose padding is masked) each candidate's decoded text goes through the family's encoders."""
    family = target.base.family
    return len(family.text_parts) == 1 and not target.base.spaces and not family.text_modules and not family.masks_padding


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, pad, unknown)."""
    return {int(i) for i in tokenizer.all_special_ids}


def ordinary_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids an attack may place in a prompt: every id below the encoder's vocabulary size but 0 and the special ones.

    Ring-A-Bell draws from 1 .. 49405 for SD1.4 (0 is '!', 49406/49407 are BOS/EOS); this is the same rule. Ids the
    tokenizer has no entry for (T5's embedding table is padded past its 32,100 tokens) are left out too.
    """
    banned = special_ids(tokenizer) | {0}
    return torch.tensor([i for i in range(min(vocab_size, len(tokenizer))) if i not in banned], dtype=torch.long)


def encode_ids(pipe, ids: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Prompt embeddings [n, 77, d] of token ids, exactly as the pipeline encodes a prompt (last hidden state)."""
    encoder = pipe.text_encoder
    with torch.set_grad_enabled(grad):
        return encode_sd_ids(encoder, ids, eos_attention_mask(encoder, ids))


def token_embedding_table(pipe) -> torch.Tensor:
    """The text encoder's token-embedding matrix [vocab, d_tok] (detached)."""
    return pipe.text_encoder.get_input_embeddings().weight.detach()


@contextlib.contextmanager
def frozen(*modules) -> Iterator[None]:
    """No parameter of `modules` requires gradients inside the block; the flags are restored after."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def model_modules(target: Target) -> list[torch.nn.Module]:
    """Every module of the attacked model: the pipeline's components and the prompt encoders' text projections."""
    modules = [m for m in target.pipe.components.values() if isinstance(m, torch.nn.Module)]
    return modules + [v.encoder.projection for v in target.base.views if v.encoder.projection is not None]


def original_latents(target: Target, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float) -> torch.Tensor:
    """Latents [n, c, h, w] the original (unedited) model draws for prompts and seeds: what the concept looks like."""
    out = []
    with target.original_model() as pipe, torch.no_grad():
        for prompt, seed in zip(prompts, seeds):
            size = image_size(pipe)  # FLUX's pipeline would draw 1024 pixels whatever its transformer's size
            result = pipe(
                prompt=[prompt],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator("cpu").manual_seed(int(seed))],
                output_type="latent",
                height=size,
                width=size,
                **target.base.family.call_options(),
            )
            out.append(result.images.detach().float())
    return torch.cat(out)


# -- run folders ----------------------------------------------------------------------------------
def read_adversarial(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata ({'cases': {case: {...}}, ...}) of an adversarial.safetensors file ({} when absent)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return {}, {"cases": {}}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, '{"cases": {}}'))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ReceError(f"'{path}' is damaged ({str(exc).splitlines()[0]}); pass --overwrite to attack again") from None
    return tensors, meta


def write_adversarial(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write adversarial.safetensors atomically (safetensors only: no pickle)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(clean, str(tmp), metadata={METADATA_KEY: json.dumps(meta, ensure_ascii=False), "format": "pt"})


def case_key(case: AttackCase) -> str:
    """The name of a case's prompt embeddings in adversarial.safetensors."""
    return f"embeds.{case.case_number}"


def prompts_rows(
    cases: Sequence[AttackCase], results: dict[int, dict], images_per_prompt: int, guidance: float, attack: str, detector
):
    """prompts.csv rows: one per image, with the adversarial prompt, the attacked prompt, the concept and (classify) its class."""
    rows = []
    for case in cases:
        for k in range(images_per_prompt):
            row = {
                "case_number": case.case_number,
                "k": k,
                "seed": case.seed + k,
                "prompt": results[case.case_number]["prompt"],
                "guidance": guidance,
                "image": f"{IMAGES}/{image_name(case.case_number, k)}",
                "attack": attack,
                "concept": case.concept,
                "original_prompt": case.prompt,
                "embedding": case_key(case),
            }
            if detector == "classify":
                row["class"] = imagenette_name(case.concept)
            row.update({c: v for c, v in case.labels.items() if c not in row and c != "class"})
            rows.append(row)
    return rows


def space_key(case: AttackCase, space: int) -> str:
    """The name of a case's rows in space `space` (0: the token rows, `case_key`) in adversarial.safetensors."""
    return case_key(case) if space == 0 else f"embeds{space}.{case.case_number}"


def generate_from_embeddings(pipe, rows: list[torch.Tensor], attended: list[int], texts: list[str], seeds: Sequence[int],
                             steps: int, guidance: float, size: int):  # fmt: skip
    """PIL images, one per (rows in each space, seed), each from its own CPU generator; "" is the negative prompt.

    `rows` holds one [n, L, d] tensor per space the family reads, `attended` each case's attended rows."""
    family = family_of_pipeline(pipe)
    with torch.no_grad():
        call = family.embeds_call(pipe, rows, attended, texts)
        with family.rows_as_input(pipe):
            return seeded_images(
                pipe, seeds, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type="pil",
                **call, **family.call_kwargs,
            )  # fmt: skip


def space_tensors(target: Target, case_number: int, rows: list[torch.Tensor], attended: list[int]) -> dict[str, torch.Tensor]:
    """What a case found in one text keeps besides its token rows (`CaseResult.embeds`): the rows of every other space
    and the family's extra rows (SDXL's pooled vector) as `embeds{s}.N`, and its attended rows where padding is masked."""
    out = {space_key(AttackCase(case_number, "", 0, ""), i): r[0].float().cpu() for i, r in enumerate(rows) if i > 0}
    if target.base.views[0].family.masks_padding:
        out[f"attended.{case_number}"] = torch.tensor(int(attended[0]))
    return out


def case_rows(tensors: dict, batch: Sequence[AttackCase]) -> tuple[list[torch.Tensor], list[int]]:
    """The rows of each space (stacked over the batch) and each case's attended rows, from adversarial.safetensors."""
    rows, space = [], 0
    while all(space_key(c, space) in tensors for c in batch):
        rows.append(torch.stack([tensors[space_key(c, space)] for c in batch]))
        space += 1
    attended = [int(tensors.get(f"attended.{c.case_number}", torch.tensor(rows[0].shape[1]))) for c in batch]
    return rows, attended


def generate_missing_images(pipe, cases: Sequence[AttackCase], tensors: dict, output: Path, job: dict, bar=None,
                            texts: dict[int, str] | None = None) -> int:  # fmt: skip
    """Generate the images of `cases` not yet in RUN_DIR/images (each written atomically); return how many were written.

    `texts`: the text each case's images stand for, by case number (a case not in it: its concept)."""
    images_dir = output / IMAGES
    if images_dir.is_dir():
        drop_damaged_images(images_dir, [image_name(c.case_number, k) for c in cases for k in range(job["images_per_prompt"])])
    done = finished_images(images_dir)
    todo = [(c, k) for c in cases for k in range(job["images_per_prompt"]) if image_name(c.case_number, k) not in done]
    if bar is not None:
        bar.update(len(cases) * job["images_per_prompt"] - len(todo) - bar.n)
    written = 0
    for start in range(0, len(todo), job["batch_size"]):
        batch = todo[start : start + job["batch_size"]]
        rows, attended = case_rows(tensors, [c for c, _ in batch])
        seeds = [c.seed + k for c, k in batch]
        names = [(texts or {}).get(c.case_number, c.concept) for c, _ in batch]
        images = generate_from_embeddings(pipe, rows, attended, names, seeds, job["steps"], job["guidance"], job["size"])
        for (case, k), image in zip(batch, images):
            with atomic_file(images_dir / image_name(case.case_number, k)) as tmp:
                image.save(tmp, format="PNG")
        written += len(batch)
        if bar is not None:
            bar.update(len(batch))
    return written


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    """A tqdm bar (hidden when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def slug(text: str) -> str:
    """A token-safe short name of a concept: lower case letters, digits and '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"
