"""The closed-form math on random matrices: against plain transcriptions, and what each step promises."""

import pytest
import torch

from rece import closed_form as cf
from rece import projections as pj
from rece.errors import ReceError

from .reference import uce_layer


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_shared_transform_equals_per_layer_transcription():
    d = 24
    weights = [rand(16, d, seed=i) for i in range(4)]
    C, Cs, P = rand(5, d, seed=10), rand(5, d, seed=11), rand(9, d, seed=12)
    M = cf.shared_edit_transform(C, Cs, P, lamb=0.5, erase_scale=1.0, preserve_scale=0.3)
    for W in weights:
        expected = uce_layer(W, [(C, Cs)], P, 0.5, 1.0, 0.3)
        assert rel(W @ M, expected) < 1e-10
        assert rel(cf.edit_layer(W, [(C, Cs)], P, 0.5, 1.0, 0.3), expected) < 1e-10


def test_tensor_technique_matches_transcription():
    d = 20
    W = rand(12, d, seed=1)
    pairs = [(rand(3, d, seed=2), rand(3, d, seed=3)), (rand(2, d, seed=4), rand(2, d, seed=5))]
    P = rand(6, d, seed=6)
    got = cf.edit_layer(W, pairs, P, 0.1, 2.0, 0.2, technique="tensor")
    assert rel(got, uce_layer(W, pairs, P, 0.1, 2.0, 0.2, technique="tensor")) < 1e-10
    assert rel(got, uce_layer(W, pairs, P, 0.1, 2.0, 0.2, technique="replace")) > 1e-3  # the techniques differ


def test_erased_rows_map_to_target_and_preserved_rows_keep_their_values():
    d = 128
    W = rand(64, d, seed=1)
    C, Cs = rand(3, d, seed=2), rand(3, d, seed=3)
    P = torch.linalg.qr(rand(d, 40, seed=4))[0][:, 3:].T.clone() * 5  # 37 rows orthogonal to nothing in particular
    before = rel(C @ W.T, Cs @ W.T)
    M = cf.shared_edit_transform(C, Cs, P, lamb=1e-3, erase_scale=1.0, preserve_scale=1.0)
    new = W @ M
    assert before > 0.5
    assert rel(C @ new.T, Cs @ W.T) < 0.05  # erased concept now gives the target's keys/values
    assert rel(P @ new.T, P @ W.T) < 0.05  # preserved rows keep theirs


def test_derived_embedding_is_the_regularised_least_squares_solution():
    d = 16
    W0 = [rand(10, d, seed=i) for i in range(3)]
    M = torch.eye(d, dtype=torch.float64) + 0.3 * rand(d, d, seed=9)
    W = [w @ M for w in W0]
    c = rand(4, d, seed=7)
    r = 0.05
    cp = cf.derive_against(c, W, W0, r)
    # normal equations: (rI + Σ WᵀW) c′ = Σ WᵀW⁰ c, row by row
    A = r * torch.eye(d, dtype=torch.float64) + sum(w.T @ w for w in W)
    B = sum(w.T @ w0 for w, w0 in zip(W, W0))
    assert rel(cp @ A.T, c @ B.T) < 1e-10
    # and the shared-transform identities the fast path relies on
    G0 = cf.weight_gram(W0)
    assert rel(M.T @ G0 @ M, cf.weight_gram(W)) < 1e-10
    assert rel(M.T @ G0, cf.cross_gram(W, W0)) < 1e-10
    # with r -> 0 the derived embedding reproduces the original keys/values exactly (M invertible)
    exact = cf.derive_against(c, W, W0, 1e-12)
    assert cf.relative_residual(W, W0, exact, c) < 1e-6
    # standard regularisation pulls towards the anchor
    anchor = rand(4, d, seed=8)
    cs = cf.derive_against(c, W, W0, 1e5, anchor_rows=anchor)
    assert rel(cs, anchor) < 0.05


def test_uce_token_rows_align_concept_and_target():
    emb = rand(77, 8, seed=1)
    tgt = rand(77, 8, seed=2)
    c, t = cf.uce_token_rows(emb, 5, tgt, 2)  # concept of 3 tokens, target " " (BOS + EOS)
    assert c.shape == t.shape == (74, 8)
    assert torch.equal(c[0], emb[3]) and torch.equal(t[0], tgt[0])
    c, t = cf.uce_token_rows(emb, 3, tgt, 6)  # target longer than concept
    assert c.shape == t.shape == (73, 8)
    assert torch.equal(c[0], emb[1]) and torch.equal(t[0], tgt[4]) and torch.equal(c[-1], emb[73])


