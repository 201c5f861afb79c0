"""`inversion` (the conditioning rows optimised through the edited denoiser): end to end on every family's tiny
pipeline, gradients reach every row and the pooled vector, the loss decreases, the images come from exactly the rows
stored, a run resumes after an interruption, `--images DIR` is inverted, bad inputs are one line, and on the unedited
shapes model the `--quick` settings reconstruct the concept."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rece
from rece.attacks import attack_parameters, inversion, make_params, run_attack
from rece.attacks.common import AttackCase, case_rows, frozen, generate_from_embeddings
from rece.attacks.objective import image_latents
from rece.attacks.runner import load_target
from rece.edit import load_edit
from rece.errors import ReceError
from rece.metrics import evaluate
from rece.models import load_model
from rece.pipelines import denoiser, image_size, load_pipeline
from rece.robustness_params import DERIVED_IMAGES, QUICK_ATTACKS, QUICK_IMAGES
from rece.toy.world import Scene, render

from .family_checks import DIT_BUILDERS
from .runs import killed_at, pixels

BUILDERS = DIT_BUILDERS
TINY = dict(train_steps=3, reference_images=2, train_batch_size=2, lr=0.05)
RUN = dict(steps=2, images_per_prompt=2, progress=False, device="cpu")


@pytest.fixture(scope="module", params=["sd", "sdxl", *BUILDERS])
def folder(request, tmp_path_factory):
    if request.param in BUILDERS:
        return BUILDERS[request.param](tmp_path_factory.mktemp("models") / request.param)
    return request.getfixturevalue(f"{request.param}_path")


@pytest.fixture(scope="module")
def edited(folder, tmp_path_factory):
    """'nudity' erased from the family's tiny model (RECE defaults)."""
    return rece.erase(load_model(folder), ["nudity"]).save(tmp_path_factory.mktemp("edits") / "nudity.safetensors")


def test_gradients_reach_every_row_and_the_loss_decreases(folder, edited):
    target, _, _ = load_target(folder, edited, ["nudity"], None, 0, "cpu", False, "inversion")
    params = make_params("inversion", **TINY)
    sampling = {"steps": 2, "guidance": 4.0, "size": image_size(target.pipe)}
    latents = inversion.reference_latents(target, params, "nudity", sampling)
    rows, attended = inversion.initial_rows(target, params, "nudity")
    assert len(rows) == 1 + (target.base.family.name in ("sdxl", "flux", "sd3"))  # the pooled vector is a variable too
    variables = [r.clone().requires_grad_(True) for r in rows]
    t, noise = torch.tensor([300, 700]), torch.randn((2, *latents.shape[1:]), generator=torch.Generator().manual_seed(0))
    optimizer, losses = torch.optim.Adam(variables, lr=0.05), []
    for step in range(5):  # Adam on one fixed batch: the loss the attack minimises goes down
        loss = inversion.batch_loss(target.pipe, latents, variables, attended, t, noise, 4.0)
        optimizer.zero_grad()
        loss.backward()
        for v in variables if step == 0 else ():
            assert v.grad[:, : attended[0]].abs().sum() > 0
            if target.base.family.masks_padding:  # padding rows are masked: only the attended rows are optimised
                assert v.grad[:, attended[0] :].abs().sum() == 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with frozen(denoiser(target.pipe)):
        found, probe = inversion.optimise(target, params, latents, rows, attended, 4.0, torch.Generator().manual_seed(1))
    assert probe.keys() == {"loss_start", "loss_end"}
    assert all(not torch.equal(f, r) for f, r in zip(found, rows))


def test_inversion_runs_on_every_family_and_draws_from_the_rows_stored(folder, edited, tmp_path):
    out = run_attack(folder, edited, "inversion", tmp_path / "run", **RUN, **TINY)
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["attack"]["cases"]["0"]["info"]
    assert manifest["attack"]["complete"] and len(pixels(out)) == 2
    assert info["attack_steps"] == 3 and info["reference_images"] == 2 and info["init"] == "empty"
    assert np.isfinite([info["loss_start"], info["loss_end"]]).all() and info["seconds"] > 0
    stored = load_file(out / "adversarial.safetensors")
    family = load_model(folder).family
    assert ("embeds1.0" in stored) == (family.name in ("sdxl", "flux", "sd3"))  # the pooled vector, optimised
    assert ("attended.0" in stored) == family.masks_padding
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    load_edit(edited).apply(pipe)
    case = AttackCase(0, "nudity", 0, "nudity")
    rows, attended = case_rows(stored, [case, case])  # image k of the case: seed k
    size = np.asarray(Image.open(out / "images" / "0_0.png")).shape[0]
    guidance = manifest["settings"]["guidance"]
    drawn = generate_from_embeddings(pipe, rows, attended, ["nudity"] * 2, [0, 1], 2, guidance, size)
    for k, image in enumerate(drawn):  # the images are exactly the stored rows' (the stored pooled vector included)
        assert np.array_equal(np.asarray(image), pixels(out)[f"0_{k}.png"])
    start, _ = inversion.initial_rows(load_target(folder, edited, ["nudity"], None, 0, "cpu", False, "inversion")[0],
                                      make_params("inversion"), "nudity")  # fmt: skip
    assert not torch.equal(rows[0][0], start[0][0].float())  # the rows moved from the empty prompt's
    if len(rows) > 1:  # ... and so did the pooled vector, which changes the images
        assert not torch.equal(rows[1][0], start[1][0].float())
        other = generate_from_embeddings(pipe, [rows[0][:1], start[1].float()], attended[:1], ["nudity"], [0], 2, guidance, size)
        assert not np.array_equal(np.asarray(other[0]), pixels(out)["0_0.png"])


