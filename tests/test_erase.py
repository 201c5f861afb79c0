"""Erasure orchestration on a tiny pipeline: exact against the plain transcription, and the RECE mechanism."""

import pytest
import torch

import rece
from rece import closed_form as cf
from rece.config import PRESETS, UNSAFE_CONCEPTS, EraseConfig
from rece.erase import template_texts
from rece.errors import ReceError

from .reference import reference_erase


def _encode_fns(base):
    cache = {}

    def encode(text):
        if text not in cache:
            cache[text] = base.encoder.encode([text])[0]
        return cache[text]

    def counts(text):
        return base.encoder.token_counts([text])[0]

    return encode, counts


def _max_rel_error(edit, base, expected):
    worst = 0.0
    for name, w in base.kv.items():
        got = edit.edited_weight(name, w.to(torch.float64)) if name in edit.layers else w.to(torch.float64)
        worst = max(worst, ((got - expected[name]).norm() / expected[name].norm()).item())
    return worst


CASES = [
    dict(concepts=["nudity"], method="uce"),
    dict(concepts=["nudity"], method="rece", epochs=3, regularization=0.1),
    dict(concepts=["van gogh", "picasso"], method="rece", epochs=1, regularization=1e-3, target="art", preserve=["monet"]),
    dict(concepts=["cat", "a red car"], method="rece", epochs=2, regularization=0.1, technique="tensor"),
    dict(concepts=["dog"], method="rece", epochs=2, regularization=0.1, layers=["down_blocks"]),
    dict(
        concepts=["dog"],
        method="rece",
        epochs=1,
        regularization=0.5,
        regularization_type="standard",
        regularization_text="a photo",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['method']}-{c.get('technique', 'replace')}-{len(c['concepts'])}")
def test_engine_matches_plain_transcription(base, case):
    edit = rece.erase(base, **case)
    encode, counts = _encode_fns(base)
    edited = None
    if "layers" in case:
        edited = [n for n in base.kv if "down_blocks" in n]
        assert edit.kind == "layers" and sorted(edit.layers) == sorted(edited)
    expected = reference_erase(
        base.kv,
        encode,
        counts,
        case["concepts"],
        target=case.get("target", " "),
        preserve=case.get("preserve", ()),
        method=case["method"],
        epochs=case.get("epochs", 1),
        r=case.get("regularization", 0.1),
        technique=case.get("technique", "replace"),
        edited=edited,
        standard_text=case.get("regularization_text") if case.get("regularization_type") == "standard" else None,
    )
    assert _max_rel_error(edit, base, expected) <= 1e-5


def test_fast_and_per_layer_paths_agree(base):
    from rece.erase import _run_per_layer, _run_shared, _Texts

    config = EraseConfig.create(["nudity"], "nudity")
    texts = _Texts.encode(base, config.concepts + [" ", ""])
    factors, fast_derived = _run_shared(base, config, texts, list(base.kv))
    transform = cf.identity_plus(*factors)
    deltas, slow_derived = _run_per_layer(base, config, texts, list(base.kv))
    for name, w in base.kv.items():
        a, b = w.double() @ transform, w.double() + deltas[name]
        assert ((a - b).norm() / b.norm()).item() < 1e-8
    assert len(fast_derived) == len(slow_derived) == 3
    for a, b in zip(fast_derived, slow_derived):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_derived_embedding_reproduces_original_after_uce_but_not_after_rece(base):
    kv = {n: w.double() for n, w in base.kv.items()}
    c = base.encoder.encode(["nudity"])[0]
    uce = rece.erase(base, ["nudity"], method="uce")
    rece_edit = rece.erase(base, ["nudity"], preset="object-hard")  # r = 1e-3, one epoch
    derived = rece_edit.derived[0][0]  # c′ derived against the UCE-edited model

    def residual(edit, rows):
        return cf.relative_residual([edit.edited_weight(n, w) for n, w in kv.items()], list(kv.values()), rows, c)

    after_uce_c, after_uce_cp = residual(uce, c), residual(uce, derived)
    after_rece_cp = residual(rece_edit, derived)
    assert after_uce_c > 0.1  # UCE moved the concept's keys/values
    assert after_uce_cp < 0.5 * after_uce_c  # ... but c′ brings them back
    assert after_rece_cp > 3 * after_uce_cp  # after the RECE step the same c′ no longer does


def test_uce_moves_the_erased_tokens_towards_the_target(base):
    kv = {n: w.double() for n, w in base.kv.items()}
    emb, counts = base.encoder.encode(["nudity", " "]), base.encoder.token_counts(["nudity", " "])
    rows, target_rows = cf.uce_token_rows(emb[0], counts[0], emb[1], counts[1])
    edit = rece.erase(base, ["nudity"], method="uce", uce_lamb=0.01)
    before = cf.relative_residual(list(kv.values()), list(kv.values()), rows, target_rows)
    after = cf.relative_residual([edit.edited_weight(n, w) for n, w in kv.items()], list(kv.values()), rows, target_rows)
    assert after < 0.5 * before


def test_presets_carry_the_paper_settings():
    assert PRESETS["nudity"]["regularization"] == 0.1 and PRESETS["nudity"]["epochs"] == 3
    assert PRESETS["unsafe"]["epochs"] == 2 and len(UNSAFE_CONCEPTS) == 11
    assert PRESETS["art"]["regularization"] == 1e-3 and PRESETS["art"]["target"] == "art"
    assert PRESETS["object-hard"]["regularization"] == 1e-3 and PRESETS["object"]["regularization"] == 0.1
    config = EraseConfig.create(None, "unsafe")
    assert config.concepts == list(UNSAFE_CONCEPTS) and config.epochs == 2 and config.lamb == 0.1 and config.preserve_scale == 0.1
    config = EraseConfig.create(["cat"], "nudity", epochs=1)
    assert config.concepts == ["cat"] and config.epochs == 1 and config.regularization == 0.1
    assert (
        EraseConfig.create(["x"], preserve=["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]).resolved_uce_preserve_scale
        == 0.1
    )
    assert EraseConfig.create(["x"], preserve=["a"]).resolved_uce_preserve_scale == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(concepts=[]), "no concept"),
        (dict(concepts=["  "]), "concept is empty"),
        (dict(concepts=None, preset="art"), "preset 'art' has no default concept"),
        (dict(concepts=["x"], preset="nope"), "unknown preset 'nope'"),
        (dict(concepts=["x"], lamb=-1.0), "lamb must be >= 0"),
        (dict(concepts=["x"], regularization=-0.1), "regularization must be >= 0"),
        (dict(concepts=["x"], uce_erase_scale=float("inf")), "finite"),
        (dict(concepts=["x"], preserve_scale=float("nan")), "finite"),
        (dict(concepts=["x"], epochs=-1), "epochs must be"),
        (dict(concepts=["x"], method="sgd"), "unknown method"),
        (dict(concepts=["x"], technique="foo"), "unknown technique"),
    ],
)
def test_bad_parameters_are_one_line_errors(kwargs, message):
    with pytest.raises(ReceError, match=message) as info:
        EraseConfig.create(kwargs.pop("concepts"), kwargs.pop("preset", None), **kwargs)
    assert "\n" not in str(info.value)


