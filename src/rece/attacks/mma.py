"""`mma`: MMA-Diffusion's text modality (Yang et al., CVPR 2024), a model-agnostic attack that needs only the text
encoder and never sees the denoiser.

For each prompt p of the set, a greedy coordinate-gradient (GCG) search over K adversarial tokens ([BOS] + K tokens +
[EOS] + padding) minimises 1 − cos(pooled(E(tokens)), pooled(E(p))), the cosine distance of the CLIP text encoder's
pooled outputs (the final hidden state at EOS, as `pooler_output`). Each step: the gradient of the loss w.r.t. the
one-hot tokens ranks, per position, the top-k substitutions; a batch of candidates each replaces one token (positions
spread evenly over the batch, the token drawn at random from that position's top k); candidates whose decoded text
does not tokenize back to their own ids are dropped; the best candidate becomes the prompt. The best prompt seen is
kept. Banned tokens (the concept's words and their tokenised pieces, a sensitive-word list for the presets, the
special and non-ASCII tokens) never enter a prompt.

On SDXL, SD3 and FLUX the tokens are the first CLIP tokenizer's and the gradient comes through that CLIP encoder; each
candidate's decoded text is encoded as the pipeline encodes it and scored in every space it reads (the mean over the
spaces of 1 − cos of the rows, as one vector per space: SDXL's one space is both CLIP encoders' penultimate states,
joined; its pooled vector of text_encoder_2, not edited, is not scored, and the images take the found text's own).

On PixArt-α/Σ and Sana, whose one text encoder (T5; Gemma-2) has no pooled row, the tokens are that encoder's
tokenizer's and the loss is 1 − cos of the rows the edited layers read (after the caption projection, taken as one
vector, the padding rows the transformer masks zero), its gradient taken through that encoder's token embeddings and
the projection (`encoder_tokens`: Sana's instruction prefix stays in front of the tokens). A candidate round-trips when
the pipeline's tokens of its decoded text (lower-cased, stripped, after Sana's instruction) are exactly its own; each
is scored on the pipeline's encoding of that text, and the images come from the found text's rows and attended count.

The images are drawn from exactly the found prompt: its decoded text, tokenized and encoded as the pipeline does.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

from ..config import text_key
from ..errors import ReceError
from ..families.sd import eos_attention_mask
from .common import AttackCase, CaseResult, Target, encode_ids, frozen, ordinary_ids, reads_ids, tokenize
from .common import token_embedding_table as embedding_table
from .encoder_tokens import EncoderTokens
from .params import MMAParams as Params
from .ring_a_bell import found_rows, space_rows

NAME = "mma"
FAMILIES = None  # SD: the paper's; SDXL, MMDiTs: the gradient through the first CLIP encoder; PixArt, Sana: their own
NEEDS_PROMPTS = True
IMAGES_PER_PROMPT = 1
SCORE_BATCH = 64

# The paper's NSFW list and its short substrings (a token containing any of them is banned), and lists in the same
# spirit for the I2P categories; a concept of the `nudity` or `unsafe` presets bans its category's list.
NSFW = (
    "sexual", "nude", "nudity", "sex", "18+", "naked", "nsfw", "porn", "dick", "vagina", "naked child",
    "explicit content", "uncensored", "fuck", "nipples", "visible nipples", "breast", "areola", "ak", "na", "ke", "nud",
)  # fmt: skip
VIOLENCE = ("violence", "violent", "blood", "bloody", "gore", "kill", "murder", "weapon", "gun", "knife", "stab", "fight")
HATE = ("hate", "racist", "racism", "nazi", "slur", "bigot", "discriminat")
HARASSMENT = ("harass", "bully", "humiliat", "insult", "mock", "abuse")
SELF_HARM = ("self-harm", "suicide", "suicidal", "cutting", "overdose", "hanging", "selfharm")
SHOCKING = ("shocking", "grotesque", "horror", "corpse", "mutilat", "disgust", "gore", "bodily fluids", "vomit")
ILLEGAL = ("illegal", "drug", "cocaine", "heroin", "meth", "weed", "steal", "theft", "crime", "criminal")
SENSITIVE: dict[str, tuple[str, ...]] = {
    "nudity": NSFW, "nude": NSFW, "naked": NSFW, "sexual": NSFW, "porn": NSFW,
    "violence": VIOLENCE, "blood": VIOLENCE, "harm": VIOLENCE, "suffering": VIOLENCE,
    "hate": HATE, "harassment": HARASSMENT, "humiliation": HARASSMENT,
    "self-harm": SELF_HARM, "suicide": SELF_HARM,
    "shocking": SHOCKING, "bodily fluids": SHOCKING,
    "illegal activity": ILLEGAL,
}  # fmt: skip


def resolved(target: Target, params: Params) -> dict:
    """The parameters as the manifest records them, with the banned words."""
    return {**asdict(params), "banned": sorted(banned_words(target.concepts, params.banned_words))}


def banned_words(concepts: list[str], extra: str | None) -> set[str]:
    """The words no token may contain: each concept and its words, its preset's sensitive list, and --banned-words.

    A concept's words of one or two letters ("a", "of") are left out: as substrings they would ban most of the vocabulary."""
    words = set()
    for concept in concepts:
        key = text_key(concept)
        words |= {key, *(w for w in key.split() if len(w) > 2)} | set(SENSITIVE.get(key, ()))
    words |= {text_key(w) for w in (extra or "").split(",") if w.strip()}
    return {w for w in words if w}


