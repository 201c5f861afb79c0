"""Which target row each row of RECE's c′ is mapped to, on a model that masks padding (PixArt-α/Σ, Sana).

RECE (Gong et al. 2024, Alg. 1) maps the derived embedding c′ to the target's embedding row by row; on SD every text
has the same 77 rows, so row i goes to row i. An encoder whose padding the denoiser never attends leaves a choice the
paper did not face: a concept's attended rows outnumber those of a short target (" "), and a concept's rows include
words its preserved texts share ("a" in "a triangle" and "a circle"). The choices (`--pairing`):

- `position`: row i of c′ to row i of the target, masked padding included (the paper's rule carried over as is).
- `attended`: as UCE slices, from each text's last word, and only as many rows as the target attends.
- `unshared`: row i to row i, only the rows whose token no preserved text has (the concept's own words).

A model that does not mask padding always pairs by position: the paper's procedure, unchanged.

UCE's own slice (`--uce-rows`) starts at the concept's last word. With a bidirectional encoder the rows before it
carry the concept too ("red" in "a red circle"); `unshared` adds those of the concept's own words to UCE's pairs.
"""

from __future__ import annotations

import torch

from .closed_form import attended_token_rows


def position_pair(derived: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of c′ to row i of the target (Gong et al. 2024, Alg. 1)."""
    return derived, target[: derived.shape[0]]


def attended_pair(
    derived: torch.Tensor, target: torch.Tensor, target_count: int, end_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """c′ from the concept's last word token to the target's rows from its own, as many as the target attends
    (`derived` holds the concept's attended rows; `end_rows`: rows after the last word token, 1 for T5's EOS)."""
    return attended_token_rows(derived, derived.shape[0], target[:target_count], target_count, end_rows)


def unshared_rows(concept_ids: list[int], preserved_ids: set[int]) -> list[int]:
    """Positions of the concept's tokens that no preserved text holds."""
    return [i for i, token in enumerate(concept_ids) if token not in preserved_ids]


def unshared_pair(derived: torch.Tensor, target: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of c′ to row i of the target, for the positions in `keep` only."""
    index = torch.tensor(keep, dtype=torch.long, device=derived.device)
    return derived[index], target[index]


def uce_unshared_rows(
    concept: torch.Tensor, target: torch.Tensor, keep: list[int], tail_start: int, target_last: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The concept's own-word rows before UCE's slice (`keep` below `tail_start`), each to the target's row at the same
    position, or to its last word row (`target_last`) where the target is shorter."""
    rows = [i for i in keep if i < tail_start]
    index = torch.tensor(rows, dtype=torch.long, device=concept.device)
    return concept[index], target[index.clamp(max=target_last)]
