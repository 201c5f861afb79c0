"""The shapes world and the shipped shapes model: detector accuracy, prompt following, erasure efficacy, demo.

Bars are the issue's, asserted with margin on a small batch (fewer steps and images than bench/shapes_quality.py).
"""

import json

import numpy as np
import pytest
import torch

import rece
from rece import closed_form as cf
from rece.demo import _load_pipeline
from rece.models import from_pipeline, load_model
from rece.sources import named_model_path
from rece.toy.detector import detect
from rece.toy.door import erasure_arguments
from rece.toy.evaluate import accuracy, erasure_metrics, generate, grid_prompts
from rece.toy.world import COLORS, SHAPES, Scene, caption, concept_prompts, random_scenes, render

STEPS = 15


def test_world_is_deterministic_and_varied():
    a = render(random_scenes(50, np.random.default_rng(3)))
    b = render(random_scenes(50, np.random.default_rng(3)))
    c = render(random_scenes(50, np.random.default_rng(4)))
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    rng = np.random.default_rng(0)
    texts = {caption(Scene("triangle", "red", 16, 16, 8), rng) for _ in range(200)}
    assert "a red triangle" in texts and "a triangle" in texts and "a red shape" in texts


def test_detector_accuracy_on_rendered_ground_truth():
    scenes = random_scenes(1200, np.random.default_rng(11))
    images = render(scenes)
    noisy = np.clip(images.astype(np.int16) + np.random.default_rng(0).integers(-20, 21, images.shape), 0, 255).astype(np.uint8)
    for batch in (images, noisy):
        dets = [detect(img) for img in batch]
        assert np.mean([d.shape == s.shape for d, s in zip(dets, scenes)]) >= 0.99
        assert np.mean([d.color == s.color for d, s in zip(dets, scenes)]) >= 0.99
    assert detect(np.full((32, 32, 3), 245, np.uint8)).shape is None  # nothing drawn


@pytest.fixture(scope="module")
def pipe():
    return _load_pipeline("shapes")


@pytest.fixture(scope="module")
def grid():
    return grid_prompts(2)


@pytest.fixture(scope="module")
def baseline(pipe, grid):
    prompts, seeds, _, _ = grid
    return generate(pipe, prompts, seeds, STEPS)


def test_shapes_model_is_a_standard_pipeline():
    folder = named_model_path("shapes")
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert size <= 20 * 2**20
    base = load_model("shapes")
    assert base.dim >= 128 and len(base.kv) >= 8 and base.source == "shapes"


def test_prompt_following(baseline, grid):
    _, _, shapes, colors = grid
    acc = accuracy(baseline, shapes, colors)
    assert acc["color"] >= 0.9
    assert acc["shape"] >= 0.8
    assert min(acc["per_shape"].values()) >= 0.6


# (concept, method). The bars: erased <= 5 %, other shapes >= 90 % of baseline, colours >= 95 %;
# asserted with a margin of one image out of the 8 that name the concept (erased <= 0.13), others >= 0.8 of
# baseline, colours >= 0.9. The recipe (rece.toy.evaluate.erasure_arguments) erases the concept's short prompt
# family and preserves the other concepts' families; bench/shapes_quality.py measures it on held-out templates too.
ERASURES = [("triangle", "uce"), ("triangle", "rece"), ("cross", "rece"), ("red", "uce"), ("red", "rece")]


@pytest.mark.parametrize("concept, method", ERASURES, ids=[f"{c}-{m}" for c, m in ERASURES])
def test_erasure_removes_concept_and_keeps_the_rest(pipe, grid, baseline, concept, method):
    prompts, seeds, shapes, colors = grid
    before = erasure_metrics(baseline, shapes, colors, concept)
    edit = rece.erase(pipe, method=method, **erasure_arguments(concept))
    edit.apply(pipe)
    try:
        after = erasure_metrics(generate(pipe, prompts, seeds, STEPS), shapes, colors, concept)
    finally:
        edit.revert(pipe)
    assert before["erased_rate"] >= 0.85
    assert after["erased_rate"] <= 0.13
    assert after["other_shape_accuracy"] >= 0.8 * before["other_shape_accuracy"]
    assert after["color_accuracy"] >= 0.9


def test_the_word_alone_is_not_enough_on_this_model(pipe, grid, baseline):
    """Why the recipe names the prompt family: erasing only 'cross' (paper defaults) leaves 'a red cross' drawn."""
    prompts, seeds, shapes, colors = grid
    edit = rece.erase(pipe, ["cross"], method="uce")
    edit.apply(pipe)
    try:
        after = erasure_metrics(generate(pipe, prompts, seeds, STEPS), shapes, colors, "cross")
    finally:
        edit.revert(pipe)
    assert after["erased_rate"] >= 0.3


def test_derived_embedding_brings_concept_back_after_uce_not_after_rece(pipe):
    base = from_pipeline(pipe, "shapes")
    settings = erasure_arguments("triangle")
    uce = rece.erase(base, method="uce", **settings)
    rece_edit = rece.erase(base, method="rece", **settings)
    derived = rece_edit.derived[0][0].float()  # c′ of the word "triangle", derived against the UCE model
    seeds = list(range(12))

    def shown(edit):
        edit.apply(pipe)
        try:
            images = generate(pipe, seeds=seeds, prompt_embeds=derived.expand(len(seeds), -1, -1), steps=STEPS)
        finally:
            edit.revert(pipe)
        return np.mean([detect(img).shape == "triangle" for img in images])

    after_uce, after_rece = shown(uce), shown(rece_edit)
    assert after_uce >= 0.5
    assert after_rece <= after_uce - 0.3


