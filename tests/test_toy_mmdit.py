"""shapes-mmdit, the shipped MMDiT shapes model: a standard SD3 pipeline, its training recipe, prompt following,
erasure at `context_embedder` / the pooled projection, and the demo on it.

Bars are the issue's, asserted with margin on a small batch (fewer steps and images than bench/shapes_quality.py).
"""

import json

import numpy as np
import pytest
import torch

import rece
from rece.demo import _load_pipeline
from rece.models import from_pipeline, load_model
from rece.sources import named_model_path
from rece.toy import door, mmdit
from rece.toy.door import erasure_arguments
from rece.toy.evaluate import accuracy, erasure_metrics, generate, grid_prompts
from rece.toy.world import concept_prompts

STEPS = 15
NAME = "shapes-mmdit"


def folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_training_recipe_writes_a_standard_sd3_pipeline_and_resumes(tmp_path):
    """Two steps of `--arch mmdit` write a StableDiffusion3Pipeline that diffusers loads with the T5 slot empty, and the
    rows it was trained on are exactly those the pipeline builds from a prompt."""
    from diffusers import StableDiffusion3Pipeline

    from rece.toy.train import main

    out = tmp_path / "m"
    args = ["-o", str(out), "--arch", "mmdit", "--steps", "2", "--vae-steps", "2", "--batch-size", "2", "--save-every", "1"]
    assert main(args) == 0
    meta = json.loads((out / "training.json").read_text())
    assert meta["arch"] == "mmdit" and meta["steps"] == 2
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.tokenizer.model_max_length == mmdit.CLIP_ROWS
    texts = ["a red triangle", ""]
    with torch.no_grad():
        joint, _, pooled, _ = pipe.encode_prompt(texts, texts, texts, do_classifier_free_guidance=False)
        ours, ours_pooled = mmdit.prompt_embeds(pipe.tokenizer, [pipe.text_encoder, pipe.text_encoder_2], texts)
    assert joint.shape == (2, mmdit.CLIP_ROWS + mmdit.T5_ROWS, sum(mmdit.WIDTHS))
    assert torch.equal(joint, ours) and torch.equal(pooled, ours_pooled)
    # a larger --steps resumes from the saved state rather than starting over
    lines = []
    from rece.toy.train import train

    train(out, steps=3, vae_steps=2, batch_size=2, arch="mmdit", log=lines.append)
    assert "resuming at step 1" in lines  # the state saved after step 1 (not after the last)


