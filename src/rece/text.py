"""Text encoding: the exact prompt embeddings a pipeline feeds to its UNet's cross-attention."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch


class TruncationWarning(UserWarning):
    """A text was longer than the tokenizer's context and was cut."""


class PromptEncoder:
    """Encode texts as the pipeline does: SD1/SD2 take the last hidden state, SDXL concatenates the
    penultimate hidden states of both text encoders."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence, kind: str = "sd", device: str | torch.device = "cpu"):
        if kind not in ("sd", "sdxl"):
            raise ValueError(f"unknown pipeline kind {kind!r}")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.kind = kind
        self.device = torch.device(device)

    @property
    def max_length(self) -> int:
        return self.tokenizers[0].model_max_length

    @property
    def dim(self) -> int:
        if self.kind == "sdxl":
            return sum(te.config.hidden_size for te in self.text_encoders)
        return self.text_encoders[0].config.hidden_size

    def _tokenize(self, tokenizer, texts: Sequence[str]):
        return tokenizer(
            list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Number of attention-mask ones (BOS + tokens + EOS) of each text, after truncation."""
        return self._tokenize(self.tokenizers[0], texts).attention_mask.sum(dim=1).tolist()

    def warn_if_truncated(self, texts: Sequence[str]) -> None:
        """Warn (once per text) when a text is longer than the tokenizer's context."""
        tokenizer = self.tokenizers[0]
        for text in texts:
            n = len(tokenizer(text).input_ids)
            if n > tokenizer.model_max_length:
                warnings.warn(
                    f"'{text[:40]}...' has {n} tokens; it was truncated to {tokenizer.model_max_length}",
                    TruncationWarning,
                    stacklevel=3,
                )

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Return float64 embeddings of shape [len(texts), 77, dim] on this encoder's device.

        Texts with identical token ids in every tokenizer (e.g. "" and " ") are encoded once.
        """
        if not texts:
            return torch.zeros(0, self.max_length, self.dim, dtype=torch.float64, device=self.device)
        ids = [self._tokenize(t, texts).input_ids.tolist() for t in self.tokenizers]
        keys = [tuple(tuple(per_tokenizer[i]) for per_tokenizer in ids) for i in range(len(texts))]
        unique = list(dict.fromkeys(keys))
        representative = {key: texts[keys.index(key)] for key in unique}
        out = []
        for start in range(0, len(unique), batch_size):
            chunk = [representative[k] for k in unique[start : start + batch_size]]
            out.append(self._encode_batch(chunk).to(torch.float64))
        position = {k: i for i, k in enumerate(unique)}
        return torch.cat(out)[[position[k] for k in keys]]

    def _encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        if self.kind == "sd":
            tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
            inputs = self._tokenize(tokenizer, texts)
            mask = None
            if getattr(encoder.config, "use_attention_mask", False):
                mask = inputs.attention_mask.to(self.device)
            return encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        parts = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            inputs = self._tokenize(tokenizer, texts)
            parts.append(encoder(inputs.input_ids.to(self.device), output_hidden_states=True).hidden_states[-2])
        return torch.cat(parts, dim=-1)
