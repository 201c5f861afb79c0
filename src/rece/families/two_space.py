"""Two-space families (MMDiTs: FLUX.1, SD3): the prompt reaches the transformer as token rows, through
`context_embedder`, the last place where every text row is a linear function of the prompt alone (the joint blocks
mix text and image tokens), and as a pooled vector, through `time_text_embed.text_embedder.linear_1` (the
modulation). Each space is erased on its own, with the same procedure; a family module says how each is encoded."""

from __future__ import annotations

import re

import torch

from .base import Family

CONTEXT = re.compile(r"^context_embedder\.weight$")
POOLED = re.compile(r"^time_text_embed\.text_embedder\.linear_1\.weight$")


class TwoSpace(Family):
    """A family whose `spaces` are its token space and its pooled space."""

    def embeds_call(self, pipe, rows, attended, texts) -> dict:
        """The token rows and the pooled vector, each where the pipeline takes it."""
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
        return {"prompt_embeds": rows[0].to(device, dtype), "pooled_prompt_embeds": rows[1][:, 0].to(device, dtype)}

    def predict(self, pipe, noisy, timestep, rows, attended, guidance) -> torch.Tensor:
        """SD3's MMDiT: the token rows and the pooled vector; its timestep on the scheduler's scale."""
        dtype = pipe.transformer.dtype
        return pipe.transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=rows[0].to(dtype),
                                pooled_projections=rows[1][:, 0].to(dtype)).sample  # fmt: skip


def two_space_family(cls: type[TwoSpace], name: str, context: type[Family], pooled: type[Family], shared: dict,
                     rows: int | None = None) -> TwoSpace:  # fmt: skip
    """A family of class `cls`: its token space (`context_embedder`, `rows` rows per prompt, None: the tokenizer's) and
    its pooled space (`text_embedder.linear_1`, one row per text, whatever the sequence length)."""
    return cls(
        name=name,
        edited=re.compile(f"{CONTEXT.pattern}|{POOLED.pattern}"),
        edited_title="context_embedder / time_text_embed.text_embedder.linear_1",
        spaces=(
            context(name=f"{name}:context", edited=CONTEXT, max_length=rows, **shared),
            pooled(name=f"{name}:pooled", edited=POOLED, whole_rows=True, **{**shared, "sequence_lengths": ()}),
        ),
        **shared,
    )