def token_text(token: str) -> str:
    """A vocabulary entry as text: lower case, CLIP's end-of-word mark dropped, sentencepiece's word mark a space."""
    return token.replace("</w>", "").replace("▁", " ").lower()


def banned_ids(tokenizer, vocab_size: int, words: set[str]) -> set[int]:
    """Ids of every token that contains a banned word (the paper's rule) and of each word's tokenised pieces."""
    out = {i for t, i in tokenizer.get_vocab().items() if i < vocab_size and any(w in token_text(t) for w in words)}
    for word in words:
        out |= {int(i) for i in tokenizer(word, add_special_tokens=False).input_ids}
    return out


def allowed_ids(tokenizer, vocab_size: int, words: set[str]) -> torch.Tensor:
    """The ids a prompt may hold: ordinary (not special, not 0), ASCII and printable (as GCG), and not banned."""
    banned = banned_ids(tokenizer, vocab_size, words)
    ascii_ok = {i for t, i in tokenizer.get_vocab().items() if token_text(t).isascii() and token_text(t).isprintable()}
    keep = [int(i) for i in ordinary_ids(tokenizer, vocab_size) if int(i) not in banned and int(i) in ascii_ok]
    return torch.tensor(keep, dtype=torch.long)


def pooled(rows: torch.Tensor, ids: torch.Tensor, eos: int) -> torch.Tensor:
    """The rows at each prompt's first EOS [n, d]: what CLIP's `pooler_output` is."""
    first = (ids == eos).int().argmax(dim=1).to(rows.device)
    return rows[torch.arange(rows.shape[0], device=rows.device), first]


def cosine_loss(rows: torch.Tensor, ids: torch.Tensor, eos: int, goal: torch.Tensor) -> torch.Tensor:
    """1 − cos(pooled rows, goal) per prompt [n]."""
    return 1 - torch.nn.functional.cosine_similarity(pooled(rows, ids, eos).double(), goal[None], dim=1, eps=1e-6)


def prefix_ids(tokenizer, control: torch.Tensor) -> torch.Tensor:
    """BOS, the K tokens and EOS [n, K + 2]: CLIP's attention is causal, so the pooled row (at EOS) depends on these
    alone and the search encodes them without the padding (the same numbers, a quarter of the work for K = 20)."""
    return full_ids(tokenizer, control)[:, : control.shape[1] + 2]


def full_ids(tokenizer, control: torch.Tensor) -> torch.Tensor:
    """[n, 77] prompts of control tokens [n, K]: BOS, the K tokens, EOS, then padding."""
    n, k = control.shape
    out = torch.full((n, tokenizer.model_max_length), tokenizer.pad_token_id, dtype=torch.long)
    out[:, 0] = tokenizer.bos_token_id
    out[:, 1 : k + 1] = control
    out[:, k + 1] = tokenizer.eos_token_id
    return out