def test_ill_conditioned_and_truncated(base):
    with pytest.raises(ReceError, match="raise --uce-lamb"):
        rece.erase(base, ["cat"], uce_lamb=0.0, preserve_empty=False)  # Σ c cᵀ alone is singular
    long = " ".join(["cat"] * 100)
    with pytest.warns(UserWarning, match="truncated to 77"):
        rece.erase(base, [long], method="uce")


def test_zero_epochs_is_uce(base):
    a = rece.erase(base, ["cat"], method="rece", epochs=0)
    b = rece.erase(base, ["cat"], method="uce")
    assert torch.allclose(a.transform, b.transform) and a.derived == []


def test_robust_method_is_one_singular_transform_with_a_report(base, tmp_path):
    """Robust mode: one d×d transform that removes `rank` directions."""
    edit = rece.erase(base, ["cat"], method="robust", preserve=["dog", "bird"], rank=2, support=1.0)
    report = edit.metadata["robust"]
    assert edit.kind == "transform" and report["rank"] == 2 and report["unused_removed"] == 0
    assert set(report["fresh_residual"]) == {"r=0.1", "r=0.001", "best"}
    assert all(v >= 0 for v in report["fresh_residual"].values())
    assert int(torch.linalg.matrix_rank(edit.transform).item()) == base.dim - 2  # singular: not undone by any embedding
    # by default the directions the preserved texts do not use go too: the edited model hears what they need
    narrow = rece.erase(base, ["cat"], method="robust", preserve=["dog", "bird"], rank=2)
    unused = narrow.metadata["robust"]["unused_removed"]
    assert 0 < unused < base.dim - 2
    assert int(torch.linalg.matrix_rank(narrow.transform).item()) == base.dim - 2 - unused
    edit.save(tmp_path / "robust.safetensors")
    loaded = rece.load_edit(tmp_path / "robust.safetensors")
    assert loaded.metadata["robust"] == report and "robust        rank 2" in loaded.summary()
    assert torch.allclose(loaded.transform, edit.transform, atol=1e-6)
    with pytest.raises(ReceError, match="one shared transform"):
        rece.erase(base, ["cat"], method="robust", technique="tensor")
    with pytest.raises(ReceError, match="rank must be"):
        rece.erase(base, ["cat"], method="robust", rank=-1)


