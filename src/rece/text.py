"""Text encoding: the exact prompt embeddings a pipeline feeds to the layers an erasure edits (its family says how)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .console import progress_bar
from .families import Family, tokenize


class TruncationWarning(UserWarning):
    """A text was longer than the tokenizer's context and was cut."""


class PromptEncoder:
    """Encode texts as the pipeline does, deduplicated and batched; the family builds the rows of each batch."""

    def __init__(
        self,
        family: Family,
        tokenizers: Sequence,
        text_encoders: Sequence,
        device: str | torch.device = "cpu",
        projection: torch.nn.Module | None = None,
    ):
        self.family = family
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.device = torch.device(device)
        self.projection = projection  # the family's denoiser modules between the encoder and the edited layers

    def at_length(self, length: int) -> PromptEncoder:
        """This encoder at `length` T5 rows per prompt (FLUX, SD3), sharing its tokenizers and encoders."""
        return PromptEncoder(self.family.at_length(length), self.tokenizers, self.text_encoders, self.device, self.projection)

    @property
    def kind(self) -> str:
        return self.family.name

    @property
    def max_length(self) -> int:
        """Rows per text: the pipeline's sequence length."""
        return self.family.max_length or self.tokenizers[0].model_max_length

    @property
    def dim(self) -> int:
        """Width of the rows the edited layers read."""
        if self.projection is not None:
            return [m for m in self.projection.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
        return self.family.dim(self.text_encoders)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Number of attention-mask ones (BOS + tokens + EOS) of each text, after truncation."""
        return self.family.attention_counts(self.tokenizers, [self.family.preprocess(t) for t in texts])

    def attended_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of the rows each text attends, in row order (a family that masks padding)."""
        return self.family.attended_ids(self.tokenizers, [self.family.preprocess(t) for t in texts])

    def warn_if_truncated(self, texts: Sequence[str]) -> None:
        """Warn (once per text) when a text is longer than the tokenizer's context."""
        tokenizer = self.tokenizers[0]
        for text in texts:
            n = len(tokenizer(self.family.preprocess(text)).input_ids)
            if n > self.max_length:
                warnings.warn(
                    f"'{text[:40]}...' has {n} tokens; it was truncated to {self.max_length}",
                    TruncationWarning,
                    stacklevel=3,
                )

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 16, progress: bool | None = False) -> torch.Tensor:
        """Return float64 embeddings of shape [len(texts), max_length, dim] on this encoder's device.

        Texts with identical token ids in every tokenizer (e.g. "" and " ") are encoded once. `progress`: a bar over
        the batches once they take a few seconds (None: when stderr is a terminal).
        """
        rows, index = self.encode_unique(texts, batch_size, progress)
        return rows if index == list(range(len(index))) else rows[index]

    @torch.no_grad()
    def encode_unique(
        self, texts: Sequence[str], batch_size: int = 16, progress: bool | None = False
    ) -> tuple[torch.Tensor, list[int]]:
        """(rows of the distinct texts [n, max_length, dim] float64, the row of each text): `encode` without the copy
        that gives every repeat (by token ids) rows of its own."""
        if not texts:
            return torch.zeros(0, self.max_length, self.dim, dtype=torch.float64, device=self.device), []
        texts = [self.family.preprocess(t) for t in texts]
        representative, index = distinct_ids(texts, [tokenize(t, texts, self.max_length).input_ids for t in self.tokenizers])
        out = None  # filled batch by batch: one float64 copy of the rows at any time, not two
        starts = range(0, len(representative), batch_size)
        for start in progress_bar(starts, "encoding texts", "batch", progress):
            chunk = representative[start : start + batch_size]
            rows = self.family.encode_batch(self.tokenizers, self.text_encoders, chunk, self.device)
            if self.projection is not None:
                rows = self.projection(rows.float())
            if out is None:
                out = torch.empty(len(representative), *rows.shape[1:], dtype=torch.float64, device=rows.device)
            out[start : start + len(chunk)] = rows
        return out, index


def distinct_ids(texts: Sequence[str], ids: Sequence[torch.Tensor]) -> tuple[list[str], list[int]]:
    """(the first text of each distinct row of token ids over every tokenizer, in order of first appearance; the
    distinct row of each text), from the [n, L] id tensors (no Python list per token: 8 bytes a token)."""
    joined = torch.cat(list(ids), dim=1)
    distinct, inverse = torch.unique(joined, dim=0, return_inverse=True)
    positions = torch.arange(len(texts))
    first = torch.full((distinct.shape[0],), len(texts)).scatter_reduce(0, inverse, positions, "amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return [texts[i] for i in first[order].tolist()], rank[inverse].tolist()