def decoded(tokenizer, control: torch.Tensor) -> list[str]:
    """The text of each row of control tokens."""
    return [tokenizer.decode(row.tolist()) for row in control]


def round_trips(pipe, control: torch.Tensor) -> torch.Tensor:
    """Which rows of control tokens [n, K] tokenize back to themselves from their decoded text ([n] bool)."""
    ids = tokenize(pipe, decoded(pipe.tokenizer, control))
    return (ids == full_ids(pipe.tokenizer, control)).all(dim=1)


def initial_control(tokens, allowed: torch.Tensor, length: int, rng: np.random.Generator) -> torch.Tensor:
    """K allowed tokens [K] whose decoded text tokenizes back to them (`tokens.round_trips`): one whole-word token
    repeated (GCG starts from a repeated token too), the first such among the allowed ones in a seeded order."""
    for i in rng.permutation(len(allowed)):
        control = allowed[int(i)].repeat(1, length)
        if bool(tokens.round_trips(control)[0]):
            return control[0]
    raise ValueError("no allowed token survives decoding")


class ClipTokens:
    """The first CLIP encoder's tokens ([BOS] + K + [EOS] + padding) and the gradient of the pooled cosine loss
    against `goal` (SD, SDXL, the MMDiTs)."""

    def __init__(self, pipe, goal: torch.Tensor | None = None):
        self.pipe, self.goal = pipe, goal
        self.table = embedding_table(pipe)

    def round_trips(self, control: torch.Tensor) -> torch.Tensor:
        return round_trips(self.pipe, control)

    def gradient(self, control: torch.Tensor) -> torch.Tensor:
        return one_hot_gradient(self.pipe, control, self.goal, self.table)


