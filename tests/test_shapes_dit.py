"""shapes-dit, the shipped cross-attention DiT shapes model: a standard PixArt-Σ pipeline with a masked T5 encoder,
drawing the asked shape and colour, accepted by the commands that take MODEL and by `rece demo --model shapes-dit`."""

import json

import pytest
import torch

import rece
from rece.models import load_model
from rece.sources import named_model_path
from rece.toy import door
from rece.toy.evaluate import accuracy, generate, grid_prompts
from rece.toy.world import concept_prompts

NAME = door.DIT


@pytest.fixture(scope="module")
def pipe():
    from diffusers import PixArtSigmaPipeline

    return PixArtSigmaPipeline.from_pretrained(named_model_path(NAME))


def test_shipped_model_is_a_small_standard_pixart_sigma_pipeline():
    folder = named_model_path(NAME)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20 * 2**20
    assert json.loads((folder / "training.json").read_text())["arch"] == "dit"
    assert door.shapes_model_name(NAME) == NAME and door.shapes_model_name(str(folder)) == NAME
    base = load_model(NAME)
    assert base.family.name == "pixart-sigma" and base.family.masks_padding and base.source == NAME
    assert all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in base.kv) and len(base.kv) == 12


def test_it_draws_the_asked_shape_and_colour(pipe):
    prompts, seeds, shapes, colors = grid_prompts(1)  # 16 prompts, one image each, at the models' 25 steps
    acc = accuracy(generate(pipe, prompts, seeds, door.STEPS), shapes, colors)
    assert acc["color"] >= 0.95 and acc["shape"] >= 0.9


def test_its_recipe_maps_a_shape_to_another_shape(pipe):
    """ " " draws triangles and circles on this model, so a shape's target is another shape, as on shapes-mmdit."""
    assert door.erasure_arguments("triangle", NAME)["target"] == "a circle"
    assert door.erasure_arguments("circle", NAME)["target"] == "a square"
    assert door.erasure_arguments("red", NAME)["target"] == "a shape"
    assert door.erasure_arguments("red", NAME, "robust")["targets"] == door.kept_attribute_targets("red")


def test_demo_on_shapes_dit(tmp_path):
    from rece.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--model", NAME, "--per-combo", "1", "--steps", "12"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == NAME and metrics["target"] == "a circle"  # the DiT's recipe
    assert metrics["before"]["erased_rate"] >= 0.75 and metrics["after"]["erased_rate"] <= 0.25
    assert metrics["after"]["color_accuracy"] >= 0.9
    assert (out / "grid.png").is_file() and "data:image/png;base64" in (out / "report.html").read_text()
    edit = rece.load_edit(out / "edit.safetensors")
    assert edit.concepts == concept_prompts("triangle") and set(edit.layers) == set(load_model(NAME).kv)
    assert not torch.equal(edit.edited_kv(load_model(NAME).kv)[edit.layers[0]], load_model(NAME).kv[edit.layers[0]])


def test_robustness_matrix_runs_on_shapes_dit(tmp_path):
    """`rece robustness` takes shapes-dit by name and runs the closed-form attacks on it (the gradient attacks run on
    PixArt-Σ in their own tests); the edit erases what the unedited model draws."""
    from rece.cli import main

    out = tmp_path / "matrix"
    argv = ["robustness", NAME, "--concept", "triangle", "--methods", "rece", "--attacks", "derived", "derived-from-uce"]
    assert main([*argv, "--images", "1", "--steps", "8", "-o", str(out)]) == 0
    rows = [line.split(",") for line in (out / "robustness.csv").read_text().splitlines()[1:]]
    cells = {(r[2], r[3]): (float(r[4]), int(r[5])) for r in rows}
    assert {r[0] for r in rows} == {NAME}
    assert {("rece", "attack:derived"), ("rece", "attack:derived-from-uce"), ("none", "named")} <= set(cells)
    assert cells["none", "named"][0] >= 75 and cells["rece", "named"][0] <= 25  # drawn before, erased after
    assert all(0 <= value <= 100 and images > 0 for (_, measure), (value, images) in cells.items() if "attack" in measure)


def test_uce_rows_add_a_colours_own_word_and_leave_a_shapes_edit_as_it_was():
    """--uce-rows unshared adds the rows before UCE's slice that no preserved prompt shares: "red" in "a red circle"
    (its preserved prompts are the other colours'), nothing for a shape (its colour words are preserved prompts' too)."""
    base = load_model(NAME)
    name = next(iter(base.kv))
    for concept, changes in (("triangle", False), ("red", True)):
        recipe = door.erasure_arguments(concept, NAME)
        kv = [rece.erase(base, **recipe, uce_rows=rows, method="uce").edited_kv(base.kv)[name] for rows in ("last", "unshared")]
        assert torch.equal(kv[0], kv[1]) is not changes, concept
