"""How rece draws from a model when the caller does not say: the shapes models' own steps and guidance, else the
model family's, at the sequence length the applied edits were erased at (else the family's first). `rece generate`,
the attacks and the sweeps all ask here, so one model is drawn the same way by each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .toy import door


@dataclass(frozen=True)
class Sampling:
    """Steps, guidance, and the options of every pipeline call (a family's fixed ones, its `max_sequence_length`)."""

    steps: int
    guidance: float
    call: dict
    sequence_length: int | None = None  # T5 rows per prompt, for families whose rows depend on it


def drawing_length(family, edits: Sequence = ()) -> int | None:
    """The sequence length to draw with: the first the applied edits were erased at, else the family's own."""
    for edit in edits:
        if edit.sequence_lengths:
            return edit.sequence_lengths[0]
    return family.sequence_lengths[0] if family.sequence_lengths else None


def sampling_for(model, family, steps: int | None = None, guidance: float | None = None, edits: Sequence = ()) -> Sampling:
    """The given steps and guidance, else the shapes model's (25, 4.0) or the family's; the family's call options at
    the edits' sequence length."""
    default_steps, default_guidance = door.sampling_defaults(model) or (family.steps, family.guidance)
    length = drawing_length(family, edits)
    return Sampling(
        steps=default_steps if steps is None else steps,
        guidance=float(default_guidance if guidance is None else guidance),
        call=family.call_options(length),
        sequence_length=length,
    )
