"""Erasure orchestration: the UCE stage, then RECE's derive-and-erase epochs, producing an Edit."""

from __future__ import annotations

import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from . import closed_form as cf
from . import pairing, preservation
from . import projections as pj
from .budget import check_memory
from .config import ROBUST_TEMPLATES, EraseConfig
from .console import progress_bar
from .edit import Edit
from .errors import ReceError
from .families import titles_where
from .models import BaseModel, load_model


def select_layers(names: list[str], patterns: list[str] | None) -> list[str]:
    """The K/V layers whose names match any regex in `patterns` (all of them when None)."""
    if patterns is None:
        return list(names)
    chosen = [n for n in names if any(re.search(p, n) for p in patterns)]
    if not chosen:
        raise ReceError(f"no cross-attention layer matches {patterns}; layer names look like '{names[0]}'")
    return chosen


@dataclass
class _Texts:
    """Embeddings and token counts of every text the procedure reads, encoded once."""

    embeddings: dict[str, torch.Tensor]
    counts: dict[str, int]
    masked: bool = False  # the model masks padding rows: a text is its attended rows only
    end_rows: int = 1  # attended rows after a text's last word token
    whole: bool = False  # UCE pairs every row (a pooled space)
    # (rows, counts) of each sequence length whose rows are joined in a text's rows (FLUX.1 [schnell]: 256, then 512)
    segments: list[tuple[int, dict[str, int]]] = field(default_factory=list)

    @classmethod
    def encode(cls, base: BaseModel, texts: list[str], progress: bool | None = None, lengths: tuple[int, ...] = ()) -> _Texts:
        """The texts' rows as `base` reads them, at each of `lengths` (T5 rows per prompt) joined, or as its encoder is."""
        unique = list(dict.fromkeys(texts))
        encoders = [base.encoder.at_length(n) for n in lengths] or [base.encoder]
        family = base.family
        # repeats by token ids share their rows (encode_unique): one float64 copy of the distinct texts' rows
        encoded = [e.encode_unique(unique, progress=progress) for e in encoders]
        segments = [(emb.shape[1], dict(zip(unique, e.token_counts(unique)))) for (emb, _), e in zip(encoded, encoders)]
        if len(encoded) == 1:
            emb, index = encoded[0]
            embeddings = {t: emb[i] for t, i in zip(unique, index)}
        else:  # each length's rows joined (a text distinct at one length may repeat another at a shorter one)
            embeddings = {t: torch.cat([emb[index[k]] for emb, index in encoded]) for k, t in enumerate(unique)}
        counts = segments[0][1]
        return cls(embeddings, counts, family.masks_padding, family.end_rows, family.whole_rows, segments)

    def parts(self) -> list[_Texts]:
        """The texts at each sequence length their rows join (itself when there is one)."""
        if len(self.segments) < 2:
            return [self]
        out, start = [], 0
        for rows, counts in self.segments:
            embeddings = {t: e[start : start + rows] for t, e in self.embeddings.items()}
            out.append(replace(self, embeddings=embeddings, counts=counts, segments=[]))
            start += rows
        return out

    def attended(self, text: str) -> torch.Tensor:
        """The rows of a text the model attends to: all of them, or those before the padding when it is masked."""
        return self.embeddings[text][: self.counts[text]] if self.masked else self.embeddings[text]

    def weighted_rows(self, texts: list[str]) -> torch.Tensor:
        """Rows whose outer products sum like those of `texts` (repeats included), each distinct text once, scaled by
        √(its count): the sums the closed forms need, without a thousand copies of " " when erasing 1,000 concepts."""
        counts = Counter(texts)
        return self.rows([]) if not counts else torch.cat([self.attended(t) * k**0.5 for t, k in counts.items()])

    def rows(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            dim = next(iter(self.embeddings.values())).shape[-1]
            device = next(iter(self.embeddings.values())).device
            return torch.zeros(0, dim, dtype=torch.float64, device=device)
        return torch.cat([self.attended(t) for t in texts])


def uce_pairs(texts: _Texts, concepts: list[str], targets: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """UCE erase pairs (C, C*) for each concept and its target, with UCE's token slicing (of the attended rows when
    padding is masked; at each sequence length, joined)."""
    if len(texts.segments) > 1:
        per_length = [uce_pairs(part, concepts, targets) for part in texts.parts()]
        return [tuple(torch.cat(rows) for rows in zip(*pairs)) for pairs in zip(*per_length)]
    emb, counts = texts.embeddings, texts.counts
    if texts.whole:  # a pooled vector: the concept's one row to the target's
        return [(emb[c], emb[t]) for c, t in zip(concepts, targets)]
    if texts.masked:
        return [cf.attended_token_rows(emb[c], counts[c], emb[t], counts[t], texts.end_rows) for c, t in zip(concepts, targets)]
    return [cf.uce_token_rows(emb[c], counts[c], emb[t], counts[t]) for c, t in zip(concepts, targets)]


def derive_all(concept_rows: list[torch.Tensor], products, gram, r: float, anchor: torch.Tensor | None) -> list[torch.Tensor]:
    """RECE's c′ of each concept's rows, all in one solve against the edited gram; `products` = Σ W_lᵀW⁰_l c for every
    concept row (as columns, the concepts in order); the anchor, if any, is cut to each concept's rows."""
    anchors = None if anchor is None else torch.cat([anchor[: c.shape[0]] for c in concept_rows])
    rows = cf.derive_from_products(products, gram, r, anchors)
    return list(rows.split([c.shape[0] for c in concept_rows]))


def shared_step(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], preserve_rows, lamb: float, s_e: float, s_p: float, parameter: str
):
    """One update's shared transform M = I + A·Bᵀ as factors (A, B): low-rank while the erased rows are fewer than d,
    else (M − I, I) accumulated dense, so many concepts never make factors wider than the matrix."""
    dim = preserve_rows.shape[1]
    if sum(c.shape[0] for c, _ in pairs) < dim:
        erase_rows, target_rows = torch.cat([c for c, _ in pairs]), torch.cat([t for _, t in pairs])
        return cf.shared_edit_factors(erase_rows, target_rows, preserve_rows, lamb, s_e, s_p, parameter)
    delta = cf.accumulated_edit_delta(pairs, preserve_rows, lamb, s_e, s_p, parameter)
    return delta, torch.eye(dim, dtype=delta.dtype, device=delta.device)


def padded_stack(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """[len(rows), length, d]: each c′ with zero rows where the model masks the padding (stored in the edit file)."""
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


@dataclass
class _SpaceResult:
    """What the procedure gives for one space: a shared transform (dense, or factors (L, R) of I + L Rᵀ) or per-layer
    deltas, the c′ of each epoch, robust mode's report, and the preservation sums of the reported texts."""

    transform: object
    deltas: dict | None
    derived: list
    report: dict | None
    sums: dict


def erase(
    model,
    concepts=None,
    *,
    preset: str | None = None,
    config: EraseConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    **overrides,
):
    """Erase concepts from a model in closed form and return an Edit (nothing is written).

    `model` is a pipeline, a diffusers folder, a hub id, a single-file checkpoint or a loaded BaseModel. `progress`:
    bars on stderr for text encoding and epochs once they take a few seconds (None: when stderr is a terminal).
    """
    config = config or EraseConfig.create(concepts, preset, **overrides)
    start = time.perf_counter()
    base = model if isinstance(model, BaseModel) else load_model(model, device)
    lengths = sequence_lengths(base, config)
    check_memory(base, config)
    base.encoder.warn_if_truncated(config.concepts + config.preserve)
    edited = select_layers(list(base.kv), config.layers)
    views = base.views
    results = {}
    for view in views:
        mine = [n for n in edited if n in view.kv]
        if mine:
            results[view.family.name] = _erase_space(view, config, mine, progress)
    first = next(iter(results.values()))
    kept = first.derived if config.derived else []  # RECE's c′ of each epoch, for red-teaming (the first space's)
    seconds = lambda: time.perf_counter() - start  # noqa: E731
    if base.spaces:  # each space on its own; the edit holds every layer's change (the first space's c′)
        deltas = {}
        for view in views:
            if view.family.name in results:
                r = results[view.family.name]
                deltas.update(r.deltas if r.transform is None else transform_deltas(view.kv, r.transform))
        reports = {name: r.report for name, r in results.items() if r.report is not None}
        robust = {**next(iter(reports.values())), "spaces": reports} if reports else None
        edit = Edit.from_deltas(deltas, base, config, kept, seconds(), robust=robust)
    elif first.transform is None:
        edit = Edit.from_deltas(first.deltas, base, config, kept, seconds())
    else:
        transform = cf.identity_plus(*first.transform) if isinstance(first.transform, tuple) else first.transform
        edit = Edit.from_transform(transform, base, config, kept, seconds(), robust=first.report)
    if config.method == "rece" and base.family.masks_padding:  # the only models whose RECE step the pairing changes
        edit.metadata["pairing"] = config.pairing
    if base.family.masks_padding:  # UCE's concept rows: a choice only where padding is masked
        edit.metadata["uce_rows"] = config.uce_rows
    if lengths:  # what `rece generate` and the attacks draw this edit with: the first
        edit.metadata["sequence_lengths"] = list(lengths)
    edit.metadata["preservation"] = {
        group: preservation.summary(preservation.merge_sums(*(r.sums[group] for r in results.values())))
        for group in ("preserved", "check")
    }
    if warning := preservation.excess(edit.metadata["preservation"]):
        warnings.warn(warning, stacklevel=2)
    return edit


def sequence_lengths(base: BaseModel, config: EraseConfig) -> tuple[int, ...]:
    """The T5 rows per prompt an erasure covers (FLUX, SD3): --max-sequence-length, else each the model is run with."""
    if config.max_sequence_length is not None and not base.family.takes_sequence_length():
        raise ReceError(
            f"--max-sequence-length applies to {titles_where('takes_sequence_length')} (their T5 rows are not masked); "
            f"{base.family.title} rows do not depend on it: leave it out"
        )
    return base.family.erase_lengths(config.max_sequence_length)


def _erase_space(base: BaseModel, config: EraseConfig, edited: list[str], progress: bool | None = None) -> _SpaceResult:
    """The procedure on one space's rows and layers (at each sequence length it is run with, the rows joined)."""
    targets = list(dict.fromkeys(config.concept_targets))
    rece_preserve = [" "] * len(config.concepts) + list(config.preserve)
    extra = sum(template_texts(config.concepts), []) if config.method == "robust" and config.templates else []
    lengths = base.family.erase_lengths(config.max_sequence_length)
    # more preserve texts than one chunk: encoded and summed a chunk at a time (robust mode reads each one's rows)
    chunked = config.method != "robust" and len(set(config.preserve)) > chunk_texts(base, lengths)
    preserved = ["", " "] if chunked else config.uce_preserve_texts + rece_preserve
    texts = _Texts.encode(base, config.concepts + targets + [config.regularization_text] + preserved + extra, progress, lengths)
    rows = preserve_rows(base, texts, config, progress, lengths) if chunked else None
    if config.method == "robust":
        transform, report = _run_robust(base, config, texts)
        result = _SpaceResult(transform, None, [], report, {})
    elif config.technique == "replace" and len(edited) == len(base.kv):
        factors, derived = _run_shared(base, config, texts, edited, progress, rows)
        result = _SpaceResult(factors, None, derived, None, {})
    else:
        deltas, derived = _run_per_layer(base, config, texts, edited, rows)
        result = _SpaceResult(None, deltas, derived, None, {})
    del rows
    if len(texts.segments) > 1:  # the edit keeps the c′ rows of the length it is drawn with
        result.derived = [d[:, : texts.segments[0][0]].contiguous() for d in result.derived]
    gram0 = base.original_gram()
    gram_delta = preservation.delta_gram(gram0, result.transform, result.deltas)
    known = None if chunked else texts
    result.sums["preserved"] = check_sums(base, config.uce_preserve_texts, gram0, gram_delta, progress, lengths, known)
    result.sums["check"] = check_sums(base, config.check, gram0, gram_delta, progress, lengths)
    return result


def chunk_texts(base: BaseModel, lengths: tuple[int, ...] = ()) -> int:
    """How many texts are encoded at a time where their number must not scale memory (held-out and many preserved)."""
    return preservation.check_chunk_texts(max(base.encoder.max_length, sum(lengths)), base.encoder.dim)


def preserve_rows(
    base: BaseModel, texts: _Texts, config: EraseConfig, progress: bool | None = None, lengths: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UCE and the RECE stage's preserved rows: rows whose outer products sum like `_Texts.weighted_rows` of each
    stage's texts, the texts not in `texts` encoded a chunk at a time into a `cf.RowSum` per stage (the closed forms
    read preserved rows only through Σ p pᵀ), so memory stays one chunk and d×d however many there are."""
    weights = [Counter(config.uce_preserve_texts), Counter([" "] * len(config.concepts) + list(config.preserve))]
    names = list(dict.fromkeys(t for counts in weights for t in counts))
    sample = next(iter(texts.embeddings.values()))
    sums = [cf.RowSum(sample.shape[-1], sample.device) for _ in weights]

    def add(encoded: _Texts, chunk: list[str]) -> None:
        for total, counts in zip(sums, weights):
            if mine := [t for t in chunk if t in counts]:
                # a text given once adds its rows as they are (views): one copy of the chunk in the sum, not two
                total.add(torch.cat([_weighted(encoded.attended(t), counts[t]) for t in mine]))

    add(texts, [t for t in names if t in texts.embeddings])
    rest, size = [t for t in names if t not in texts.embeddings], chunk_texts(base, lengths)
    for start in progress_bar(range(0, len(rest), size), "preserved texts", "chunk", progress if len(rest) > size else False):
        add(_Texts.encode(base, rest[start : start + size], lengths=lengths), rest[start : start + size])
    return sums[0].rows(), sums[1].rows()


def _weighted(rows: torch.Tensor, count: int) -> torch.Tensor:
    """A text's rows scaled by √(its count) (the rows themselves when it is given once)."""
    return rows if count == 1 else rows * count**0.5


def check_sums(
    base: BaseModel,
    check: list[str],
    gram0,
    gram_delta,
    progress: bool | None = None,
    lengths: tuple[int, ...] = (),
    known: _Texts | None = None,
) -> dict:
    """The preservation sums of texts that took no part in the erasure or are no longer held (`known`: already
    encoded), encoded and summed a chunk at a time, so their memory stays that of one chunk however many there are."""
    unique, sums = list(dict.fromkeys(check)), {}
    if known is not None:
        return preservation.text_sums({t: known.attended(t) for t in unique}, gram0, gram_delta)
    size = chunk_texts(base, lengths)
    for start in progress_bar(range(0, len(unique), size), "checking texts", "chunk", progress if len(unique) > size else False):
        texts = _Texts.encode(base, unique[start : start + size], lengths=lengths)
        sums.update(preservation.text_sums({t: texts.attended(t) for t in texts.embeddings}, gram0, gram_delta))
        del texts
    return sums


def transform_deltas(kv: dict[str, torch.Tensor], transform) -> dict[str, torch.Tensor]:
    """W⁰(P − I) of every layer: a shared transform P, dense or as the factors (L, R) of P = I + L Rᵀ, as per-layer
    changes (float64)."""
    if isinstance(transform, tuple):
        left, right = transform
        return {n: cf.low_rank_delta(w.to(left.device), left, right) for n, w in kv.items()}
    eye = torch.eye(transform.shape[0], dtype=torch.float64, device=transform.device)
    return {n: w.to(transform.device, torch.float64) @ (transform - eye) for n, w in kv.items()}


def _uce_stage_args(base: BaseModel, config: EraseConfig, texts: _Texts, preserve_rows: torch.Tensor | None = None):
    pairs = uce_pairs(texts, config.concepts, config.concept_targets)
    if texts.masked and config.uce_rows == "unshared" and len(texts.segments) < 2:
        pairs = with_unshared_rows(base, config, texts, pairs)
    if preserve_rows is None:
        preserve_rows = texts.weighted_rows(config.uce_preserve_texts)
    return pairs, preserve_rows, (config.uce_lamb, config.uce_erase_scale, config.resolved_uce_preserve_scale)


def _rece_stage_args(base: BaseModel, config: EraseConfig, texts: _Texts, preserve_rows: torch.Tensor | None = None):
    if preserve_rows is None:
        preserve_rows = texts.weighted_rows([" "] * len(config.concepts) + list(config.preserve))
    target_rows = [texts.embeddings[t] for t in config.concept_targets]  # each concept's c′ maps to its target
    anchor = texts.embeddings[config.regularization_text] if config.regularization_type == "standard" else None
    concept_rows = [texts.attended(c) for c in config.concepts]
    pair = rece_pairer(base, config, texts, target_rows)
    return concept_rows, pair, preserve_rows, anchor, (config.lamb, config.erase_scale, config.preserve_scale)


def with_unshared_rows(base: BaseModel, config: EraseConfig, texts: _Texts, pairs: list) -> list:
    """UCE's pairs and, before each, the concept's own-word rows its slice leaves out (`--uce-rows unshared`)."""
    keep = unshared_keep(base, config)
    out = []
    for (c, t), concept, target, k in zip(pairs, config.concepts, config.concept_targets, keep):
        tail, last = (cf.last_word_row(texts.counts[t], texts.end_rows) for t in (concept, target))
        extra_c, extra_t = pairing.uce_unshared_rows(texts.embeddings[concept], texts.embeddings[target], k, tail, last)
        out.append((torch.cat([extra_c, c]), torch.cat([extra_t, t])))
    return out


def unshared_keep(base: BaseModel, config: EraseConfig) -> list[list[int]]:
    """Each concept's token positions that neither " " nor a preserved text holds (rece.pairing.unshared_rows)."""
    preserved = {token for ids in base.encoder.attended_ids([" ", *config.preserve]) for token in ids}
    return [pairing.unshared_rows(ids, preserved) for ids in base.encoder.attended_ids(config.concepts)]


def rece_pairer(base: BaseModel, config: EraseConfig, texts: _Texts, target_rows: list[torch.Tensor]):
    """c′ of each concept → its (c′ rows, target rows) pairs, by `config.pairing` (rece.pairing) where the model masks
    padding; by position otherwise (the paper's procedure)."""
    if not texts.masked or config.pairing == "position":
        return lambda derived: [pairing.position_pair(c, t) for c, t in zip(derived, target_rows)]
    if config.pairing == "attended":
        counts = [texts.counts[t] for t in config.concept_targets]
        return lambda derived: [pairing.attended_pair(c, t, n, texts.end_rows) for c, t, n in zip(derived, target_rows, counts)]
    keep = unshared_keep(base, config)
    return lambda derived: [pairing.unshared_pair(c, t, k) for c, t, k in zip(derived, target_rows, keep)]


def _run_shared(
    base: BaseModel, config: EraseConfig, texts: _Texts, edited: list[str], progress: bool | None = None, preserved=None
):
    """Fast path: every update is W ← W·M with one d×d M shared by all layers. Returns the factors (L, R) of their
    product P = Π M = I + L Rᵀ, and the c′ of each epoch. `preserved`: each stage's preserved rows (`preserve_rows`),
    else they are read from `texts`."""
    uce_rows, rece_rows = preserved or (None, None)
    pairs, preserve_rows, (lamb, s_e, s_p) = _uce_stage_args(base, config, texts, uce_rows)
    # P stays low-rank while few rows are erased: each update adds as many columns as it erases rows
    left, right = shared_step(pairs, preserve_rows, lamb, s_e, s_p, "--uce-lamb")
    derived = []
    if config.method == "rece" and config.epochs > 0:
        concept_rows, pair, preserve_rows, anchor, (lamb, s_e, s_p) = _rece_stage_args(base, config, texts, rece_rows)
        # the edited gram PᵀG₀P and PᵀG₀ on the concept rows are kept current update by update, each update a
        # low-rank term (or a dense one), so the composed P is never multiplied out against G₀
        grams = cf.EditedGrams(base.original_gram(), concept_rows, left, right)
        full = texts.embeddings[config.concept_targets[0]].shape  # every text's rows, padding included
        for epoch in progress_bar(range(config.epochs), "RECE epochs", "epoch", progress):
            stack = concept_rows[0].new_zeros(len(concept_rows), *full)  # the edit keeps it; c′ are its views
            derived_rows = grams.derive(config.regularization, anchor, into=stack)
            derived.append(stack)
            step = shared_step(pair(derived_rows), preserve_rows, lamb, s_e, s_p, "--lamb")
            left, right = cf.compose_low_rank(left, right, *step)
            if epoch + 1 < config.epochs:
                grams.update(*step)
    return (left, right), derived


def _run_per_layer(base: BaseModel, config: EraseConfig, texts: _Texts, edited: list[str], preserved=None):
    """General path ("tensor" technique or a subset of layers): update each edited layer on its own (`preserved`: as
    in `_run_shared`)."""
    device = base.encoder.device
    originals = {n: w.to(device, torch.float64) for n, w in base.kv.items()}
    weights = dict(originals)
    uce_rows, rece_rows = preserved or (None, None)
    pairs, preserve_rows, (lamb, s_e, s_p) = _uce_stage_args(base, config, texts, uce_rows)
    erase_rows = torch.cat([c for c, _ in pairs])
    denominator = cf.edit_denominator(erase_rows, preserve_rows, lamb, s_e, s_p, erase_rows.shape[1])
    cf.check_conditioning(denominator, "--uce-lamb", shift=lamb)
    for name in edited:
        weights[name] = cf.edit_layer(weights[name], pairs, preserve_rows, lamb, s_e, s_p, config.technique, denominator)
    derived = []
    if config.method == "rece" and config.epochs > 0:
        concept_rows, pair, preserve_rows, anchor, (lamb, s_e, s_p) = _rece_stage_args(base, config, texts, rece_rows)
        length = texts.embeddings[config.concept_targets[0]].shape[0]  # every text's rows, padding included
        for _ in range(config.epochs):
            gram = cf.weight_gram(weights.values())
            cross = cf.cross_gram(weights.values(), originals.values())
            products = cross @ torch.cat(concept_rows).T
            derived_rows = derive_all(concept_rows, products, gram, config.regularization, anchor)
            derived.append(padded_stack(derived_rows, length))
            rece_pairs = pair(derived_rows)
            erased = torch.cat([c for c, _ in rece_pairs])
            denominator = cf.edit_denominator(erased, preserve_rows, lamb, s_e, s_p, erased.shape[1])
            cf.check_conditioning(denominator, "--lamb", shift=lamb)
            for name in edited:
                weights[name] = cf.edit_layer(
                    weights[name], rece_pairs, preserve_rows, lamb, s_e, s_p, config.technique, denominator
                )
    deltas = {n: weights[n] - originals[n] for n in edited}
    return deltas, derived


def aligned_token_rows(texts: _Texts, names: list[str]) -> torch.Tensor:
    """Each text's rows from its last word onward (attended ones, when the model masks padding; the one row of a pooled
    space), cut to a common length: [len(names), L, d] (at each sequence length, joined)."""
    if len(texts.segments) > 1:
        return torch.cat([aligned_token_rows(part, names) for part in texts.parts()], dim=1)
    if texts.whole:
        starts, ends = [0] * len(names), [1] * len(names)
    elif texts.masked:
        starts = [max(texts.counts[t] - 1 - texts.end_rows, 0) for t in names]
        ends = [texts.counts[t] for t in names]
    else:
        starts = [max(texts.counts[t] - 2, 0) for t in names]
        ends = [texts.embeddings[t].shape[0] for t in names]
    length = min(e - i for e, i in zip(ends, starts))
    return torch.stack([texts.embeddings[t][i : i + length] for t, i in zip(names, starts)])


def template_texts(concepts: list[str]) -> tuple[list[str], list[str]]:
    """Robust mode's built-in contexts: every concept in every template, and the templates alone (the contrast)."""
    return [t.format(c) for c in concepts for t in ROBUST_TEMPLATES], [t.format("").strip() for t in ROBUST_TEMPLATES]


def _run_robust(base: BaseModel, config: EraseConfig, texts: _Texts) -> tuple[torch.Tensor, dict]:
    """Robust mode: a projection singular along the concept's directions, so no embedding can bring them back.

    Default ("keys"): the directions whose key/value outputs carry the concept (rows of each erased text minus the
    mean preserved row, position by position) for the least preserved energy (weight `tradeoff`), and the directions
    the preserved texts do not use (`support`), removed from every K/V output (M = I − U(UᵀGU)⁻¹UᵀG, G = Σ W⁰ᵀW⁰);
    `adversarial_rounds` times, the rows of a fresh c′ against the edit join the estimate. "oblique"/"orthogonal"
    remove embedding directions instead. Before the projection, the UCE update maps each concept to its target
    (`map_to_target`, on by default). With `templates` (default) the directions are also estimated from each concept
    in ROBUST_TEMPLATES. The report holds the rank, the eigenvalues and the residuals of the best embeddings.
    """
    in_context, contexts = template_texts(config.concepts) if config.templates else ([], [])
    preserve_rows = texts.rows(config.uce_preserve_texts + contexts)
    if preserve_rows.shape[0] == 0:
        raise ReceError("--method robust needs preserved texts to tell the concept apart; keep '' or pass --preserve")
    # contrast like with like, rows from each text's last word onward: the concepts (alone and in the templates)
    # against the preserved texts ('' when none are given) and the templates without the concept
    concepts = config.concepts + in_context
    contrasts = (config.preserve or config.uce_preserve_texts) + contexts
    aligned = aligned_token_rows(texts, concepts + contrasts)
    concept_rows, contrast_rows = aligned[: len(concepts)], aligned[len(concepts) :]
    gram0 = base.original_gram().to(preserve_rows.device)
    if config.projection == "keys":
        transform, report = _key_value_robust(config, texts, concept_rows, contrast_rows, preserve_rows, gram0)
    else:
        directions, values = pj.concept_subspace(concept_rows, contrast_rows)
        rank = min(config.rank if config.rank is not None else pj.rank_for_energy(values, config.energy), values.shape[0] - 1)
        if config.projection == "oblique":
            transform = pj.oblique_projection(directions[:, :rank], pj.projection_metric(preserve_rows, config.ridge))
        else:
            transform = pj.orthogonal_projection(directions[:, :rank])
        report = {"rank": rank, "eigenvalues": [round(v, 6) for v in values[: max(rank + 4, 8)].tolist()]}
    if config.map_to_target:
        # UCE first, the projection last: every output stays in the projection's range, so the guarantee holds
        pairs, uce_preserve, (lamb, s_e, s_p) = _uce_stage_args(base, config, texts)
        erase_rows, target_rows = torch.cat([c for c, _ in pairs]), torch.cat([t for _, t in pairs])
        step = cf.shared_edit_transform(erase_rows, target_rows, uce_preserve, lamb, s_e, s_p, "--uce-lamb")
        transform = transform @ step
    report["fresh_residual"] = fresh_derived_residuals(base, transform, gram0, texts, config.concepts)
    return transform, report


def _key_value_robust(config: EraseConfig, texts: _Texts, concept_rows, contrast_rows, preserve_rows, gram0):
    """The "keys" projection and its report: concept directions (re-estimated with each adversarial round's fresh
    c′) and the directions no preserved text uses, all removed from the keys/values."""
    contrast_mean = contrast_rows.mean(dim=0, keepdim=True)
    dim = gram0.shape[0]
    factors = pj.range_factor(gram0)  # one eigendecomposition of G for every projection below
    unused = pj.unused_directions(preserve_rows, gram0, config.support, factors)

    def concept_directions(differences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        directions, values = pj.key_value_concept_directions(differences, preserve_rows, gram0, config.tradeoff)
        rank = config.rank if config.rank is not None else pj.rank_for_energy(values, config.energy)
        return directions[:, : min(rank, values.shape[0] - 1)], values

    differences = (concept_rows - contrast_mean).reshape(-1, dim)
    first, values = concept_directions(differences)
    removed = [first]
    transform = pj.key_value_projection(torch.cat([first, unused], dim=1), gram0, factors)
    for _ in range(config.adversarial_rounds):  # the rows a fresh c′ against this edit reaches join the concept's
        found = aligned_token_rows(derived_texts(texts, config, transform, gram0), config.concepts)
        differences = torch.cat([differences, (found[:, : concept_rows.shape[1]] - contrast_mean).reshape(-1, dim)])
        directions, values = concept_directions(differences)
        removed.append(directions)
        transform = pj.key_value_projection(torch.cat([*removed, unused], dim=1), gram0, factors)
    shown = max(removed[-1].shape[1] + 4, 8)  # the last estimate's leading eigenvalues
    report = {"rank": first.shape[1], "eigenvalues": [round(v, 6) for v in values[:shown].tolist()]}
    report["unused_removed"] = unused.shape[1]
    if config.adversarial_rounds:
        report["adversarial_ranks"] = [d.shape[1] for d in removed[1:]]
    return transform, report


def derived_texts(texts: _Texts, config: EraseConfig, transform: torch.Tensor, gram0: torch.Tensor) -> _Texts:
    """`texts` with each concept's attended rows replaced by transform·c′, c′ the closed-form embedding that brings
    the concept's original keys/values back best through the edit W⁰·transform (r = --regularization)."""
    gram, cross = edited_grams(transform, gram0)
    embeddings = dict(texts.embeddings)
    for concept in config.concepts:
        rows = texts.attended(concept)
        derived = cf.derive_embedding(rows, gram, cross, config.regularization)
        full = embeddings[concept].clone()
        full[: rows.shape[0]] = derived @ transform.T
        embeddings[concept] = full
    return replace(texts, embeddings=embeddings)


def edited_grams(transform: torch.Tensor, gram0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ W′ᵀW′, Σ W′ᵀW⁰) of the edit W′ = W⁰·transform, from G₀ = Σ W⁰ᵀW⁰: what a fresh c′ is derived with."""
    cross = transform.T @ gram0
    return cross @ transform, cross


def fresh_derived_residuals(
    base: BaseModel, transform: torch.Tensor, gram0: torch.Tensor, texts: _Texts, concepts: list[str]
) -> dict:
    """‖W′c′ − W⁰c‖ / ‖W⁰c‖ for a fresh closed-form c′ against the edited model (W′ = W⁰·transform; gram0 = Σ W⁰ᵀW⁰), at the
    paper's two regularisations, averaged over the concepts: near 0 means the concept can be brought back."""
    device = transform.device
    originals = [w.to(device, torch.float64) for w in base.kv.values()]
    gram, cross = edited_grams(transform, gram0)
    edited = [w @ transform for w in originals]
    out = {}
    for r in (0.1, 1e-3):
        residuals = []
        for concept in concepts:
            c = texts.attended(concept)
            derived = cf.derive_embedding(c, gram, cross, r)
            residuals.append(cf.relative_residual(edited, originals, derived, c))
        out[f"r={r:g}"] = round(sum(residuals) / len(residuals), 6)
    # the least-squares embedding of all (what no attack beats), relative to what tells the concept from " "
    blank = texts.embeddings.get(" ")
    best = pj.best_residuals(transform, gram0, [texts.attended(concept) for concept in concepts], blank)
    out["best"] = round(sum(best) / len(best), 6)
    return out
