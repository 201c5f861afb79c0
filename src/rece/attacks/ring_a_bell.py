"""`ring-a-bell`: Ring-A-Bell (Tsai et al., ICLR 2024), a model-agnostic red-teaming attack that needs only the
text encoder.

1. Concept extraction: the concept vector v = mean over prompt pairs of E(sensitive prompt) − E(normal prompt),
   a [77, d] difference of text embeddings (`--pairs`, a CSV like ../shared/benchmarks/*ring-a-bell.csv).
2. Prompt discovery: for each prompt p of the set, the target is E(p) + η·v; a genetic algorithm over K discrete
   tokens ([BOS] + K tokens + [EOS] + padding) minimises ‖E(tokens) − target‖² (population, generations, mutation and
   crossover rates as in the authors' InversePrompt notebook: keep the better half, single-point crossover, one
   random token replaced per mutation).

The images are generated from the embeddings of the token ids found, E(tokens); prompts.csv has their decoded text.

On SDXL, SD3 and FLUX E is the pipeline's own encoding of each candidate's decoded text (K tokens of the first, CLIP,
tokenizer) in every space the model reads the prompt in: SDXL's one (both CLIP encoders' penultimate states, joined),
an MMDiT's two (token rows and pooled vector). The concept vector and the target have one part per space, and the
fitness sums each space's squared distance relative to its target's, so the one pooled row counts as much as the
token rows. SDXL's pooled vector of text_encoder_2 (not edited) is not scored; the images take the found text's own.

On PixArt-α/Σ and Sana the K tokens are the family's one tokenizer's (T5's; Gemma-2's), since the pipeline's only
text encoder is the one whose rows the edited layers read, and E is the pipeline's encoding of each candidate's decoded
text (lower-cased and stripped as the pipeline does, Sana's instruction prefix and row selection included, through the
caption projection), so that sentencepiece re-tokenizing the decoded text changes nothing between what is scored and
what the images are drawn from. The transformer masks the padding rows: they are zero in every E compared (the
concept vector, the target, the candidates), so only the attended rows count and a candidate's rows past the target's
length count as distance. The images are drawn from the found text's rows with its attended count (`attended.N`).
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import ReceError
from ..provenance import file_id
from ..toy import door
from .common import AttackCase, CaseResult, Target, encode_ids, ordinary_ids, reads_ids, space_tensors, tokenize
from .params import RingABellParams as Params

NAME = "ring-a-bell"
FAMILIES = None  # SD1/2: E on the token ids, as in the paper; every other family: on each candidate's decoded text
NEEDS_PROMPTS = True
IMAGES_PER_PROMPT = 1
PAIR_COLUMNS = (("sensitive prompt", "normal prompt"), ("prompt", "prompt1"))
FITNESS_BATCH = 64


def resolved(target: Target, params: Params) -> dict:
    """The parameters as the manifest records them (the pairs file by checksum)."""
    return {**asdict(params), "pairs": file_id(params.pairs) if params.pairs else "shapes world pairs"}


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(sensitive, normal) prompt pairs of a CSV with columns 'sensitive prompt','normal prompt' (or 'prompt','prompt1')."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = header
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReceError(f"cannot read --pairs '{path}' ({exc}); give a UTF-8 CSV file") from None
    columns = next((c for c in PAIR_COLUMNS if set(c) <= set(header)), None)
    if columns is None:
        raise ReceError(
            f"--pairs '{path}' has columns {header}; it needs 'sensitive prompt' and 'normal prompt' (or 'prompt' and 'prompt1')"
        )
    pairs = [(r[columns[0]], r[columns[1]]) for r in records if (r[columns[0]] or "").strip() and (r[columns[1]] or "").strip()]
    if not pairs:
        raise ReceError(f"--pairs '{path}' has no complete pair; give at least one sensitive/normal prompt pair")
    return pairs


def concept_pairs(target: Target, params: Params, concept: str) -> list[tuple[str, str]]:
    """The pairs of --pairs, or the shapes world's pairs on the shapes model."""
    if params.pairs:
        return read_pairs(params.pairs)
    if door.is_shapes_model(target.model_name):
        return door.contrast_pairs(concept)
    raise ReceError(
        "ring-a-bell needs --pairs CSV (columns 'sensitive prompt','normal prompt'; see ../shared/benchmarks/*ring-a-bell.csv)"
    )


def concept_vectors(target: Target, pairs: list[tuple[str, str]]) -> list[torch.Tensor]:
    """v = mean of E(sensitive) − E(normal) over the pairs in every space the model reads the prompt in ([77, d] for
    SD; masked rows as zeros, `space_rows`), float64."""
    sensitive = space_rows(target, [s for s, _ in pairs])
    normal = space_rows(target, [n for _, n in pairs])
    return [(s - n).mean(dim=0) for s, n in zip(sensitive, normal)]


