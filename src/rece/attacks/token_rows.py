"""Prompt rows with the attack's own token vectors put in: what the gradient attacks (`unlearndiff`,
`textual-inversion`) optimise, in every space the family reads, through its own text encoders.

A text holds placeholder words ("<rece-adv-0>", "<triangle>"). The tokenizers of the family's `attack_parts` (the
text parts whose vocabulary the attack's tokens live in) get a copy that knows each placeholder as one new token;
while the rows are computed, each carrying encoder is handed a stand-in id of its own vocabulary there (so its
causal mask, its EOS position and its pooled row are those of an ordinary token), and its embedding lookup returns
the attack's vector at those positions, gradients flowing to it. The other tokenizers read each placeholder as
written text (`written`: UnlearnDiff's decoded tokens). Then the family's own `encode_batch` (and the denoiser's
text modules, PixArt's and Sana's caption projection) and `extra_batch` (SDXL's pooled vector) make the rows, as
the pipeline does.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch

from ..errors import ReceError


class WrittenTokenizer:
    """A tokenizer that reads placeholder words as the text they stand for (`written`: placeholder text → text)."""

    def __init__(self, tokenizer, written: dict[str, str]):
        self.__dict__.update(_tokenizer=tokenizer, _written=written)

    def _rewrite(self, text: str) -> str:
        for placeholder, text_written in self._written.items():
            text = text.replace(placeholder, text_written)
        return text

    def __call__(self, texts, *args, **kwargs):
        texts = self._rewrite(texts) if isinstance(texts, str) else [self._rewrite(t) for t in texts]
        return self._tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._tokenizer, name, value)


def with_placeholders(tokenizer, words: Sequence[str]) -> tuple[object, list[int]]:
    """A copy of `tokenizer` that knows each word as one new token, and those tokens' ids. Each token takes the space
    before it (`lstrip`, matched in the raw text: Gemma's normalizer turns spaces into "▁" first), as a word's own
    token does in SentencePiece vocabularies (T5's "▁cat", Gemma's): otherwise that space would be a token of its own."""
    from transformers import AddedToken

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([AddedToken(w, lstrip=True, rstrip=False, normalized=False) for w in words])
    ids = [tokenizer.convert_tokens_to_ids(w) for w in words]
    if any(len(tokenizer.tokenize(w)) != 1 for w in words) or len(set(ids)) != len(ids):
        raise ReceError(f"cannot add '{words[0]}' to the tokenizer as one token; choose another --placeholder")
    return tokenizer, ids


def lookups(encoder) -> list[torch.nn.Module]:
    """The embedding layers that look up the encoder's input tokens: its input embeddings and any layer tied to them
    (T5's encoder reads its own `embed_tokens`, whose weight is the model's `shared`)."""
    weight = encoder.get_input_embeddings().weight
    return [m for m in encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() == weight.data_ptr()]


@contextlib.contextmanager
def vectors_in(encoder, placeholder_ids: Sequence[int], stand_in: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """While active, `encoder` reads placeholder k as the ordinary token `stand_in[k]` whose looked-up vector is
    `vectors[k]` (gradients flow to `vectors`)."""
    state = {}
    lookup = torch.tensor(list(placeholder_ids), dtype=torch.long)

    def before(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        match = ids[..., None] == lookup.to(ids.device)
        slot = torch.where(match.any(-1), match.int().argmax(-1), -1)
        state["slot"] = slot
        ids = torch.where(slot >= 0, stand_in.to(ids.device)[slot.clamp(min=0)], ids)
        if "input_ids" in kwargs:
            return args, {**kwargs, "input_ids": ids}
        return (ids, *args[1:]), kwargs

    def after(module, args, output):
        slot = state.pop("slot", None)
        if slot is None or slot.shape != output.shape[:-1]:
            return output
        # vectors are rows of the table; a scaled lookup (Gemma's embed_scale, √d) scales them as it scales its rows
        scale = getattr(module, "embed_scale", 1.0)
        put = (vectors.to(output.device) * scale).to(output.dtype)[slot.clamp(min=0)]
        return torch.where((slot >= 0)[..., None], put, output)

    handles = [encoder.register_forward_pre_hook(before, with_kwargs=True)]
    handles += [m.register_forward_hook(after) for m in lookups(encoder)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TokenRows:
    """The rows of texts holding placeholder words, in every space the target's family reads, with vectors of the
    attack's own in the lookups of the family's `attack_parts` (one [k, d_part] tensor of vectors per part)."""

    def __init__(self, target, words: Sequence[str]):
        self.family = target.base.family
        self.views = target.base.views
        encoder = self.views[0].encoder
        self.tokenizers, self.encoders = encoder.tokenizers, encoder.text_encoders
        self.parts = self.family.attack_parts
        self.words = [self.family.preprocess(w) for w in words]  # as the texts holding them are read
        made = {p: with_placeholders(self.tokenizers[p], self.words) for p in self.parts}
        self.copies = {p: tok for p, (tok, _) in made.items()}
        self.ids = {p: ids for p, (_, ids) in made.items()}

    def table(self, part: int) -> torch.Tensor:
        """Token-embedding matrix [vocab, d] of carrying part `part` (detached)."""
        return self.encoders[part].get_input_embeddings().weight.detach()

    def vocabulary(self) -> int:
        """Ids every carrying part's table and tokenizer share (T5's table has rows past its tokenizer's ids)."""
        return min(min(self.table(p).shape[0], len(self.tokenizers[p])) for p in self.parts)

    def tokenizers_for(self, written: dict[str, str] | None) -> list:
        """Each part's tokenizer: the placeholder copy for carrying parts, else one reading placeholders as written."""
        return [self.copies[i] if i in self.parts else WrittenTokenizer(t, written or {}) for i, t in enumerate(self.tokenizers)]

    def token_ids(self, text: str, stand_in: torch.Tensor) -> torch.Tensor:
        """The first carrying part's ids of `text` [L] (unpadded) with placeholder k as `stand_in[k]`: what its
        encoder reads."""
        part = self.parts[0]
        tokenizer = self.copies[part]
        ids = torch.tensor(tokenizer(self.family.preprocess(text), truncation=True).input_ids, dtype=torch.long)
        for k, placeholder in enumerate(self.ids[part]):
            ids[ids == placeholder] = int(stand_in[k])
        return ids

    def rows(self, texts: Sequence[str], vectors: dict[int, torch.Tensor], stand_in: torch.Tensor,
             written: dict[str, str] | None = None) -> tuple[list[torch.Tensor], list[int]]:  # fmt: skip
        """(rows of every space, then the family's extra rows, float32; each text's attended rows), as
        `objective.conditioning` gives them, placeholder k read as `vectors[part][k]`."""
        texts = [self.family.preprocess(t) for t in texts]
        tokenizers = self.tokenizers_for(written)
        with contextlib.ExitStack() as stack:
            for p in self.parts:
                stack.enter_context(vectors_in(self.encoders[p], self.ids[p], stand_in, vectors[p]))
            rows = []
            for view in self.views:
                encoder = view.encoder
                r = view.family.encode_batch(tokenizers, encoder.text_encoders, texts, encoder.device)
                rows.append((encoder.projection(r.float()) if encoder.projection is not None else r).float())
            rows += [r.float() for r in self.family.extra_batch(tokenizers, self.encoders, texts, self.views[0].encoder.device)]
        return rows, list(self.views[0].family.attention_counts(tokenizers, texts))