def _best_reachable_residual(base, transform, concept: str, blank: str | None = None) -> float:
    """min over every embedding x of ‖W⁰·M·x − W⁰·c‖ / ‖W⁰·c‖ (of c − blank with a blank text), all K/V layers
    stacked (least squares)."""
    w0 = torch.cat([w.to(torch.float64) for w in base.kv.values()])
    c = base.encoder.encode([concept])[0].T  # d × 77
    wanted = w0 @ c
    reached = w0 @ transform.to(torch.float64)
    if blank is not None:  # what tells the concept from the blank prompt
        wanted = wanted - w0 @ base.encoder.encode([blank])[0].T
    x = torch.linalg.lstsq(reached, wanted).solution
    return float(torch.linalg.norm(reached @ x - wanted) / torch.linalg.norm(wanted))


def test_no_embedding_brings_back_what_robust_mode_removed(base):
    """UCE/RECE edits are invertible: some embedding gives back the concept's original keys/values exactly. After
    robust mode none does, whatever the embedding (not only the closed-form c′)."""
    for method in ("uce", "rece"):
        edit = rece.erase(base, ["cat"], method=method)
        assert _best_reachable_residual(base, edit.transform, "cat") < 1e-6
    robust = rece.erase(base, ["cat"], method="robust", preserve=["dog", "bird"])
    best = _best_reachable_residual(base, robust.transform, "cat")
    assert best > 0.05
    assert robust.metadata["robust"]["fresh_residual"]["r=0.001"] >= best - 1e-6  # c′ cannot beat the best embedding
    # what `info` shows: the same distance, relative to what tells "cat" from the blank prompt " "
    assert robust.metadata["robust"]["fresh_residual"]["best"] == pytest.approx(
        _best_reachable_residual(base, robust.transform, "cat", " "), rel=1e-3
    )


