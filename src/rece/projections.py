"""Robust mode's linear algebra (`erase._run_robust`): the directions that carry a concept in the keys/values,
the projections that remove them, and how far any embedding stays from the concept afterwards.

Float64 throughout; G = Σ_l W⁰_lᵀW⁰_l is the original K/V weights' Gram matrix, so xᵀGx is the energy of an
embedding's outputs summed over the layers.
"""

from __future__ import annotations

import torch

from .closed_form import outer_sum


def best_residuals(
    transform: torch.Tensor, gram: torch.Tensor, concepts: list[torch.Tensor], blank: torch.Tensor | None = None
) -> list[float]:
    """For each concept's rows c: how much of what tells them from a blank prompt's no embedding at all brings back,
    min over x of ‖W⁰·transform·x − W⁰(c − blank)‖ / ‖W⁰(c − blank)‖ summed over the layers (gram = Σ W⁰ᵀW⁰; blank
    None: of c itself). 0: all of it comes back; 1: none of it.

    In K/V coordinates z = Rᵀx (gram = R Rᵀ) the distance is the part of Rᵀ(c − blank) outside the range of
    Rᵀ·transform, found once for every concept. The blank's own rows are what every prompt shares (an MMDiT's T5
    padding): left in, a sliver of them outside the range would weigh as much as the concept."""
    factor, _ = range_factor(gram)
    basis, singular, _ = torch.linalg.svd(factor.T @ transform, full_matrices=False)
    # removed directions come out of the float64 solves at ~1e-9 of the kept ones, not at machine precision
    kept = basis[:, singular > 1e-6 * singular.max()]
    out = []
    for rows in concepts:
        own = (rows if blank is None else rows - blank[: rows.shape[0]]) @ factor  # [n, r] in K/V coordinates
        outside = own - (own @ kept) @ kept.T
        out.append((outside.pow(2).sum() / own.pow(2).sum().clamp(min=1e-300)).sqrt().item())
    return out


def second_moment(rows: torch.Tensor) -> torch.Tensor:
    """E[x xᵀ] over the rows: [d, d]."""
    return outer_sum(rows, rows) / max(1, rows.shape[0])