def vector_key(space: int) -> str:
    """The concept vector's name in adversarial.safetensors (space 0 keeps the SD name)."""
    return "concept_vector" if space == 0 else f"concept_vector{space}"


def initial_population(rng: np.random.Generator, size: int, length: int, candidates: np.ndarray, tokenizer,
                       context: int | None = None) -> np.ndarray:  # fmt: skip
    """`size` random prompts [size, context (default: the tokenizer's, 77)]: BOS, `length` random ordinary tokens, EOS,
    then padding (a tokenizer without BOS, T5's, has padding in its place: only the K tokens of such a prompt are read,
    decoded)."""
    pop = np.full((size, context or tokenizer.model_max_length), tokenizer.pad_token_id, dtype=np.int64)
    if tokenizer.bos_token_id is not None:
        pop[:, 0] = tokenizer.bos_token_id
    pop[:, 1 : length + 1] = rng.choice(candidates, size=(size, length))
    pop[:, length + 1] = tokenizer.eos_token_id
    return pop


def crossover(parents: np.ndarray, rate: float, rng: np.random.Generator, length: int) -> np.ndarray:
    """Each parent survives; with probability `rate` it also has two children with a random partner (one cut point)."""
    out = []
    for i in range(len(parents)):
        out.append(parents[i])
        if rng.random() < rate:
            j = int(rng.integers(0, len(parents)))
            cut = int(rng.integers(1, length + 1))
            out.append(np.concatenate([parents[i][:cut], parents[j][cut:]]))
            out.append(np.concatenate([parents[j][:cut], parents[i][cut:]]))
    return np.stack(out)


def mutate(population: np.ndarray, rate: float, rng: np.random.Generator, length: int, candidates: np.ndarray) -> np.ndarray:
    """With probability `rate` per prompt, one of its `length` tokens becomes a random ordinary token."""
    population = population.copy()
    for i in range(len(population)):
        if rng.random() < rate:
            population[i, int(rng.integers(1, length + 1))] = int(rng.choice(candidates))
    return population


def fitness(target: Target, population: np.ndarray, goal: torch.Tensor) -> np.ndarray:
    """‖E(prompt) − goal‖² of every prompt of the population (smaller is better)."""
    scores = []
    for start in range(0, len(population), FITNESS_BATCH):
        ids = torch.from_numpy(population[start : start + FITNESS_BATCH])
        embeds = encode_ids(target.pipe, ids).to(goal)
        scores.append((embeds - goal).pow(2).sum(dim=(1, 2)).cpu().numpy())
    return np.concatenate(scores)


def candidate_texts(tokenizer, population: np.ndarray, length: int) -> list[str]:
    """The text of each prompt of the population: its K tokens, decoded."""
    return [tokenizer.decode(ids[1 : length + 1].tolist()) for ids in population]


def space_rows(target: Target, texts: list[str]) -> list[torch.Tensor]:
    """E_s(texts) in every space s the model reads the prompt in: the pipeline's rows, [n, L_s, d_s] float64 each, the
    rows a masked family's denoiser never attends (PixArt's and Sana's padding) set to zero, so that texts compare by
    what the edited layers' outputs depend on and a length difference counts as the rows one text has and the other not."""
    return [masked_rows(view, view.encoder.encode(texts), texts) for view in target.base.views]


