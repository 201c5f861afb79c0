"""Robust mode's linear algebra (`rece.projections`) on small random problems."""

import torch

from rece import closed_form as cf
from rece import projections as pj


def _problem(seed: int = 0, d: int = 12):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, d, generator=g, dtype=torch.float64) for o in (5, 9)]
    # preserved rows that use 4 of the d directions, plus a faint trace of the others
    basis = torch.randn(d, 4, generator=g, dtype=torch.float64)
    preserve = torch.randn(60, 4, generator=g, dtype=torch.float64) @ basis.T
    preserve += 1e-4 * torch.randn(60, d, generator=g, dtype=torch.float64)
    return weights, cf.weight_gram(weights), preserve, g


def test_unused_directions_keep_what_the_preserved_texts_use():
    weights, gram, preserve, _ = _problem()
    assert pj.unused_directions(preserve, gram, 1.0).shape == (12, 0)
    unused = pj.unused_directions(preserve, gram, 0.9999)
    assert unused.shape == (12, 8)  # the 4 directions in use stay, the 8 faint ones go
    m = pj.key_value_projection(unused, gram)
    stacked = torch.cat(weights)
    moved = torch.linalg.norm((preserve @ m.T - preserve) @ stacked.T) / torch.linalg.norm(preserve @ stacked.T)
    assert moved < 1e-3  # the preserved texts' keys/values barely change
    assert int(torch.linalg.matrix_rank(m).item()) == 4  # and nothing else reaches the outputs


def test_overlapping_directions_are_removed_once():
    _, gram, _, g = _problem(1)
    u = torch.randn(12, 2, generator=g, dtype=torch.float64)
    repeated = torch.cat([u, u[:, :1] * 3.0, u.sum(dim=1, keepdim=True)], dim=1)  # 4 columns spanning 2 directions
    independent = pj.independent_directions(repeated, gram)
    assert independent.shape == (12, 2)
    assert torch.allclose(independent.T @ gram @ independent, torch.eye(2, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(pj.key_value_projection(repeated, gram), pj.key_value_projection(u, gram), atol=1e-8)


def test_best_residual_is_the_least_squares_distance():
    weights, gram, _, g = _problem(2)
    rows = torch.randn(5, 12, generator=g, dtype=torch.float64)
    eye = torch.eye(12, dtype=torch.float64)
    assert pj.best_residuals(eye, gram, [rows])[0] < 1e-9  # nothing removed: every concept reachable
    u = torch.randn(12, 3, generator=g, dtype=torch.float64)
    m = pj.key_value_projection(u, gram)
    stacked = torch.cat(weights)
    wanted = stacked @ rows.T
    reached = stacked @ m
    solution = torch.linalg.lstsq(reached, wanted).solution
    expected = torch.linalg.norm(reached @ solution - wanted) / torch.linalg.norm(wanted)
    residual, removed = pj.best_residuals(m, gram, [rows, u.T])  # one range for every concept
    assert abs(residual - expected.item()) < 1e-6
    assert removed > 0.999  # the removed directions themselves: nothing of them comes back


def test_directions_no_layer_reads_are_left_alone():
    """G of a layer narrower than the embedding has a null space: the projection works in its range only, so the
    removed directions come out exactly (1e-12, not the 1e-9 a ridge left), and the unused ones exclude the null."""
    g = torch.Generator().manual_seed(3)
    d = 16
    weights = [torch.randn(6, d, generator=g, dtype=torch.float64)]  # rank 6 of 16
    gram = cf.weight_gram(weights)
    preserve = torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, d, generator=g, dtype=torch.float64)
    unused = pj.unused_directions(preserve, gram, 0.9999)
    assert unused.shape == (d, 4)  # 6 directions reach the outputs, the preserved rows use 2 of them
    m = pj.key_value_projection(unused, gram)
    singular = torch.linalg.svdvals(weights[0] @ m)
    assert (singular > 1e-6).sum() == 2 and singular[2:].max() < 1e-12 * singular.max()