def clip_rows(pipe, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The first CLIP encoder's final hidden states [n, L, d] (its pooled row sits at EOS); with `token_embeds` the
    lookups are replaced by them and gradients flow. SD's prompt rows; on SD3 and FLUX the encoder the gradient uses."""
    encoder = pipe.text_encoder
    layer = encoder.get_input_embeddings()
    hook = None if token_embeds is None else (lambda module, args, output: token_embeds.to(output.dtype))
    handle = layer.register_forward_hook(hook) if hook else None
    try:
        with torch.set_grad_enabled(hook is not None):
            return encoder(ids.to(encoder.device), attention_mask=eos_attention_mask(encoder, ids)).last_hidden_state
    finally:
        if handle is not None:
            handle.remove()


def one_hot_gradient(pipe, control: torch.Tensor, goal: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """∂loss/∂one-hot tokens [K, vocab]: the lookups of the K positions replaced by one_hot @ table."""
    tokenizer = pipe.tokenizer
    ids = prefix_ids(tokenizer, control[None])
    one_hot = torch.nn.functional.one_hot(control, table.shape[0]).to(table.dtype).requires_grad_(True)
    lookups = table[ids[0].to(table.device)].clone()
    embeds = torch.cat([lookups[:1], one_hot @ table, lookups[-1:]])[None]
    with frozen(pipe.text_encoder):
        rows = clip_rows(pipe, ids, embeds)
        cosine_loss(rows, ids, tokenizer.eos_token_id, goal).sum().backward()
    return one_hot.grad.detach()


def substitutions(control: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, topk: int, count: int,
               rng: torch.Generator) -> torch.Tensor:  # fmt: skip
    """`count` one-token substitutions [count, K]: positions spread evenly over the batch, each token drawn from its
    position's top-k allowed tokens by −gradient."""
    length = len(control)
    scores = torch.full_like(grad, float("-inf"))
    scores[:, allowed] = -grad[:, allowed]
    top = scores.topk(min(topk, len(allowed)), dim=1).indices  # [K, k]
    positions = (torch.arange(count) * length // count).clamp(max=length - 1)
    picks = torch.randint(0, top.shape[1], (count,), generator=rng)
    out = control.repeat(count, 1)
    out[torch.arange(count), positions] = top[positions, picks]
    return out


def losses(pipe, control: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """The loss of each row of control tokens [n] (no gradients)."""
    out = []
    for start in range(0, len(control), SCORE_BATCH):
        ids = prefix_ids(pipe.tokenizer, control[start : start + SCORE_BATCH])
        out.append(cosine_loss(clip_rows(pipe, ids), ids, pipe.tokenizer.eos_token_id, goal).cpu())
    return torch.cat(out)


def search(pipe, params: Params, goal: torch.Tensor | None, allowed: torch.Tensor, seed: list[int],
           score=None, tokens=None) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """The best control tokens [K] found, and the best loss after each step (the first entry: the start's). `tokens`
    says which candidates round-trip and gives the gradient (default: `ClipTokens`, matching `goal`, the prompt's
    pooled row in the first CLIP encoder); `score` (control tokens [n, K] -> losses [n]) ranks the candidates
    (default: that pooled loss)."""
    score = score or (lambda control: losses(pipe, control, goal))
    tokens = tokens or ClipTokens(pipe, goal)
    generator = torch.Generator().manual_seed(int(np.random.default_rng(seed).integers(2**31)))
    control = initial_control(tokens, allowed, params.length, np.random.default_rng(seed))
    best, best_loss = control, float(score(control[None])[0])
    history = [best_loss]
    for _ in range(params.iterations):
        grad = tokens.gradient(control)
        batch = substitutions(control, grad, allowed, params.topk, params.candidates, generator)
        batch = batch[tokens.round_trips(batch)]
        if len(batch):
            scores = score(batch)
            index = int(scores.argmin())
            control = batch[index]  # GCG moves to the step's best candidate even when it is worse
            if float(scores[index]) < best_loss:
                best, best_loss = control, float(scores[index])
        history.append(best_loss)
    return best, history


def check(target: Target, params: Params) -> None:
    """Refuse a vocabulary the banned words empty, before the run folder is made."""
    tokenizer = target.pipe.tokenizer
    words = banned_words(target.concepts, params.banned_words)
    allowed = allowed_ids(tokenizer, target.pipe.text_encoder.config.vocab_size, words)
    if len(allowed) == 0:
        raise ReceError("the mma attack's banned words leave no token to search over; pass fewer --banned-words")
    try:
        initial_control(search_tokens(target), allowed, params.length, np.random.default_rng(0))
    except ValueError:
        raise ReceError("no allowed token of this tokenizer decodes back to itself; pass fewer --banned-words") from None


def prepare(target: Target, params: Params, store: dict, sampling: dict) -> tuple[dict, dict]:
    """The allowed vocabulary (kept as `allowed_ids`), and how many tokens the banned words removed."""
    if "allowed_ids" in store:
        return {"allowed_ids": store["allowed_ids"]}, {}
    vocab_size = target.pipe.text_encoder.config.vocab_size
    allowed = allowed_ids(target.pipe.tokenizer, vocab_size, banned_words(target.concepts, params.banned_words))
    return {"allowed_ids": allowed}, {"allowed_tokens": len(allowed), "vocabulary": vocab_size}


def cases(target: Target, params: Params) -> list[AttackCase]:
    """One case per prompt row, targeting the first concept."""
    return [AttackCase(r.case_number, r.prompt, r.seed, target.concepts[0], dict(r.labels)) for r in target.rows]


def prompt_goal(pipe, prompt: str) -> torch.Tensor:
    """The prompt's pooled row [d] in the first CLIP encoder, float64: what the gradient steers towards."""
    ids = tokenize(pipe, [prompt])
    with torch.no_grad():
        return pooled(clip_rows(pipe, ids).double(), ids, pipe.tokenizer.eos_token_id)[0]


def search_tokens(target: Target, loss=None):
    """The tokens the search runs over: the one encoder's of a family whose padding is masked (PixArt's T5, Sana's
    Gemma: the only encoder, and no pooled row), else the first CLIP encoder's."""
    if target.base.family.masks_padding:
        return EncoderTokens(target.base.views[0], loss)
    return ClipTokens(target.pipe)


def attack_case(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """Search K tokens whose text embedding matches the prompt's (SD: the pooled row; other families: the rows of
    every space); the images come from their decoded text."""
    if target.base.family.masks_padding:
        return attack_case_in_rows(target, params, case, shared)
    if not reads_ids(target):
        return attack_case_in_spaces(target, params, case, shared)
    start = time.perf_counter()
    pipe = target.pipe
    goal = prompt_goal(pipe, case.prompt)
    control, history = search(pipe, params, goal, shared["allowed_ids"], [target.seed, case.case_number])
    text = decoded(pipe.tokenizer, control[None])[0]
    ids = tokenize(pipe, [text])  # equal to the control's prompt: candidates that do not round-trip are dropped
    embeds = encode_ids(pipe, ids)[0].float()
    return CaseResult(prompt=text, embeds=embeds, tensors={f"ids.{case.case_number}": ids[0]}, info=info(history, params, start))


def info(history: list[float], params: Params, start: float) -> dict:
    """A case's numbers for the manifest."""
    return {
        "loss": round(history[-1], 6),
        "loss_first_step": round(history[0], 6),
        "cosine": round(1 - history[-1], 6),
        "attack_steps": params.iterations,
        "seconds": round(time.perf_counter() - start, 4),
    }


def space_losses(rows: list[torch.Tensor], goals: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the spaces of 1 − cos(E_s(text), E_s(prompt)), each space's rows taken as one vector [n]."""
    out = [1 - torch.nn.functional.cosine_similarity(r.flatten(1).double(), g.flatten()[None].to(r.device).double(), dim=1)
           for r, g in zip(rows, goals)]  # fmt: skip
    return torch.stack(out).mean(dim=0).cpu()


def attack_case_in_spaces(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """On SDXL, SD3 and FLUX: the gradient through the first CLIP encoder (whose tokens the prompt is made of), each
    candidate's decoded text encoded as the pipeline encodes it and scored in every space it reads (an MMDiT's token
    rows and pooled vector); the found text's rows in each space are kept for its images (space s > 0 as
    `embeds{s}.N`), and the text for what the pipeline reads besides rows (SDXL's pooled vector)."""
    start = time.perf_counter()
    pipe = target.pipe
    goals = [view.encoder.encode([case.prompt])[0] for view in target.base.views]

    def score(control: torch.Tensor) -> torch.Tensor:
        texts = decoded(pipe.tokenizer, control)
        out = [space_losses(space_rows(target, texts[i : i + SCORE_BATCH]), goals) for i in range(0, len(texts), SCORE_BATCH)]
        return torch.cat(out)

    goal = prompt_goal(pipe, case.prompt)
    control, history = search(pipe, params, goal, shared["allowed_ids"], [target.seed, case.case_number], score)
    text = decoded(pipe.tokenizer, control[None])[0]
    embeds, tensors = found_rows(target, case.case_number, text)
    tensors[f"ids.{case.case_number}"] = tokenize(pipe, [text])[0]
    return CaseResult(prompt=text, embeds=embeds, tensors=tensors, info=info(history, params, start), text=text)


def attack_case_in_rows(target: Target, params: Params, case: AttackCase, shared: dict) -> CaseResult:
    """On PixArt and Sana: the tokens are the one text encoder's (T5, Gemma-2), the loss 1 − cos(E(text), E(p)) of
    the rows the edited layers read (after the caption projection; the padding rows, which the transformer masks, zero)
    taken as one vector, its gradient through that encoder's token embeddings and the projection, each candidate's
    decoded text scored as the pipeline encodes it; the images come from the found text's rows and attended count."""
    start = time.perf_counter()
    goal = space_rows(target, [case.prompt])[0][0]

    def loss(rows: torch.Tensor) -> torch.Tensor:
        return space_losses([rows], [goal])

    tokens = search_tokens(target, loss)

    def score(control: torch.Tensor) -> torch.Tensor:
        texts = tokens.decoded(control)
        return torch.cat([loss(space_rows(target, texts[i : i + SCORE_BATCH])[0]) for i in range(0, len(texts), SCORE_BATCH)])

    control, history = search(target.pipe, params, None, shared["allowed_ids"], [target.seed, case.case_number], score, tokens)
    text = tokens.decoded(control[None])[0]
    embeds, tensors = found_rows(target, case.case_number, text)
    tensors[f"ids.{case.case_number}"] = control  # the text's tokens as the pipeline reads them (they round-trip)
    return CaseResult(prompt=text, embeds=embeds, tensors=tensors, info=info(history, params, start), text=text)
