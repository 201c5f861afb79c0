"""Adversarial tokens of a family whose rows come from its one text encoder through denoiser modules, with the padding
masked (PixArt-α/Σ: T5; Sana: Gemma-2 after the pipeline's instruction): where a text's tokens sit in the encoder's
input as the pipeline lays it out, which token sequences survive being decoded and tokenized again there, and the
gradient of a loss on the rows the edited layers read with respect to the one-hot tokens (GCG's relaxation).

A text's tokens are found by comparing the pipeline's attended ids of the text with those of the empty prompt: what
they share at the start (Sana's BOS and instruction; nothing for T5) and at the end (T5's EOS; nothing for Gemma) is
the frame, the rest the text's tokens. Sentencepiece tokenizers may merge a text's first token with the frame (Gemma's
"▁" after "User Prompt:") or split a decoded word differently; a token sequence round-trips when the pipeline's
tokens of its decoded text are exactly it, so that the tokens the gradient ranks are the tokens the rows come from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .common import frozen

TABLE_SLICE = 16384  # token-table rows looked up at once for the gradient (Gemma-2's 256,000 × 2,304 would be 2.4 GB)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class EncoderTokens:
    """The tokens of one masked family's text encoder (`view`: a `models.BaseModel` of one space), with `loss` (rows
    [n, L, d] with their masked rows zero -> [n]) the objective whose gradient ranks substitutions."""

    def __init__(self, view, loss: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.encoder = view.encoder  # text.PromptEncoder: tokenizers, encoders, projection, family
        self.family = view.family
        self.tokenizer = self.encoder.tokenizers[0]
        self.text_encoder = self.encoder.text_encoders[0]
        self.loss = loss
        self.empty = self.attended_ids([""])[0]

    def attended_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids the pipeline gives its text encoder for each text, up to its attention mask."""
        inputs = self.family.encoder_inputs(self.encoder.tokenizers, [self.family.preprocess(t) for t in texts])
        return [ids[mask.bool()].tolist() for ids, mask in zip(inputs.input_ids, inputs.attention_mask)]

    def text_tokens(self, ids: list[int]) -> tuple[int, list[int]]:
        """(where the text's tokens start, those tokens) among a text's attended ids: what the empty prompt's lack."""
        start = common_prefix(ids, self.empty)
        end = common_prefix(ids[start:][::-1], self.empty[start:][::-1])
        return start, ids[start : len(ids) - end]

    def decoded(self, control: torch.Tensor) -> list[str]:
        """The text of each row of tokens [n, K]."""
        return [self.tokenizer.decode(row.tolist()) for row in control]

    def round_trips(self, control: torch.Tensor) -> torch.Tensor:
        """Which rows of tokens [n, K] the pipeline tokenizes back to exactly themselves from their decoded text ([n] bool)."""
        found = [self.text_tokens(ids)[1] for ids in self.attended_ids(self.decoded(control))]
        return torch.tensor([f == row.tolist() for f, row in zip(found, control)], dtype=torch.bool)

    def rows(self, text: str, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The rows [1, L, d] the edited layers read for `text` (masked rows zero); with `token_embeds` [K, d_tok] what
        the lookup gives for its K tokens is replaced by them and gradients flow."""
        text = self.family.preprocess(text)
        handle = None
        if token_embeds is not None:
            start = self.text_tokens(self.attended_ids([text])[0])[0]
            lookup = self.text_encoder.get_input_embeddings()

            def replace(module, args, kwargs):
                # the encoder is given embeddings for its ids instead of the ids (its own lookup module is not always
                # get_input_embeddings(): transformers 5's T5 looks up in a stack's copy that shares the weights)
                ids = args[0] if args else kwargs.pop("input_ids")
                looked_up = lookup(ids.to(lookup.weight.device))
                embeds = token_embeds[None].to(looked_up.dtype)
                joined = torch.cat([looked_up[:, :start], embeds, looked_up[:, start + embeds.shape[1] :]], dim=1)
                return (), {**kwargs, "inputs_embeds": joined}

            handle = self.text_encoder.register_forward_pre_hook(replace, with_kwargs=True)
        try:
            with torch.set_grad_enabled(token_embeds is not None):
                rows = self.family.encode_batch(self.encoder.tokenizers, self.encoder.text_encoders, [text], self.encoder.device)
                if self.encoder.projection is not None:
                    rows = self.encoder.projection(rows.float())
        finally:
            if handle is not None:
                handle.remove()
        count = self.family.attention_counts(self.encoder.tokenizers, [text])[0]
        return rows * (torch.arange(rows.shape[1], device=rows.device) < count)[None, :, None]

    def gradient(self, control: torch.Tensor) -> torch.Tensor:
        """∂loss/∂one-hot tokens [K, vocab] at tokens `control` [K] (which round-trip), on the CPU.

        The relaxed lookup of one-hot tokens is one_hot @ T, T the table as the lookup gives it (Gemma's lookup scales
        the stored weights), so the gradient is ∂loss/∂(looked-up rows) @ Tᵀ; T is looked up in slices, never whole."""
        lookup = self.text_encoder.get_input_embeddings()
        device = lookup.weight.device
        with torch.no_grad():
            embeds = lookup(control.to(device)).float()
        embeds.requires_grad_(True)
        modules = [self.text_encoder] + ([self.encoder.projection] if self.encoder.projection is not None else [])
        with frozen(*modules):
            self.loss(self.rows(self.decoded(control[None])[0], embeds)).sum().backward()
        grad, vocab = embeds.grad, lookup.num_embeddings
        out = torch.empty(len(control), vocab)
        with torch.no_grad():
            for start in range(0, vocab, TABLE_SLICE):
                ids = torch.arange(start, min(start + TABLE_SLICE, vocab), device=device)
                out[:, start : start + len(ids)] = (grad @ lookup(ids).float().T).cpu()
        return out