def concept_subspace(concept_rows: torch.Tensor, contrast_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions in which the concept's rows differ from other texts' rows at the same position: the principal
    directions of (concept row − mean contrast row), position by position.

    `concept_rows` [n, L, d] and `contrast_rows` [m, L, d] are aligned (row j = j-th row from each text's last word).
    A concept is often a different value along directions other texts use too (triangle vs circle), which a
    difference of second moments cannot see; a difference of means can (as in LEACE). Returns (orthonormal columns
    [d, d], energy along each [d], descending).
    """
    differences = (concept_rows - contrast_rows.mean(dim=0, keepdim=True)).reshape(-1, concept_rows.shape[-1])
    vectors, singular, _ = torch.linalg.svd(differences.T, full_matrices=True)
    energies = torch.zeros(vectors.shape[0], dtype=torch.float64, device=vectors.device)
    energies[: singular.shape[0]] = singular**2 / differences.shape[0]
    return vectors, energies


def projection_metric(preserve_rows: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Σ_preserve + ridge·(its mean eigenvalue)·I: the metric in which a projection disturbs preserved rows least."""
    moment = second_moment(preserve_rows)
    dim = moment.shape[0]
    eye = torch.eye(dim, dtype=torch.float64, device=moment.device)
    return moment + ridge * (torch.trace(moment) / dim + 1e-12) * eye


def rank_for_energy(values: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k directions hold `energy` of the concept's total (non-negative) energy."""
    excess = values.clamp(min=0)
    total = excess.sum()
    if total <= 0:
        return 0
    return int((torch.cumsum(excess, 0) / total < energy).sum().item()) + 1


def oblique_projection(directions: torch.Tensor, preserve_moment: torch.Tensor) -> torch.Tensor:
    """M = I − U (Uᵀ Σ⁻¹ U)⁻¹ Uᵀ Σ⁻¹ with U orthonormalised: M U = 0 (the concept directions are removed from every
    embedding) and, among all such projections, E‖M p − p‖² over the preserved rows (moment Σ) is smallest."""
    dim = preserve_moment.shape[0]
    eye = torch.eye(dim, dtype=torch.float64, device=preserve_moment.device)
    if directions.shape[1] == 0:
        return eye
    basis, _ = torch.linalg.qr(directions)
    solved = torch.linalg.solve(preserve_moment, basis)  # Σ⁻¹ U
    small = basis.T @ solved  # Uᵀ Σ⁻¹ U, [k, k]
    return eye - basis @ torch.linalg.solve(small, solved.T)


def orthogonal_projection(directions: torch.Tensor) -> torch.Tensor:
    """M = I − U Uᵀ (U orthonormalised): every output M x is orthogonal to the concept directions, so no embedding
    at all puts anything along them; a preserved row changes only by its own component along U."""
    dim = directions.shape[0]
    eye = torch.eye(dim, dtype=torch.float64, device=directions.device)
    if directions.shape[1] == 0:
        return eye
    basis, _ = torch.linalg.qr(directions)
    return eye - basis @ basis.T


def key_value_concept_directions(
    difference_rows: torch.Tensor, preserve_rows: torch.Tensor, gram: torch.Tensor, tradeoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding directions u whose key/value outputs carry the most of the concept (rows of concept − mean other
    text) for the least of the preserved rows: the top generalised eigenvectors of
    (Σ_diff − μ·(tr Σ_diff / tr Σ_pres)·Σ_pres, Gram⁻¹) in the reading direction z = Gram·u.

    With `gram` = Σ W⁰ᵀW⁰ = R Rᵀ, this is the eigenproblem of Rᵀ A R; u = R⁻ᵀ w. Returns (u as columns, eigenvalues).
    """
    difference, preserve = second_moment(difference_rows), second_moment(preserve_rows)
    weighted = difference - tradeoff * (torch.trace(difference) / torch.trace(preserve)) * preserve
    chol = gram_factor(gram)
    values, vectors = torch.linalg.eigh(chol.T @ weighted @ chol)
    return torch.linalg.solve_triangular(chol.T, vectors.flip(1), upper=True), values.flip(0)


def key_value_projection(directions: torch.Tensor, gram: torch.Tensor, factors=None) -> torch.Tensor:
    """M = I − U (Uᵀ G U)⁻¹ Uᵀ G with G = Σ W⁰ᵀW⁰: every key/value output W⁰M x is orthogonal to W⁰U, so no
    embedding at all can produce the concept's outputs along those directions. Directions that repeat others (in
    their key/value outputs) are dropped first, so U may hold overlapping sets. `factors`: `range_factor(gram)`,
    when the caller has it."""
    dim = gram.shape[0]
    eye = torch.eye(dim, dtype=torch.float64, device=gram.device)
    if directions.shape[1] == 0:
        return eye
    directions = independent_directions(directions, gram, factors)
    return eye - directions @ torch.linalg.solve(directions.T @ gram @ directions, directions.T @ gram)


def gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """R with R Rᵀ = G (+ a 1e-9 relative ridge): z = Rᵀx are an embedding's key/value coordinates, ‖z‖² its outputs'
    energy summed over the layers."""
    dim = gram.shape[0]
    return torch.linalg.cholesky(gram + 1e-9 * torch.trace(gram) / dim * torch.eye(dim, dtype=gram.dtype, device=gram.device))


def range_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, S), both d×r over the range of G (eigenvalues above 1e-12 of the largest): R Rᵀ = G there and Rᵀ S = I, so
    z = Rᵀx are an embedding's key/value coordinates and x = S z an embedding with those outputs. Directions G sends to
    zero give no output in any layer: they need no removing, and leaving them out keeps the solves well conditioned."""
    values, vectors = torch.linalg.eigh(gram)
    keep = values > 1e-12 * values.max()
    root = values[keep].sqrt()
    return vectors[:, keep] * root, vectors[:, keep] / root


def independent_directions(directions: torch.Tensor, gram: torch.Tensor, factors=None) -> torch.Tensor:
    """A G-orthonormal basis of the outputs of `directions` (columns): those adding nothing new to the keys/values
    (a repeat, or no output at all) dropped. `factors`: `range_factor(gram)`, when the caller has it."""
    factor, inverse = factors if factors is not None else range_factor(gram)
    basis, triangle = torch.linalg.qr(factor.T @ directions)
    diagonal = triangle.diagonal().abs()
    if diagonal.numel() == 0 or diagonal.max() == 0:
        return directions[:, :0]
    return inverse @ basis[:, diagonal > 1e-9 * diagonal.max()]


def unused_directions(preserve_rows: torch.Tensor, gram: torch.Tensor, support: float, factors=None) -> torch.Tensor:
    """Embedding directions (columns) whose key/value outputs the preserved texts barely use: the complement of the
    fewest K/V directions that hold `support` of the preserved rows' K/V energy (none when support is 1).

    Removing them too leaves the edited model only the outputs the preserved texts need; an attack that optimises
    the embedding can no longer use outputs no text ever produced. `factors`: `range_factor(gram)`, when the caller
    has it."""
    dim = gram.shape[0]
    if support >= 1:
        return torch.zeros(dim, 0, dtype=torch.float64, device=gram.device)
    factor, inverse = factors if factors is not None else range_factor(gram)
    outputs = preserve_rows @ factor  # K/V coordinates: an r×r eigenproblem however many rows
    energy, vectors = torch.linalg.eigh(outputs.T @ outputs)
    energy, vectors = energy.flip(0).clamp(min=0), vectors.flip(1)
    kept = int((torch.cumsum(energy, 0) / energy.sum() < support).sum().item()) + 1
    return inverse @ vectors[:, kept:]