def test_ill_conditioned_system_names_the_parameter():
    C = rand(2, 10, seed=1)
    with pytest.raises(ReceError, match="raise --uce-lamb"):
        cf.shared_edit_transform(C, C, torch.zeros(0, 10, dtype=torch.float64), 0.0, 1.0, 0.1, "--uce-lamb")
    with pytest.raises(ReceError, match="raise --regularization"):
        cf.derive_embedding(C, torch.zeros(10, 10, dtype=torch.float64), torch.eye(10, dtype=torch.float64), 0.0)


@pytest.mark.parametrize("n", [3, 12, 20])
def test_ridge_solve_equals_the_dense_solve(n):
    """(λI + UᵀU)⁻¹ rhs: the n×n Woodbury form (n < d) and the d×d solve (n ≥ d) give the dense answer."""
    rows, rhs = rand(n, 12, seed=n) * 5, rand(12, 4, seed=99)
    dense = torch.linalg.solve(0.1 * torch.eye(12, dtype=torch.float64) + rows.T @ rows, rhs)
    got = cf.solve_ridge(0.1, rows, rhs, "--lamb")
    assert (got - dense).norm() <= 1e-10 * dense.norm()


def test_ridge_solve_counts_the_directions_outside_the_rows():
    """With n < d the system also has eigenvalue λ: a tiny λ is refused even though λI + UUᵀ is well conditioned."""
    rows = torch.eye(3, 12, dtype=torch.float64) * 1e4
    cf.solve_ridge(1e-3, rows, rand(12, 1, seed=0), "--lamb")  # cond 1e11: fine
    with pytest.raises(ReceError, match=r"condition number 1e\+14.*raise --lamb"):
        cf.solve_ridge(1e-6, rows, rand(12, 1, seed=0), "--lamb")
    with pytest.raises(ReceError, match="raise --lamb"):
        cf.solve_ridge(0.0, rows, rand(12, 1, seed=0), "--lamb")


def test_concept_subspace_finds_the_mean_difference_direction():
    torch.manual_seed(0)
    d, direction = 16, torch.nn.functional.normalize(torch.randn(16, dtype=torch.float64), dim=0)
    contrast = torch.randn(5, 7, d, dtype=torch.float64)
    concept = contrast.mean(0) + 4.0 * direction + 0.05 * torch.randn(3, 7, d, dtype=torch.float64)  # shifted along one
    vectors, energies = pj.concept_subspace(concept, contrast)
    assert abs(float(vectors[:, 0] @ direction)) > 0.95
    assert energies[0] > 100 * energies[1]
    assert pj.rank_for_energy(energies, 0.5) == 1 and pj.rank_for_energy(torch.zeros(4, dtype=torch.float64), 0.9) == 0


