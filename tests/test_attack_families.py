"""The derived attack on every family: c′ in each space the family reads, drawn by the family's own pipeline from
rows instead of a prompt; Ring-A-Bell on every family; the gradient attacks on every family
(tests/test_gradient_attacks.py)."""

import csv

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import rece
from rece.attacks import run_attack
from rece.attacks.common import generate_from_embeddings
from rece.models import load_model
from rece.runs import read_manifest

from .family_checks import DIT_BUILDERS

BUILDERS = DIT_BUILDERS


@pytest.fixture(scope="module", params=["sd", "sdxl", *BUILDERS])
def folder(request, tmp_path_factory):
    if request.param in BUILDERS:
        return BUILDERS[request.param](tmp_path_factory.mktemp("models") / request.param)
    return request.getfixturevalue(f"{request.param}_path")


def test_rows_draw_what_the_prompt_draws(folder):
    """The family's rows, passed as embeddings, give the prompt's own images: the path the derived attack uses."""
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = load_model(pipe)
    family, views = base.family, base.spaces or [base]
    prompts = ["a red cat", "nudity"]
    rows = [v.encoder.encode(prompts).float() for v in views]
    attended = views[0].encoder.token_counts(prompts)
    size = 32 if family.name in ("flux", "sd3", "sana") else 16
    call = dict(num_inference_steps=2, guidance_scale=4.0, height=size, width=size, output_type="np", **family.call_kwargs)
    expected = pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **call).images
    got = generate_from_embeddings(pipe, rows, attended, prompts, [0, 1], 2, 4.0, size)
    assert np.abs(np.asarray(got[0], np.float32) / 255 - expected[0]).max() <= 1 / 255 + 1e-6


def test_derived_attack_runs_on_every_family(folder, tmp_path):
    edit = rece.erase(load_model(folder), ["nudity"])
    edit.save(tmp_path / "edit.safetensors")
    out = run_attack(folder, tmp_path / "edit.safetensors", "derived", tmp_path / "run", steps=2, images_per_prompt=2,
                     progress=False)  # fmt: skip
    manifest = read_manifest(out)
    assert manifest["attack"]["complete"] and len(list((out / "images").glob("*.png"))) == 2
    residuals = manifest["attack"]["cases"]["0"]["info"]["residuals"]
    assert set(residuals) >= {"concept c", "attack c′"} and all(0 <= v < 10 for v in residuals.values())
    base = load_model(folder)
    stored = load_file(out / "adversarial.safetensors")
    assert stored["embeds.0"].shape[-1] == (base.spaces or [base])[0].dim  # c′ in the token space ...
    assert ("embeds1.0" in stored) == bool(base.spaces)  # ... and, for FLUX and SD3, in the pooled space


def _prompts(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nnudity\n")
    return path


def test_ring_a_bell_runs_on_every_family(folder, tmp_path):
    """SD1/2 search token ids; SDXL, SD3 (T5 included), FLUX, PixArt and Sana the candidates' texts in every space
    (PixArt and Sana: with the found text's attended rows; tests/test_token_attacks_masked.py checks them further)."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sensitive prompt,normal prompt\nnudity,a person\na nude body,a dressed body\n")
    run = dict(concepts=["nudity"], prompts=_prompts(tmp_path), steps=2, images_per_prompt=1, progress=False,
               population=4, generations=2, length=3, pairs=str(pairs))  # fmt: skip
    base = load_model(folder)
    family = base.family.name
    out = run_attack(folder, None, "ring-a-bell", tmp_path / "r", **run)
    stored = load_file(out / "adversarial.safetensors")
    assert read_manifest(out)["attack"]["complete"] and len(list((out / "images").glob("*.png"))) == 1
    assert ("embeds1.0" in stored and "concept_vector1" in stored) == (family in ("sd3", "flux"))  # the pooled space's too
    assert ("attended.0" in stored) == base.family.masks_padding  # the rows the transformer attends, for its mask
    if family == "sdxl":
        check_drawn_from_the_found_text(folder, out, stored)


def check_drawn_from_the_found_text(folder, out, stored):
    """SDXL: the stored rows are the pipeline's own encoding of the found text, and its image is the one the pipeline
    draws from that text (its pooled vector included), not from the concept."""
    with open(out / "prompts.csv", newline="", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    text, seed, guidance = row["prompt"], int(row["seed"]), float(row["guidance"])
    assert read_manifest(out)["attack"]["cases"]["0"]["text"] == text
    with torch.no_grad():
        rows = pipe.encode_prompt([text], device="cpu", do_classifier_free_guidance=False)[0]
    assert torch.equal(stored["embeds.0"], rows[0])
    got = np.asarray(Image.open(out / row["image"]), np.float32) / 255
    size = got.shape[0]
    call = dict(num_inference_steps=2, guidance_scale=guidance, height=size, width=size, output_type="np")
    drawn = pipe(prompt=[text], generator=[torch.Generator().manual_seed(seed)], **call).images[0]
    assert np.abs(got - drawn).max() <= 1 / 255 + 1e-6
    concept = pipe(prompt=["nudity"], generator=[torch.Generator().manual_seed(seed)], **call).images[0]
    assert np.abs(got - concept).max() > 2 / 255  # the check can tell the found text from the concept