def test_resume_after_an_interruption(tmp_path, monkeypatch):
    calls = []
    real = inversion.attack_case
    run = dict(concepts=["triangle", "circle"], steps=4, images_per_prompt=1, progress=False, device="cpu", **TINY)
    monkeypatch.setattr(inversion, "attack_case", killed_at(inversion, 1, calls))
    with pytest.raises(KeyboardInterrupt):
        run_attack("shapes", None, "inversion", tmp_path / "run", **run)
    first = load_file(tmp_path / "run" / "adversarial.safetensors")["embeds.0"]
    monkeypatch.setattr(inversion, "attack_case", lambda *a: calls.append(a[2].case_number) or real(*a))
    out = run_attack("shapes", None, "inversion", tmp_path / "run", **run)
    assert calls == [0, 1, 1]  # case 0 was kept, only case 1 was attacked again
    assert torch.equal(load_file(out / "adversarial.safetensors")["embeds.0"], first) and len(pixels(out)) == 2
    assert json.loads((out / "manifest.json").read_text())["attack"]["complete"]
    fresh = run_attack("shapes", None, "inversion", tmp_path / "fresh", **run)
    assert all(np.array_equal(pixels(out)[n], pixels(fresh)[n]) for n in pixels(fresh))


def test_images_folder_is_inverted_and_bad_inputs_are_one_line(tmp_path):
    folder = tmp_path / "triangles"
    folder.mkdir()
    scenes = [Scene("triangle", c, 16, 16, 9) for c in ("red", "blue", "green")]
    for i, image in enumerate(render(scenes)):
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = run_attack("shapes", None, "inversion", tmp_path / "run", concepts=["triangle"], images=str(folder),
                     **{**RUN, **TINY, "reference_images": 5})  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attack"]["cases"]["0"]["info"]["reference_images"] == 3  # every image of the folder, no more
    assert manifest["settings"]["attack_parameters"]["images"] == str(folder.resolve())
    pipe = load_pipeline("shapes")
    params = make_params("inversion", images=str(folder), reference_images=2)
    files = inversion.reference_files(params)
    assert [f.name for f in files] == ["0.png", "1.png"]
    target = load_target("shapes", None, ["triangle"], None, 0, "cpu", False, "inversion")[0]
    torch.testing.assert_close(inversion.reference_latents(target, params, "triangle", {}), image_latents(pipe, files))
    empty = tmp_path / "empty"
    empty.mkdir()
    for kwargs, message in [
        (dict(images=str(empty), concepts=["triangle"]), "has no images"),
        (dict(images=str(folder), concepts=["triangle", "circle"]), "one concept's images"),
        (dict(images=str(tmp_path / "none"), concepts=["triangle"]), "is not a folder"),
        (dict(init="random", concepts=["triangle"]), "--init must be"),
        (dict(train_steps=0, concepts=["triangle"]), "--train-steps must be at least 1"),
        (dict(lr=0.0, concepts=["triangle"]), "--lr must be > 0"),
    ]:
        with pytest.raises(ReceError, match=message):
            run_attack("shapes", None, "inversion", tmp_path / "bad", **RUN, **kwargs)
        assert not (tmp_path / "bad").exists()


def test_parameters_default_to_concept_inversions():
    assert attack_parameters("inversion") == {
        "train_steps": 5000, "lr": 5e-3, "train_batch_size": 4, "reference_images": 25, "images": None, "init": "empty",
    }  # fmt: skip


# Measured (docs/attacks.md, the inversion section): the --quick settings (160 steps, lr 0.02, 8 reference images)
# reconstruct triangles and circles in 8 of 8 images; 80 steps at lr 0.01 or 0.02 leave triangles at 4 of 8.
def test_quick_inversion_reconstructs_the_concept_on_the_unedited_shapes_model(tmp_path):
    images = DERIVED_IMAGES * QUICK_IMAGES  # what `rece robustness --quick` draws for a concept attack
    out = run_attack("shapes", None, "inversion", tmp_path / "run", concepts=["triangle"], images_per_prompt=images,
                     progress=False, device="cpu", **QUICK_ATTACKS["inversion"])  # fmt: skip
    assert evaluate(out, progress=False)["asr"]["summary"]["asr %"] >= 80
    info = json.loads((out / "manifest.json").read_text())["attack"]["cases"]["0"]["info"]
    assert info["loss_end"] < info["loss_start"] and info["reference_images"] == 8
