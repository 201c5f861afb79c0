"""The gradient attacks (`unlearndiff`, `textual-inversion`) on every family's tiny pipeline: the attack's token
vectors reach the rows exactly as the pipeline encodes a token (every space, the pooled vectors, SDXL's extra row),
its adversarial variables receive gradients through the family's own denoiser, a killed run resumes, and the images
come from exactly the rows stored."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import rece
from rece.attacks import run_attack, unlearndiff
from rece.attacks import textual_inversion as ti
from rece.attacks.common import case_rows, generate_from_embeddings
from rece.attacks.objective import conditioning, denoising_loss
from rece.attacks.token_rows import TokenRows
from rece.edit import load_edit
from rece.models import load_model
from rece.pipelines import image_size
from rece.runs import read_manifest
from rece.tiny_dit import build_tiny_flux

from .family_checks import WITH_SCHNELL
from .runs import killed_at, write_csv

BUILDERS = WITH_SCHNELL
SMALL = {
    "unlearndiff": dict(iterations=2, timesteps=2, adv_tokens=2),
    "textual-inversion": dict(train_steps=2, train_batch_size=2, gradient_accumulation=1, train_images=2),
}


@pytest.fixture(scope="module", params=["sd", "sd-v", "sdxl", *BUILDERS])
def folder(request, tmp_path_factory):
    if request.param in BUILDERS:
        return BUILDERS[request.param](tmp_path_factory.mktemp("models") / request.param)
    if request.param == "sd-v":  # SD 2.x's v-prediction
        path = tmp_path_factory.mktemp("models") / "sd-v"
        shutil.copytree(request.getfixturevalue("sd_path"), path, dirs_exist_ok=True)
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
        return path
    return request.getfixturevalue(f"{request.param}_path")


def target_of(folder):
    from types import SimpleNamespace

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(pipe=pipe, base=load_model(pipe))


def test_token_vectors_give_the_pipelines_rows_and_receive_gradients(folder):
    """A placeholder read as the stand-in token with that token's own vector gives exactly the rows the family builds
    for the text naming the token (every space and extra row); the denoising loss sends gradients to the vector of
    every carrying encoder."""
    target = target_of(folder)
    maker = TokenRows(target, ["<rece-adv-0>"])
    word = "cat"
    ids = maker.tokenizers[maker.parts[0]](" " + word, add_special_tokens=False).input_ids
    assert len(ids) == 1  # the word is one token of the carrying vocabulary
    stand_in = torch.tensor(ids)
    vectors = {p: maker.table(p)[stand_in].clone().requires_grad_(True) for p in maker.parts}
    rows, attended = maker.rows(["<rece-adv-0> on a tree"], vectors, stand_in, {"<rece-adv-0>": word})
    expected, expected_attended = conditioning(target, ["cat on a tree"])
    assert len(rows) == len(expected) and attended == expected_attended
    for got, want in zip(rows, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    size = image_size(target.pipe)
    latents = target.pipe(prompt=["a dog"], num_inference_steps=1, output_type="latent", height=size, width=size,
                          **target.base.family.call_options()).images  # fmt: skip
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    loss = denoising_loss(target.pipe, latents, rows, attended, torch.tensor([400]), noise, 3.5)
    loss.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors.values())  # SDXL, SD3: both CLIPs'


@pytest.mark.parametrize("name", ["unlearndiff", "textual-inversion"])
def test_attack_runs_resumes_and_draws_from_the_stored_rows(folder, name, tmp_path, monkeypatch):
    edit = rece.erase(load_model(folder), ["cat"]).save(tmp_path / "edit.safetensors")
    prompts = write_csv(tmp_path / "p.csv", ["case_number", "prompt", "evaluation_seed"], [[0, "a cat", 3], [1, "a red cat", 4]])
    run = dict(prompts=prompts, steps=2, progress=False, **SMALL[name])
    module = unlearndiff if name == "unlearndiff" else ti
    original = module.attack_case
    monkeypatch.setattr(module, "attack_case", killed_at(module, 1))  # killed while attacking its second case
    with pytest.raises(KeyboardInterrupt):
        run_attack(folder, edit, name, tmp_path / "run", **run)
    first = load_file(tmp_path / "run" / "adversarial.safetensors")
    assert "embeds.0" in first and "embeds.1" not in first
    monkeypatch.setattr(module, "attack_case", original)
    if name == "textual-inversion":  # the learned word is reused, not trained again
        monkeypatch.setattr(ti, "train", lambda *a, **k: pytest.fail("trained again on resume"))
    out = run_attack(folder, edit, name, tmp_path / "run", **run)
    stored = load_file(out / "adversarial.safetensors")
    assert torch.equal(stored["embeds.0"], first["embeds.0"]) and "embeds.1" in stored
    manifest = read_manifest(out)
    assert manifest["attack"]["complete"] and len(list((out / "images").glob("*.png"))) == 2
    base = load_model(folder)
    spaces = len(base.views) + len(base.family.extra_rows(target_of(folder).pipe, ["x"]))
    assert all(f"embeds{s}.1" in stored for s in range(1, spaces)) and f"embeds{spaces}.1" not in stored
    assert ("attended.1" in stored) == base.family.masks_padding
    if name == "textual-inversion":
        assert stored["token_embedding"].ndim == 1 and ("token_embedding1" in stored) == (len(base.family.attack_parts) > 1)
        assert manifest["attack"]["cases"]["1"]["prompt"] == "a red <cat>"
    else:
        assert manifest["attack"]["cases"]["1"]["prompt"].endswith(" a red cat")
        ids, adversarial = stored["ids.1"].tolist(), stored["adversarial_ids.1"].tolist()
        assert len(adversarial) == 2 and any(ids[i : i + 2] == adversarial for i in range(len(ids)))  # what was read
    check_images_from_rows(folder, edit, out, stored, manifest)


def check_images_from_rows(folder, edit, out, stored, manifest):
    """Each image is what the family's pipeline draws from the stored rows of every space, with the edit applied."""
    from rece.attacks.common import AttackCase

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load_edit(edit).apply(pipe)
    settings = manifest["settings"]
    for number, seed in ((0, 3), (1, 4)):
        rows, attended = case_rows(stored, [AttackCase(number, "", seed, "cat")])
        drawn = generate_from_embeddings(pipe, rows, attended, ["cat"], [seed], settings["steps"], settings["guidance"],
                                         settings["height"])[0]  # fmt: skip
        got = np.asarray(Image.open(out / "images" / f"{number}_0.png"), np.float32)
        assert np.abs(got - np.asarray(drawn, np.float32)).max() <= 1


def test_encoders_without_the_learned_word_do_not_read_it(tmp_path):
    """FLUX's CLIP has no learned word: it reads a textual-inversion prompt without the placeholder, never its written
    form, which would hand the pooled vector the concept's own word ("<cat>")."""
    target = target_of(build_tiny_flux(tmp_path / "flux"))
    maker = TokenRows(target, ["<cat>"])
    stand_in = torch.tensor(maker.tokenizers[maker.parts[0]](" dog", add_special_tokens=False).input_ids[:1])
    vectors = {p: maker.table(p)[stand_in].clone() for p in maker.parts}
    rows, _ = maker.rows(["a red <cat>"], vectors, stand_in, ti.unwritten(maker))
    without, _ = conditioning(target, ["a red"])
    written, _ = conditioning(target, ["a red <cat>"])
    torch.testing.assert_close(rows[1], without[1], rtol=1e-5, atol=1e-5)  # the pooled vector: CLIP's
    assert not torch.allclose(rows[1], written[1], atol=1e-4)
