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