def test_projections_remove_the_concept_directions():
    torch.manual_seed(1)
    d = 12
    directions = torch.linalg.qr(torch.randn(d, 2, dtype=torch.float64))[0]
    preserve = torch.randn(40, d, dtype=torch.float64)
    metric = pj.projection_metric(preserve)
    oblique = pj.oblique_projection(directions, metric)
    assert torch.allclose(oblique @ directions, torch.zeros(d, 2, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(oblique @ oblique, oblique, atol=1e-10)  # a projection
    orthogonal = pj.orthogonal_projection(directions)
    assert torch.allclose(directions.T @ orthogonal, torch.zeros(2, d, dtype=torch.float64), atol=1e-10)  # range ⊥ U
    # among projections that remove U, the oblique one disturbs the preserved rows least (in their own metric)
    moved = lambda m: ((preserve @ m.T - preserve) ** 2).sum()  # noqa: E731
    assert moved(oblique) <= moved(orthogonal) + 1e-9
    assert torch.equal(pj.oblique_projection(directions[:, :0], metric), torch.eye(d, dtype=torch.float64))


def test_key_value_projection_shuts_the_concept_out_of_every_output():
    torch.manual_seed(2)
    d = 10
    weights = [torch.randn(o, d, dtype=torch.float64) for o in (6, 8, 12)]
    gram = cf.weight_gram(weights)
    concept = torch.randn(30, d, dtype=torch.float64) + 3.0 * torch.nn.functional.one_hot(torch.tensor(0), d).double()
    preserve = torch.randn(50, d, dtype=torch.float64)
    directions, values = pj.key_value_concept_directions(concept, preserve, gram, tradeoff=1.0)
    assert values[0] >= values[1]
    m = pj.key_value_projection(directions[:, :1], gram)
    stacked = torch.cat(weights)
    outputs_dir = stacked @ directions[:, :1]
    anything = torch.randn(d, 7, dtype=torch.float64)
    assert torch.allclose(outputs_dir.T @ (stacked @ m @ anything), torch.zeros(1, 7, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(m @ m, m, atol=1e-9)


@pytest.mark.parametrize("ranks", [(3, 4), (5, 9)])  # (5, 9): wider than d = 12 after composing, so it is compacted
def test_low_rank_products_match_the_dense_ones(ranks):
    g = torch.Generator().manual_seed(0)
    d = 12
    w0 = [torch.randn(7, d, generator=g, dtype=torch.float64) for _ in range(3)]
    gram0 = cf.weight_gram(w0)
    (l1, r1), (l2, r2) = [
        (0.3 * torch.randn(d, k, generator=g, dtype=torch.float64), torch.randn(d, k, generator=g, dtype=torch.float64))
        for k in ranks
    ]
    left, right = cf.compose_low_rank(l1, r1, l2, r2)
    dense = cf.identity_plus(l1, r1) @ cf.identity_plus(l2, r2)
    assert torch.allclose(cf.identity_plus(left, right), dense, atol=1e-12) and left.shape[1] <= d
    edited = [w @ dense for w in w0]
    concept = torch.randn(d, 5, generator=g, dtype=torch.float64)
    # kept current update by update, as the erasure does, and in one go (the dense branch: 9 + 5 columns > d)
    step_gram = cf.transformed_gram(cf.transformed_gram(gram0, l1, r1), l2, r2)
    step_products = cf.transpose_times(l2, r2, cf.transpose_times(l1, r1, gram0 @ concept))
    for gram in (step_gram, cf.transformed_gram(gram0, left, right)):
        assert torch.allclose(gram, cf.weight_gram(edited), atol=1e-10)
    assert torch.allclose(step_products, cf.cross_gram(edited, w0) @ concept, atol=1e-10)
    for w, w_edit in zip(w0, edited):
        assert torch.allclose(cf.low_rank_delta(w, left, right), w_edit - w, atol=1e-10)
        assert torch.allclose(cf.low_rank_delta(w, l1[:, :1], r1[:, :1]), w @ cf.identity_plus(l1[:, :1], r1[:, :1]) - w)
    wide = torch.randn(30, d, generator=g, dtype=torch.float64)  # (5, 9): T − I is formed first
    assert torch.allclose(cf.low_rank_delta(wide, left, right), wide @ dense - wide, atol=1e-10)


def test_ridge_solve_is_the_dense_solve_and_refuses_a_singular_system():
    rows = rand(6, 10, seed=3)
    gram, rhs = rows.T @ rows, rand(10, 4, seed=4)
    dense = torch.linalg.solve(0.05 * torch.eye(10, dtype=torch.float64) + gram, rhs)
    assert (cf.ridge_solve(gram, rhs, 0.05) - dense).norm() <= 1e-10 * dense.norm()
    with pytest.raises(ReceError, match="raise --regularization"):
        cf.ridge_solve(gram, rhs, 0.0)


@pytest.mark.parametrize("rows", [5, 30])  # fewer erased rows than d = 12, and more
def test_dense_accumulated_update_equals_the_closed_form(rows):
    """M − I accumulated a chunk of pairs at a time (as for 1,000 concepts) equals the one-shot transform."""
    pairs = [(rand(k, 12, seed=k), rand(k, 12, seed=100 + k)) for k in (rows, 3, 4)]
    preserve = rand(6, 12, seed=7)
    erase, target = torch.cat([c for c, _ in pairs]), torch.cat([t for _, t in pairs])
    expected = cf.shared_edit_transform(erase, target, preserve, 0.1, 1.0, 0.1) - torch.eye(12, dtype=torch.float64)
    for chunk in (1, 8, 10**6):
        got = cf.accumulated_edit_delta(pairs, preserve, 0.1, 1.0, 0.1, chunk_rows=chunk)
        assert (got - expected).norm() <= 1e-10 * expected.norm()


@pytest.mark.parametrize("rows", [(2, 3), (9, 8)])  # concept rows fewer than d = 12 (columns kept), and more (cross)
def test_edited_grams_derive_like_the_dense_grams(rows):
    g = torch.Generator().manual_seed(3)
    w0 = [torch.randn(7, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    left, right = 0.3 * torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(12, 4, generator=g, dtype=torch.float64)
    step = (0.2 * torch.randn(12, 2, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g, dtype=torch.float64))
    concepts = [rand(k, 12, seed=k) for k in rows]
    anchor = rand(9, 12, seed=50)
    grams = cf.EditedGrams(cf.weight_gram(w0), concepts, left, right)
    assert grams.by_columns == (sum(rows) < 12)
    grams.update(*step)
    transform = cf.identity_plus(left, right) @ cf.identity_plus(*step)
    edited = [w @ transform for w in w0]
    for a in (None, anchor):
        for chunk in (1, 10**6):
            got = grams.derive(0.05, a, chunk_rows=chunk)
            for c, d in zip(concepts, got):
                want = cf.derive_against(c, edited, w0, 0.05, None if a is None else a[: c.shape[0]])
                assert (d - want).norm() <= 1e-9 * want.norm()