def test_training_reads_the_zero_rows_as_one_row_exactly():
    """The T5 slot's 256 zero rows collapsed into one row with log(256) on its logit: the pipeline's function."""
    torch.manual_seed(0)
    transformer = mmdit.make_transformer()
    for p in transformer.parameters():  # adaLN-zero starts at 0: give every path a non-trivial weight
        p.data.normal_(0, 0.2)
    x, pooled, t = torch.randn(2, mmdit.LATENT, 8, 8), torch.randn(2, sum(mmdit.WIDTHS)), torch.tensor([200.0, 900.0])
    text, zero = torch.randn(2, mmdit.CLIP_ROWS, sum(mmdit.WIDTHS)), torch.zeros(2, 1, sum(mmdit.WIDTHS))
    with torch.no_grad():
        full = transformer(x, torch.cat([text, zero.expand(-1, mmdit.T5_ROWS, -1)], 1), pooled, t).sample
        with mmdit.collapsed_zero_rows(transformer):
            collapsed = transformer(x, torch.cat([text, zero], 1), pooled, t).sample
            unbiased = mmdit.CollapsedRowsAttention(1)  # the same rows without the log(256): a different function
        again = transformer(x, torch.cat([text, zero.expand(-1, mmdit.T5_ROWS, -1)], 1), pooled, t).sample
        transformer.set_attn_processor(unbiased)
        wrong = transformer(x, torch.cat([text, zero], 1), pooled, t).sample
    assert (full - collapsed).abs().max() <= 1e-4 * full.abs().max(), (full - collapsed).abs().max()
    assert torch.equal(full, again)
    assert (full - wrong).abs().max() > 100 * (full - collapsed).abs().max()  # log(256) matters far beyond rounding


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A shapes-mmdit folder from a few steps of the recipe: the pipeline rece reads, not a model that draws well."""
    from rece.toy.train import train

    folder = tmp_path_factory.mktemp("mmdit") / "shapes-mmdit"
    return train(folder, steps=3, vae_steps=2, batch_size=2, arch="mmdit", log=lambda m: None)


def test_a_shapes_mmdit_folder_is_read_as_sd3_in_two_spaces(trained):
    base = load_model(str(trained))
    assert base.family.name == "sd3"
    assert [list(v.kv) for v in base.spaces] == [["context_embedder"], ["time_text_embed.text_embedder.linear_1"]]
    assert [v.dim for v in base.spaces] == [sum(mmdit.WIDTHS)] * 2


def test_drawing_from_rows_in_both_spaces_matches_drawing_from_the_prompt(trained):
    """evaluate.generate with the rows of each space (joint rows, pooled vector) draws what the prompt draws."""
    pipe = _load_pipeline(str(trained))
    base = from_pipeline(pipe, str(trained))
    rows = [view.encoder.encode(["a red triangle"]).float().expand(2, -1, -1) for view in base.spaces]
    from_rows = generate(pipe, seeds=[3, 4], prompt_embeds=rows, steps=3)
    from_prompt = generate(pipe, ["a red triangle"] * 2, [3, 4], steps=3)
    assert np.abs(from_rows.astype(int) - from_prompt.astype(int)).max() <= 1


# -- the shipped model -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return _load_pipeline(NAME)


@pytest.fixture(scope="module")
def grid():
    return grid_prompts(2)


@pytest.fixture(scope="module")
def baseline(pipe, grid):
    prompts, seeds, _, _ = grid
    return generate(pipe, prompts, seeds, STEPS)


def test_shipped_model_is_a_small_standard_sd3_pipeline():
    folder = named_model_path(NAME)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 15 * 2**20
    assert door.shapes_model_name(NAME) == NAME and door.shapes_model_name(str(folder)) == NAME
    base = load_model(NAME)
    assert base.family.name == "sd3" and base.source == NAME


def test_prompt_following(baseline, grid):
    _, _, shapes, colors = grid
    acc = accuracy(baseline, shapes, colors)
    assert acc["color"] >= 0.95 and acc["shape"] >= 0.85


def erased_with(pipe, grid, method: str = "uce", model: str = door.NAME, **settings) -> dict:
    """erasure_metrics of the grid after erasing triangle with a shapes model's recipe (the UNet's by default)."""
    prompts, seeds, shapes, colors = grid
    edit = rece.erase(from_pipeline(pipe, NAME), method=method, **erasure_arguments("triangle", model), **settings)
    edit.apply(pipe)
    try:
        return erasure_metrics(generate(pipe, prompts, seeds, STEPS), shapes, colors, "triangle")
    finally:
        edit.revert(pipe)


def test_the_pooled_path_carries_the_shape_and_the_token_path_edit_costs_colours(pipe, grid, baseline):
    """Measured on this model with the UNet's recipe (docs/shapes.md): erasing triangle in the pooled projection alone
    removes most triangles and keeps shapes and colours; erasing it at context_embedder alone leaves the triangles
    and loses colours."""
    _, _, shapes, colors = grid
    before = erasure_metrics(baseline, shapes, colors, "triangle")
    pooled = erased_with(pipe, grid, layers=["^time_text_embed"])
    tokens = erased_with(pipe, grid, layers=["^context_embedder"])
    assert before["erased_rate"] >= 0.75 and pooled["erased_rate"] <= 0.25
    assert pooled["other_shape_accuracy"] >= 0.8 * before["other_shape_accuracy"] and pooled["color_accuracy"] >= 0.9
    assert tokens["erased_rate"] >= 0.75 and tokens["color_accuracy"] <= pooled["color_accuracy"] - 0.15


def test_the_mmdit_recipe_erases_triangle_and_keeps_shapes_and_colours(pipe, grid, baseline):
    """RECE with shapes-mmdit's recipe (preserve weight 1, triangle → "a circle"): the issue's bars with a one-image
    margin; the UNet's recipe on the same batch loses colours (the measurement that led to the MMDiT's)."""
    _, _, shapes, colors = grid
    before = erasure_metrics(baseline, shapes, colors, "triangle")
    after = erased_with(pipe, grid, "rece", door.MMDIT)
    assert after["erased_rate"] <= 1 / 8 and after["color_accuracy"] >= 0.95
    assert after["other_shape_accuracy"] >= 0.9 * before["other_shape_accuracy"]
    assert erased_with(pipe, grid, "rece")["color_accuracy"] <= after["color_accuracy"] - 0.15


def test_the_mmdit_name_says_how_to_train_it_when_the_model_is_not_shipped(tmp_path, capsys, monkeypatch):
    from rece.cli import main

    monkeypatch.setattr(door, "__file__", str(tmp_path / "door.py"))
    assert main(["demo", "-o", str(tmp_path / "d"), "--model", NAME]) == 2
    err = capsys.readouterr().err
    assert "python -m rece.toy.train --arch mmdit" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_demo_on_an_mmdit_shapes_model(trained, tmp_path):
    from rece.cli import main

    out = tmp_path / "demo"
    code = main(["demo", "-o", str(out), "--model", str(trained), "--per-combo", "1", "--steps", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == (0 if metrics["erased"] else 1)  # three training steps draw no triangle to erase: said, status 1
    assert metrics["model"] == str(trained) and metrics["concept"] == "triangle"
    assert (metrics["target"], metrics["uce_preserve_scale"]) == ("a circle", 1.0)  # an SD3 pipeline: the MMDiT's recipe
    assert set(metrics["after"]) >= {"erased_rate", "other_shape_accuracy", "color_accuracy"}
    assert (out / "grid.png").is_file() and "data:image/png;base64" in (out / "report.html").read_text()
    edit = rece.load_edit(out / "edit.safetensors")
    assert edit.concepts == concept_prompts("triangle")
    assert set(edit.layers) == {"context_embedder", "time_text_embed.text_embedder.linear_1"}


def test_every_model_command_takes_an_mmdit_shapes_model(trained, tmp_path, capsys):
    """erase, apply, lora, generate + evaluate (the shapes metric), the derived attack and a gradient attack (unlearndiff,
    through the MMDiT's joint rows and pooled vector)."""
    from diffusers import StableDiffusion3Pipeline

    from rece.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    edit, model = tmp_path / "e.safetensors", str(trained)
    run("erase", model, "-c", "triangle", "-o", edit)
    run("apply", model, edit, "-o", tmp_path / "applied")
    applied = StableDiffusion3Pipeline.from_pretrained(tmp_path / "applied", text_encoder_3=None, tokenizer_3=None)
    original = load_model(model)
    assert not torch.equal(applied.transformer.context_embedder.weight, original.kv["context_embedder"].to(torch.float32))
    run("lora", model, edit, "-o", tmp_path / "lora.safetensors")
    assert (tmp_path / "lora.safetensors").is_file()
    prompts = tmp_path / "p.csv"
    prompts.write_text("case_number,prompt,evaluation_seed\n0,a red triangle,1\n1,a blue circle,2\n")
    run("generate", model, "--edit", edit, "--prompts", prompts, "-o", tmp_path / "gen", "--steps", "2")
    assert "triangle %" in run("evaluate", tmp_path / "gen", "--metric", "shapes", "--concept", "triangle")
    attack = ["attack", model, "--edit", str(edit), "--steps", "2", "--images-per-prompt", "2"]
    assert "2 images" in run(*attack, "--attack", "derived", "-o", tmp_path / "d")
    few = ["--iterations", "1", "--timesteps", "1", "--adv-tokens", "2"]
    assert "4 images" in run(*attack, "--attack", "unlearndiff", "--prompts", prompts, *few, "-o", tmp_path / "u")


def test_ring_a_bell_searches_both_spaces_of_an_mmdit(trained, tmp_path):
    """On SD3 the found text's own encoding, in both spaces, is what its images are drawn from and what the search
    scored: the stored rows are the pipeline's rows of the decoded prompt, and the fitness of the target is zero."""
    import csv

    from safetensors.torch import load_file

    from rece.attacks import ring_a_bell
    from rece.attacks.common import AttackCase, Target, space_key

    prompts = tmp_path / "p.csv"
    prompts.write_text("case_number,prompt,evaluation_seed\n0,a red triangle,1\n1,a blue triangle,2\n")
    pairs = tmp_path / "pairs.csv"  # a retrained folder is not the shipped model: the world's pairs given as a file
    pairs.write_text("sensitive prompt,normal prompt\n" + "".join(f"{a},{b}\n" for a, b in door.contrast_pairs("triangle")))
    out = rece.run_attack(
        str(trained), None, "ring-a-bell", tmp_path / "r", concepts=["triangle"], prompts=str(prompts), steps=2,
        images_per_prompt=2, progress=False, population=6, generations=3, length=3, pairs=str(pairs),
    )  # fmt: skip
    stored = load_file(out / "adversarial.safetensors")
    assert {"concept_vector", "concept_vector1", "embeds.0", "embeds1.0", "embeds1.1", "ids.1"} <= set(stored)
    with open(out / "prompts.csv", newline="") as f:
        found = {int(r["case_number"]): r["prompt"] for r in csv.DictReader(f)}
    base = load_model(str(trained))
    for n, text in found.items():
        for space, view in enumerate(base.spaces):
            key = space_key(AttackCase(n, text, 0, "triangle"), space)
            assert torch.allclose(stored[key], view.encoder.encode([text])[0].float(), atol=1e-6)
    assert len(list((out / "images").glob("*.png"))) == 4
    target = Target(None, base, None, {}, ["triangle"], None, 0)
    goals = [view.encoder.encode(["a red triangle"])[0] for view in base.spaces]
    distances = ring_a_bell.relative_distances(ring_a_bell.space_rows(target, ["a red triangle", "a blue square"]), goals)
    assert np.allclose(distances[0], 0) and (distances[1] > 0).all()


def test_red_is_erased_towards_a_target_that_is_not_red(pipe, grid, baseline):
    """This model draws red for "a shape", the colours' target, so erasing red towards it erased nothing (the demo: 100 %
    before and after); red maps to "a blue shape", with which UCE leaves no red image (docs/shapes.md)."""
    from rece.toy.detector import detect

    def red_images(text: str) -> int:
        return sum(detect(image).color == "red" for image in generate(pipe, [text] * 8, list(range(8)), STEPS))

    target = erasure_arguments("red", door.MMDIT)["target"]
    assert red_images("a shape") >= 7 and red_images(target) == 0
    prompts, seeds, shapes, colors = grid
    before = erasure_metrics(baseline, shapes, colors, "red")
    edit = rece.erase(from_pipeline(pipe, NAME), method="uce", **erasure_arguments("red", door.MMDIT))
    edit.apply(pipe)
    try:
        after = erasure_metrics(generate(pipe, prompts, seeds, STEPS), shapes, colors, "red")
    finally:
        edit.revert(pipe)
    assert before["erased_rate"] >= 0.9 and after["erased_rate"] == 0 and after["color_accuracy"] >= 0.95