def test_demo_end_to_end(tmp_path, capsys):
    from rece.cli import main

    out = tmp_path / "runs" / "demo"  # missing parents are created
    assert main(["demo", "-o", str(out), "--per-combo", "1", "--steps", "8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["concept"] == "triangle" and metrics["method"] == "rece"
    for stage in ("before", "after"):
        assert set(metrics[stage]) >= {"erased_rate", "other_shape_accuracy", "color_accuracy"}
        assert all(0 <= metrics[stage][k] <= 1 for k in ("erased_rate", "other_shape_accuracy", "color_accuracy"))
    assert metrics["after"]["erased_rate"] < metrics["before"]["erased_rate"]
    from PIL import Image

    grid_image = Image.open(out / "grid.png")
    assert grid_image.width > 2 * len(COLORS) * 32 and grid_image.height > len(SHAPES) * 32
    assert "data:image/png;base64" in (out / "report.html").read_text()
    assert rece.load_edit(out / "edit.safetensors").concepts == concept_prompts("triangle")
    assert metrics["after"]["erased_rate"] <= 0.25 and metrics["after"]["color_accuracy"] >= 0.9
    assert 0 <= metrics["after"]["erased_colours"] <= 1 and metrics["after"]["erased_images"] == len(COLORS)
    printed = capsys.readouterr().out
    assert "erased_rate" in printed and "erased_colours" in printed and str(out / "edit.safetensors") in printed
    page = (out / "report.html").read_text()
    assert "<td>erased_colours</td>" in page and "the 4 images of prompts naming triangle" in page
    assert "the 12 images of the other prompts: share showing the colour their prompt names" in page
    assert "the 18 prompts of the other shapes are preserved, and '' (the empty prompt" in page
    assert "<code>edit.safetensors</code>" in page
    assert "\ntarget        &#x27; &#x27;\npreserve      18 texts and &#x27;&#x27;" in page  # preserve on its own line


def test_erased_prompts_colours_are_a_figure_of_their_own():
    # `rece demo --method robust` drew "a blue triangle" as a red cross while color_accuracy (the other prompts
    # only) read 1.000: erased_colours counts the erased prompts' images
    shapes = ["triangle"] * 4 + ["circle"] * 4
    colors = list(COLORS) * 2
    drawn = [("square", "red"), ("square", "green"), ("cross", "red"), ("square", "yellow")]  # "a blue triangle": red
    drawn += [("circle", c) for c in COLORS]
    images = render([Scene(shape, color, 16.0, 16.0, 9.0) for shape, color in drawn])
    m = erasure_metrics(images, shapes, colors, "triangle")
    assert m["erased_rate"] == 0 and m["color_accuracy"] == 1 and m["other_shape_accuracy"] == 1
    assert m["erased_colours"] == 0.75 and m["erased_images"] == 4 and m["other_images"] == 4
    colour = erasure_metrics(images, shapes, colors, "red")  # a colour erased: the erased prompts' shapes
    assert "erased_colours" not in colour and colour["erased_shapes"] == 0.5 and colour["erased_images"] == 2


def test_demo_rejects_unknown_concept(tmp_path, capsys):
    from rece.cli import main

    assert main(["demo", "-o", str(tmp_path / "d"), "--concept", "hexagon"]) == 2
    err = capsys.readouterr().err
    assert "not in the shapes world" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_generation_is_per_image_deterministic(pipe):
    a = generate(pipe, ["a red circle", "a blue cross"], [1, 2], steps=4, batch_size=1)
    b = generate(pipe, ["a red circle", "a blue cross"], [1, 2], steps=4, batch_size=2)
    assert np.array_equal(a, b)
    torch.manual_seed(0)


def test_concept_prompt_families():
    assert concept_prompts("triangle") == ["triangle", "a triangle"] + [f"a {c} triangle" for c in COLORS]
    assert "a red cross" in concept_prompts("red") and "a red shape" in concept_prompts("red")
    others = erasure_arguments("red")["preserve"]
    assert "a blue circle" in others and not any("red" in p for p in others)
    assert erasure_arguments("red")["target"] == "a shape" and erasure_arguments("cross")["target"] == " "
    with pytest.raises(ValueError, match="neither a shape"):
        concept_prompts("hexagon")


@pytest.mark.parametrize("concept", ["triangle", "red"])
def test_robust_mode_erases_and_a_fresh_derived_embedding_does_not_bring_it_back(pipe, grid, baseline, concept):
    """Robust mode on the recipe: bars asserted with margin. A colour-free embedding draws red about a quarter of
    the time on this model (it picks a random colour), so for red a fresh c′ is held to that floor, not to 0."""
    prompts, seeds, shapes, colors = grid
    base = from_pipeline(pipe, "shapes")
    edit = rece.erase(base, method="robust", **erasure_arguments(concept))
    before = erasure_metrics(baseline, shapes, colors, concept)
    edit.apply(pipe)
    try:
        after = erasure_metrics(generate(pipe, prompts, seeds, STEPS), shapes, colors, concept)
        kv = {n: w.to(torch.float64) for n, w in base.kv.items()}
        edited = [edit.edited_weight(n, w) for n, w in kv.items()]
        fresh = cf.derive_against(base.encoder.encode([concept])[0], edited, kv.values(), 0.1).float()
        probe = generate(pipe, seeds=list(range(8)), prompt_embeds=fresh.expand(8, -1, -1), steps=STEPS)
    finally:
        edit.revert(pipe)
    assert after["erased_rate"] <= 0.13
    assert after["other_shape_accuracy"] >= 0.8 * before["other_shape_accuracy"] and after["color_accuracy"] >= 0.9
    shown = [detect(img).shape == concept or detect(img).color == concept for img in probe]
    assert np.mean(shown) <= (0.25 if concept == "triangle" else 0.5)
    assert edit.metadata["robust"]["fresh_residual"]["r=0.1"] >= 0.3