def test_robust_templates_and_map_to_target(base):
    in_context, contexts = template_texts(["cat"])
    assert in_context[0] == "a photo of cat" and contexts[0] == "a photo of" and len(in_context) == len(contexts) >= 4
    with_templates = rece.erase(base, ["cat"], method="robust", preserve=["dog"], rank=1)
    without = rece.erase(base, ["cat"], method="robust", preserve=["dog"], rank=1, templates=False)
    assert with_templates.metadata["config"]["templates"] and not without.metadata["config"]["templates"]
    assert not torch.allclose(with_templates.transform, without.transform)
    # without the map to the target, the transform is the projection alone: applying it twice changes nothing more
    projection = rece.erase(base, ["cat"], method="robust", preserve=["dog"], rank=1, map_to_target=False).transform
    assert torch.allclose(projection @ projection, projection, atol=1e-8)
    assert not torch.allclose(with_templates.transform @ with_templates.transform, with_templates.transform, atol=1e-4)


def test_adversarial_rounds_remove_what_a_fresh_c_prime_reaches(base):
    """Each round derives c′ against the edit so far and removes the directions it still reaches: the best embedding
    stays at least as far from the concept, and the report names each round's rank."""
    once = rece.erase(base, ["cat"], method="robust", preserve=["dog", "bird"], support=1.0)
    twice = rece.erase(base, ["cat"], method="robust", preserve=["dog", "bird"], support=1.0, adversarial_rounds=2)
    ranks = twice.metadata["robust"]["adversarial_ranks"]
    assert len(ranks) == 2 and all(r >= 1 for r in ranks) and "adversarial_ranks" not in once.metadata["robust"]
    removed = int(torch.linalg.matrix_rank(twice.transform).item())
    assert removed < int(torch.linalg.matrix_rank(once.transform).item())
    assert twice.metadata["robust"]["fresh_residual"]["best"] >= once.metadata["robust"]["fresh_residual"]["best"] - 1e-9
    assert "2 adversarial rounds" in twice.summary() and "trade-off     best embedding residual" in twice.summary()
    with pytest.raises(ReceError, match="adversarial rounds must be"):
        rece.erase(base, ["cat"], method="robust", adversarial_rounds=-1)
    with pytest.raises(ReceError, match="support must be in"):
        rece.erase(base, ["cat"], method="robust", support=0.0)


def test_each_concept_maps_to_its_own_target(base):
    """--concept-target: UCE sends each concept's keys/values towards its own target, not a shared one."""
    edit = rece.erase(base, ["cat", "dog"], method="uce", targets=["bird", "tree"], preserve_empty=False)
    shared = rece.erase(base, ["cat", "dog"], method="uce", target="bird", preserve_empty=False)
    w = torch.cat([t.to(torch.float64) for t in base.kv.values()])
    rows = {t: base.encoder.encode([t])[0][1].to(torch.float64) for t in ("dog", "tree", "bird")}  # first word row
    after = w @ edit.transform.to(torch.float64) @ rows["dog"]
    after_shared = w @ shared.transform.to(torch.float64) @ rows["dog"]
    # 'dog' lands nearer 'tree' than with the shared target 'bird', and nearer 'tree' than 'bird'
    assert torch.linalg.norm(after - w @ rows["tree"]) < torch.linalg.norm(after_shared - w @ rows["tree"])
    assert torch.linalg.norm(after - w @ rows["tree"]) < torch.linalg.norm(after - w @ rows["bird"])
    assert "'dog' → 'tree'" in edit.summary()
    rece_edit = rece.erase(base, ["cat", "dog"], targets=["bird", "tree"])  # RECE's c′ go to their own targets too
    assert rece_edit.metadata["config"]["targets"] == ["bird", "tree"]
    with pytest.raises(ReceError, match="1 --concept-target for 2 concepts"):
        rece.erase(base, ["cat", "dog"], targets=["bird"])
    with pytest.raises(ReceError, match="also its --concept-target"):
        rece.erase(base, ["cat", "dog"], targets=["bird", "dog"])
    with pytest.warns(UserWarning, match="repeated concept"):
        repeated = rece.erase(base, ["cat", "dog", "cat"], method="uce", targets=["bird", "tree", "sky"])
    assert repeated.metadata["config"]["targets"] == ["bird", "tree"]  # a repeat keeps its first target
