"""The closed-form math of UCE and RECE, as small pure functions on float64 tensors.

Rows are embeddings: a [n, d] tensor holds n token embeddings. A weight W is [out, d].
"""

from __future__ import annotations

import torch

from .errors import ReceError

MAX_CONDITION = 1e13
CHUNK_ROWS = 16384  # rows the accumulated updates and the derivations handle at a time (memory O(CHUNK_ROWS·d))


def outer_sum(left_rows: torch.Tensor, right_rows: torch.Tensor) -> torch.Tensor:
    """Σ_i l_i r_iᵀ for row matrices: leftᵀ @ right, [d_l, d_r]."""
    return left_rows.transpose(-1, -2) @ right_rows


def check_conditioning(matrix: torch.Tensor, parameter: str, shift: float = 0.0, outside: float | None = None) -> None:
    """Refuse a symmetric system too ill-conditioned to solve reliably, naming the parameter to raise.

    `matrix` = shift·I + (PSD part). Then cond ≤ (shift + ‖PSD part‖_F) / shift, an O(d²) bound that
    settles almost every case; only when it cannot are the eigenvalues computed. `outside` is an eigenvalue the
    system has besides those of `matrix` (λ, when `matrix` is the n×n Woodbury form of a d×d λI + UᵀU, n < d).
    """
    if shift > 0:
        eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        if (shift + torch.linalg.matrix_norm(matrix - shift * eye).item()) / shift < MAX_CONDITION:
            return
    eig = torch.linalg.eigvalsh(matrix)
    smallest, largest = eig[0].item(), eig[-1].abs().item()
    if outside is not None:
        smallest, largest = min(smallest, outside), max(largest, abs(outside))
    if not (smallest > 0 and largest / smallest < MAX_CONDITION):
        cond = float("inf") if smallest <= 0 else largest / smallest
        raise ReceError(f"the linear system is too ill-conditioned to solve (condition number {cond:.3g}); raise {parameter}")


def solve_ridge(lamb: float, rows: torch.Tensor, rhs: torch.Tensor, parameter: str) -> torch.Tensor:
    """(λI + rowsᵀrows)⁻¹ rhs for rows [n, d], after a conditioning check naming `parameter`.

    With fewer rows than columns the d×d system is solved as an n×n one by the Woodbury identity,
    (λI + UᵀU)⁻¹ = (I − Uᵀ(λI + UUᵀ)⁻¹U)/λ: for one concept on SD1.x that is 154×154 instead of 768×768.
    """
    n, d = rows.shape
    if n >= d:
        system = lamb * torch.eye(d, dtype=rows.dtype, device=rows.device) + outer_sum(rows, rows)
        check_conditioning(system, parameter, shift=lamb)
        return torch.linalg.solve(system, rhs)
    small = lamb * torch.eye(n, dtype=rows.dtype, device=rows.device) + rows @ rows.T
    check_conditioning(small, parameter, shift=lamb, outside=lamb)
    return (rhs - rows.T @ torch.linalg.solve(small, rows @ rhs)) / lamb