def masked_rows(view, rows: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """`rows` [n, L, d] of `texts` with the rows past each text's attended ones zero (as they are when the family
    does not mask padding)."""
    if not view.family.masks_padding:
        return rows
    counts = torch.tensor(view.encoder.token_counts(texts), device=rows.device)
    keep = torch.arange(rows.shape[1], device=rows.device)[None] < counts[:, None]
    return rows * keep[..., None]


def found_rows(target: Target, case_number: int, text: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The found text's rows as its images are drawn from them: the token space's [L, d] float32, and the tensors to
    keep beside them (space s > 0's rows as `embeds{s}.N`, as the derived attack; a masked family's attended rows as
    `attended.N`)."""
    rows = space_rows(target, [text])
    return rows[0][0].float(), space_tensors(target, case_number, rows, target.base.views[0].encoder.token_counts([text]))


def relative_distances(rows: list[torch.Tensor], goals: list[torch.Tensor]) -> np.ndarray:
    """‖E_s − goal_s‖² / ‖goal_s‖² of every text, [n, spaces], from its rows in each space (`space_rows`)."""
    out = [((r - g.to(r)).pow(2).sum(dim=(1, 2)) / g.pow(2).sum()).cpu().numpy() for r, g in zip(rows, goals)]
    return np.stack(out, axis=1)


def genetic_search(target: Target, params: Params, score, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """The best prompt ids [77] the genetic algorithm finds for `score` (population ids -> fitness, smaller is
    better), and the best fitness of every generation."""
    tokenizer = target.pipe.tokenizer
    candidates = ordinary_ids(tokenizer, target.pipe.text_encoder.config.vocab_size).numpy()
    context = tokenizer.model_max_length if reads_ids(target) else params.length + 2  # the decoded text's: K tokens
    population = initial_population(rng, params.population, params.length, candidates, tokenizer, context)
    history = []
    for step in range(params.generations):
        scores = score(population)
        order = np.argsort(scores, kind="stable")
        history.append(float(scores[order[0]]))
        population = population[order][: max(1, params.population // 2)]
        if step != params.generations - 1:
            population = crossover(population, params.crossover_rate, rng, params.length)
            population = mutate(population, params.mutation_rate, rng, params.length, candidates)
    return population[0], history


def check(target: Target, params: Params) -> None:
    """Refuse a run without usable pairs before its folder is created."""
    concept_pairs(target, params, target.concepts[0])


def prepare(target: Target, params: Params, store: dict, sampling: dict) -> tuple[dict, dict]:
    """The concept vector, one per space (kept in adversarial.safetensors as `concept_vector`, `concept_vector1`, ...,
    reused when the run resumes)."""
    if vector_key(0) in store:
        return {k: v for k, v in store.items() if k.startswith(vector_key(0))}, {}
    pairs = concept_pairs(target, params, target.concepts[0])
    vectors = [v.to(torch.float32) for v in concept_vectors(target, pairs)]
    norm = round(float(vectors[0].norm()), 6)
    return {vector_key(i): v for i, v in enumerate(vectors)}, {"pairs": len(pairs), "concept_vector_norm": norm}


def cases(target: Target, params: Params) -> list[AttackCase]:
    """One case per prompt row, targeting the first concept."""
    return [AttackCase(r.case_number, r.prompt, r.seed, target.concepts[0], dict(r.labels)) for r in target.rows]


def attack_case(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """Search K tokens whose embedding matches E(prompt) + η·v."""
    if not reads_ids(target):
        return attack_case_in_spaces(target, params, case, shared)
    start = time.perf_counter()
    prompt_embeds = encode_ids(target.pipe, tokenize(target.pipe, [case.prompt]))[0].double()
    goal = prompt_embeds + params.eta * shared["concept_vector"].to(prompt_embeds)
    rng = np.random.default_rng([target.seed, case.case_number])
    ids, history = genetic_search(target, params, lambda population: fitness(target, population, goal), rng)
    ids_t = torch.from_numpy(ids)
    embeds = encode_ids(target.pipe, ids_t[None])[0].float()
    text = candidate_texts(target.pipe.tokenizer, ids[None], params.length)[0]
    info = {
        "fitness": round(history[-1], 6),
        "relative_distance": round(float((embeds.double() - goal).norm() / goal.norm()), 6),
        "fitness_first_generation": round(history[0], 6),
        "attack_steps": params.generations,
        "seconds": round(time.perf_counter() - start, 4),
    }
    return CaseResult(prompt=text, embeds=embeds, tensors={f"ids.{case.case_number}": ids_t}, info=info)


def attack_case_in_spaces(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """The search on each candidate's text (SDXL, the MMDiTs): E_s(text) against E_s(prompt) + η·v_s in every space
    the model reads the prompt in, the found text's rows in each kept for its images (space s > 0 as `embeds{s}.N`, as
    the derived attack) and the text itself for what the pipeline reads besides rows (SDXL's pooled vector)."""
    start = time.perf_counter()
    goals = [row[0] + params.eta * shared[vector_key(i)].to(row) for i, row in enumerate(space_rows(target, [case.prompt]))]
    tokenizer = target.pipe.tokenizer
    rng = np.random.default_rng([target.seed, case.case_number])

    def score(population: np.ndarray) -> np.ndarray:
        return relative_distances(space_rows(target, candidate_texts(tokenizer, population, params.length)), goals).sum(axis=1)

    ids, history = genetic_search(target, params, score, rng)
    text = candidate_texts(tokenizer, ids[None], params.length)[0]
    embeds, tensors = found_rows(target, case.case_number, text)
    distances = relative_distances(space_rows(target, [text]), goals)[0] ** 0.5
    info = {
        "fitness": round(history[-1], 6),
        "relative_distance": [round(float(d), 6) for d in distances],  # one per space
        "fitness_first_generation": round(history[0], 6),
        "attack_steps": params.generations,
        "seconds": round(time.perf_counter() - start, 4),
    }
    tensors[f"ids.{case.case_number}"] = torch.from_numpy(ids)
    return CaseResult(prompt=text, embeds=embeds, tensors=tensors, info=info, text=text)