def solve_right(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator @ denominator⁻¹ without forming the inverse (float64 solve)."""
    return torch.linalg.solve(denominator.transpose(-1, -2), numerator.transpose(-1, -2)).transpose(-1, -2)


def edit_denominator(erase_rows, preserve_rows, lamb: float, erase_scale: float, preserve_scale: float, dim: int):
    """λI + s_e Σ c cᵀ + s_p Σ p pᵀ: the right factor of every layer's update (it does not depend on W)."""
    eye = torch.eye(dim, dtype=torch.float64, device=erase_rows.device)
    return lamb * eye + erase_scale * outer_sum(erase_rows, erase_rows) + preserve_scale * outer_sum(preserve_rows, preserve_rows)


def shared_edit_transform(
    erase_rows: torch.Tensor,
    target_rows: torch.Tensor,
    preserve_rows: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
    parameter: str = "--lamb",
) -> torch.Tensor:
    """The d×d matrix M with W' = W·M for every layer ("replace" technique).

    M = (λI + s_e Σ c* cᵀ + s_p Σ p pᵀ)(λI + s_e Σ c cᵀ + s_p Σ p pᵀ)⁻¹

    The numerator minus the denominator is s_e Σ (c* − c) cᵀ, so M = I + s_e (C* − C)ᵀ (D⁻¹ Cᵀ)ᵀ with D the
    (symmetric) denominator: one solve with as many right-hand sides as erased rows instead of d.
    """
    left, right = shared_edit_factors(erase_rows, target_rows, preserve_rows, lamb, erase_scale, preserve_scale, parameter)
    return identity_plus(left, right)


def shared_edit_factors(
    erase_rows: torch.Tensor,
    target_rows: torch.Tensor,
    preserve_rows: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
    parameter: str = "--lamb",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_edit_transform` as low-rank factors: M = I + left·rightᵀ with left = s_e (C* − C)ᵀ and right = D⁻¹Cᵀ.

    D = λI + UᵀU with U the erased rows scaled by √s_e over the preserved rows scaled by √s_p.
    """
    rows = torch.cat([erase_scale**0.5 * erase_rows, preserve_scale**0.5 * preserve_rows])
    right = solve_ridge(lamb, rows, erase_rows.T, parameter)  # D⁻¹ Cᵀ, [d, n]
    return erase_scale * (target_rows - erase_rows).T, right


def gram_rows(gram: torch.Tensor) -> torch.Tensor:
    """d rows S with SᵀS = gram (symmetric PSD): diag(√λ)·Vᵀ of its eigendecomposition, rounding's negative λ as 0."""
    values, vectors = torch.linalg.eigh(gram)
    return values.clamp(min=0).sqrt()[:, None] * vectors.T


class RowSum:
    """Σ r rᵀ over rows added a batch at a time, read back as rows with that outer-product sum: the rows themselves
    while they are at most d (the closed forms then solve the small Woodbury system), else `gram_rows` of the float64
    gram, so any number of preserved texts costs O(d²)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim, self.device = dim, device
        self.kept: list[torch.Tensor] = []
        self.count = 0
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Add the rows' outer products (float64 rows [n, d])."""
        self.count += rows.shape[0]
        if self.gram is None and self.count <= self.dim:
            self.kept.append(rows)
            return
        if self.gram is None:
            self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
            for kept in self.kept:
                self.gram += outer_sum(kept, kept)
            self.kept = []
        self.gram += outer_sum(rows, rows)

    def rows(self) -> torch.Tensor:
        """Rows U with UᵀU = the sum: [min(n, d), d]."""
        if self.gram is not None:
            return gram_rows(self.gram)
        if not self.kept:
            return torch.zeros(0, self.dim, dtype=torch.float64, device=self.device)
        return torch.cat(self.kept)


def row_chunks(lengths: list[int], chunk_rows: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) ranges of consecutive items (of `lengths` rows each) holding at most `chunk_rows` rows together
    (default CHUNK_ROWS); an item longer than that is a chunk of its own."""
    limit, out, start = chunk_rows or CHUNK_ROWS, [], 0
    while start < len(lengths):
        stop, rows = start, 0
        while stop < len(lengths) and (rows == 0 or rows + lengths[stop] <= limit):
            rows += lengths[stop]
            stop += 1
        out.append((start, stop))
        start = stop
    return out


def accumulated_edit_delta(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    preserve_rows: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
    parameter: str = "--lamb",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """M − I = s_e (C* − C)ᵀC · D⁻¹ as a dense d×d matrix, D = λI + s_e CᵀC + s_p PᵀP: `shared_edit_transform`
    minus I when the erased rows outnumber d, so the low-rank factors would be wider than the matrix.

    The d×d sums are accumulated over the erase pairs a chunk of rows at a time: memory stays O(d² + chunk·d)
    however many concepts are erased.
    """
    dim = preserve_rows.shape[1]
    gram = preserve_scale * outer_sum(preserve_rows, preserve_rows)
    cross = torch.zeros(dim, dim, dtype=torch.float64, device=preserve_rows.device)
    for start, stop in row_chunks([c.shape[0] for c, _ in pairs], chunk_rows):
        erase = torch.cat([c for c, _ in pairs[start:stop]])
        target = torch.cat([t for _, t in pairs[start:stop]])
        gram += erase_scale * outer_sum(erase, erase)
        cross += erase_scale * outer_sum(target - erase, erase)  # Σ (c* − c) cᵀ
    return ridge_solver(gram, lamb, parameter)(cross.T).T  # cross·D⁻¹ = (D⁻¹crossᵀ)ᵀ, D symmetric


def identity_plus(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """I + left·rightᵀ as a dense d×d matrix."""
    eye = torch.eye(left.shape[0], dtype=left.dtype, device=left.device)
    return eye + (left if is_identity(right) else left @ right.T)


def compose_low_rank(left: torch.Tensor, right: torch.Tensor, next_left: torch.Tensor, next_right: torch.Tensor):
    """Factors of (I + L Rᵀ)(I + A Bᵀ) = I + [L, A + L(RᵀA)]·[R, B]ᵀ; once that is wider than d, (T − I, I) instead."""
    left = torch.cat([left, next_left + left @ (right.T @ next_left)], dim=1)
    right = torch.cat([right, next_right], dim=1)
    dim = left.shape[0]
    if left.shape[1] > dim:
        return left @ right.T, torch.eye(dim, dtype=left.dtype, device=left.device)
    return left, right


def transformed_gram(gram: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """TᵀGT for a symmetric G and T = I + L Rᵀ, as G + Y Rᵀ + (Y Rᵀ)ᵀ with Y = GL + ½R(LᵀGL): about 4d²k work for
    rank k (a symmetric rank-2k update) instead of 4d³; dense once k is near d.

    With W_l = W⁰_l·T and G = Σ W⁰ᵀW⁰ this is the edited gram Σ W_lᵀW_l; applied epoch after epoch with each update's
    factors it keeps the gram current without ever multiplying the composed transform out.
    """
    dim, rank = left.shape
    if 4 * rank >= 3 * dim:  # no cheaper than the dense products
        transform = identity_plus(left, right)
        return transform.T @ gram @ transform
    h = gram @ left
    y = h + 0.5 * right @ (left.T @ h)
    update = y @ right.T
    return gram + update + update.T


def is_identity(matrix: torch.Tensor) -> bool:
    """Whether a square matrix is I (the right factor of a transform kept dense as (T − I, I))."""
    if matrix.shape[0] != matrix.shape[1]:
        return False
    return torch.equal(matrix, torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device))


def transpose_times(left: torch.Tensor, right: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Tᵀ·columns for T = I + L Rᵀ: columns + R (Lᵀ columns), without forming T."""
    moved = left.T @ columns
    return columns + (moved if is_identity(right) else right @ moved)


class EditedGrams:
    """What RECE's derivation reads of the edited model W_l = W⁰_l·T, kept current while T = Π (I + A Bᵀ) grows: the
    edited gram TᵀG₀T and TᵀG₀ applied to the concept rows, kept as those columns when the rows are fewer than d,
    else as the d×d cross gram TᵀG₀ itself (whichever is smaller)."""

    def __init__(self, gram0: torch.Tensor, concept_rows: list[torch.Tensor], left: torch.Tensor, right: torch.Tensor):
        self.rows = concept_rows
        self.by_columns = sum(c.shape[0] for c in concept_rows) < gram0.shape[0]
        self.gram = transformed_gram(gram0, left, right)
        self.products = transpose_times(left, right, gram0 @ torch.cat(concept_rows).T if self.by_columns else gram0)

    def update(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """T ← T·(I + left·rightᵀ)."""
        self.gram = transformed_gram(self.gram, left, right)
        self.products = transpose_times(left, right, self.products)

    def derive(
        self, regularization: float, anchor: torch.Tensor | None = None, chunk_rows: int | None = None, into=None
    ) -> list[torch.Tensor]:
        """Each concept's c′ (`derive_embedding`), one factorisation for all, solved a chunk of concepts at a time.

        `into`: a [concepts, L, d] tensor to write each c′ into (row i, its first rows); the c′ returned are then views
        of it, so the rows are held once.
        """
        solve, out, column = ridge_solver(self.gram, regularization), [], 0
        for start, stop in row_chunks([c.shape[0] for c in self.rows], chunk_rows):
            chunk = self.rows[start:stop]
            rows = sum(c.shape[0] for c in chunk)
            rhs = self.products[:, column : column + rows] if self.by_columns else self.products @ torch.cat(chunk).T
            if anchor is not None:
                rhs = rhs + regularization * torch.cat([anchor[: c.shape[0]] for c in chunk]).T
            solved = solve(rhs).T.split([c.shape[0] for c in chunk])
            if into is not None:
                for i, rows_i in enumerate(solved, start=start):
                    into[i, : rows_i.shape[0]] = rows_i
                solved = [into[i, : c.shape[0]] for i, c in enumerate(chunk, start=start)]
            out.extend(solved)
            column += rows
        return out


def low_rank_delta(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """W(T − I) for T = I + L Rᵀ (float64): (W L) Rᵀ, or W (L Rᵀ) when the rank is so wide that this costs less."""
    weight = weight.to(left.dtype)
    out, (dim, rank) = weight.shape[0], left.shape
    if 4 * out * dim * rank > 2 * dim * dim * (rank + out):
        return weight @ (left @ right.T)
    return (weight @ left) @ right.T


def tensor_target_values(weight: torch.Tensor, erase_rows: torch.Tensor, target_rows: torch.Tensor) -> torch.Tensor:
    """UCE's "tensor" technique: target values W c* minus their projection on the normalised W c (one pair)."""
    old = erase_rows @ weight.T
    unit = old / old.norm()
    new = target_rows @ weight.T
    return new - (unit * new).sum() * unit


def edit_layer(
    weight: torch.Tensor,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    preserve_rows: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
    technique: str = "replace",
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's closed-form update W' = M1·M2⁻¹ (UCE), for erase pairs (C, C*) and preserved rows."""
    dim = weight.shape[1]
    if denominator is None:
        erase_rows = torch.cat([c for c, _ in pairs]) if pairs else weight.new_zeros(0, dim)
        denominator = edit_denominator(erase_rows, preserve_rows, lamb, erase_scale, preserve_scale, dim)
    numerator = lamb * weight + preserve_scale * weight @ outer_sum(preserve_rows, preserve_rows)
    for erase_rows, target_rows in pairs:
        if technique == "tensor":
            values = tensor_target_values(weight, erase_rows, target_rows)
        else:
            values = target_rows @ weight.T
        numerator = numerator + erase_scale * outer_sum(values, erase_rows)
    return solve_right(numerator, denominator)


def weight_gram(weights, blocks: int = 8) -> torch.Tensor:
    """Σ_l W_lᵀ W_l over layers, in float64: [d, d].

    The gram is symmetric, so only its upper block triangle is multiplied out (36 of 64 blocks) and mirrored.
    """
    weights = list(weights)
    dim = weights[0].shape[1]
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=weights[0].device)
    edges = [dim * i // blocks for i in range(blocks + 1)]
    for w in weights:
        w = w.to(torch.float64)
        for lo, hi in zip(edges[:-1], edges[1:]):
            gram[lo:hi, lo:] += w[:, lo:hi].T @ w[:, lo:]
    return gram.triu() + gram.triu(1).T


def cross_gram(weights, original_weights) -> torch.Tensor:
    """Σ_l W_lᵀ W⁰_l over layers, in float64: [d, d]."""
    out = None
    for w, w0 in zip(weights, original_weights):
        term = w.to(torch.float64).T @ w0.to(torch.float64)
        out = term if out is None else out + term
    return out


def ridge_is_well_conditioned(psd: torch.Tensor, shift: float) -> bool:
    """Whether shift·I + psd (psd symmetric positive semi-definite) passes `check_conditioning`'s O(d²) bound."""
    return shift > 0 and (shift + torch.linalg.matrix_norm(psd).item()) / shift < MAX_CONDITION


def ridge_solver(gram: torch.Tensor, regularization: float, parameter: str = "--regularization"):
    """x ↦ (rI + gram)⁻¹ x for a symmetric positive semi-definite gram, factorised once after a conditioning check
    naming `parameter`.

    The system is symmetric positive definite, so it is factorised by float64 Cholesky (half the work of the LU in
    `torch.linalg.solve`, and as stable); LU is the fallback should the factorisation fail.
    """
    dim = gram.shape[0]
    system = gram + regularization * torch.eye(dim, dtype=gram.dtype, device=gram.device)
    if not ridge_is_well_conditioned(gram, regularization):
        check_conditioning(system, parameter, shift=regularization)
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        return lambda rhs: torch.linalg.solve(system, rhs)
    return lambda rhs: torch.cholesky_solve(rhs, factor)


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, regularization: float, parameter: str = "--regularization"):
    """(rI + gram)⁻¹ rhs for a symmetric positive semi-definite gram (see `ridge_solver`)."""
    return ridge_solver(gram, regularization, parameter)(rhs)


def derive_embedding(
    concept_rows: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    regularization: float,
    anchor_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """RECE's derived embedding c′ = argmin Σ_l ‖W_l c′ − W⁰_l c‖² + r‖c′ − a‖², row by row.

    `gram` = Σ W_lᵀW_l (edited), `cross` = Σ W_lᵀW⁰_l. With no anchor ("regzero"), a = 0:
    c′ = (rI + gram)⁻¹ cross c. With anchor rows a ("standard"): c′ = (rI + gram)⁻¹ (r a + cross c).
    """
    return derive_from_products(cross @ concept_rows.T, gram, regularization, anchor_rows)


def derive_from_products(
    products: torch.Tensor, gram: torch.Tensor, regularization: float, anchor_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """`derive_embedding` from the columns Σ W_lᵀW⁰_l c (one per concept row) instead of the cross gram: [n, d]."""
    rhs = products if anchor_rows is None else products + regularization * anchor_rows.T
    return ridge_solve(gram, rhs, regularization).T


def derive_against(
    concept_rows: torch.Tensor,
    weights,
    original_weights,
    regularization: float,
    anchor_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`derive_embedding` against explicit layer weights W_l (edited) and W⁰_l (original), both in the same order."""
    weights, original_weights = list(weights), list(original_weights)
    return derive_embedding(
        concept_rows, weight_gram(weights), cross_gram(weights, original_weights), regularization, anchor_rows
    )


def uce_token_rows(concept_emb: torch.Tensor, concept_count: int, target_emb: torch.Tensor, target_count: int):
    """UCE's row slices for an erase pair: from each text's last word token, aligned to the same length.

    `*_count` is the number of attention-mask ones (BOS + tokens + EOS) of each text; a T5 text has no BOS, so an
    empty one (EOS alone) starts at row 0.
    """
    length = concept_emb.shape[0]
    i_x, i_y = max(concept_count - 2, 0), max(target_count - 2, 0)
    far = max(i_x, i_y)
    return concept_emb[i_x : length - (far - i_x)], target_emb[i_y : length - (far - i_y)]


def last_word_row(count: int, end_rows: int = 1) -> int:
    """Row of a masked text's last word token: its attended rows less `end_rows` (EOS) less one, or 0 for an empty one."""
    return max(count - 1 - end_rows, 0)


def attended_token_rows(
    concept_emb: torch.Tensor, concept_count: int, target_emb: torch.Tensor, target_count: int, end_rows: int = 1
):
    """UCE's row slices when the model masks padding: the concept's attended rows from its last word token on, and the
    target's rows at the same offsets from its own last word token (its padded rows when it attends fewer).

    `*_emb` are the padded [L, d] rows, `*_count` the attended rows, `end_rows` the attended rows after the last word
    token (1 for T5's and CLIP's EOS, 0 for Gemma, which has none).
    """
    i_x, i_y = last_word_row(concept_count, end_rows), last_word_row(target_count, end_rows)
    length = min(concept_count - i_x, target_emb.shape[0] - i_y)
    return concept_emb[i_x : i_x + length], target_emb[i_y : i_y + length]


def relative_residual(weights, original_weights, rows: torch.Tensor, original_rows: torch.Tensor) -> float:
    """‖[W_l rows]_l − [W⁰_l original_rows]_l‖ / ‖[W⁰_l original_rows]_l‖ over all layers."""
    num = den = 0.0
    for w, w0 in zip(weights, original_weights):
        target = original_rows @ w0.to(torch.float64).T
        num += (rows @ w.to(torch.float64).T - target).pow(2).sum().item()
        den += target.pow(2).sum().item()
    return (num / den) ** 0.5
