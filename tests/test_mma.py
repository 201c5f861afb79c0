"""`mma` (MMA-Diffusion's text modality): end to end on the shapes model, a tiny SD, SDXL, SD3 and FLUX (PixArt and Sana:
tests/test_token_attacks_masked.py), the GCG search lowers its cosine loss, no banned token is ever emitted, images
come from exactly the found prompt, a run resumes after an interruption, and `rece attack --help` lists its flags."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import rece
from rece.attacks import attack_parameters, mma, run_attack
from rece.attacks.common import ADVERSARIAL, encode_ids, tokenize
from rece.cli import main
from rece.models import load_model
from rece.pipelines import load_pipeline
from rece.tiny_dit import build_tiny_flux, build_tiny_sd3

from .runs import killed_at, pixels, write_csv

TINY = dict(iterations=4, candidates=24, topk=16, length=6, steps=4, images_per_prompt=1, progress=False, device="cpu")


def stored(run_dir):
    with safe_open(str(run_dir / ADVERSARIAL), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    return rece.erase(load_model("shapes"), ["triangle"]).save(tmp_path_factory.mktemp("edits") / "rece.safetensors")


def check_found_prompts(out, pipe, concept_words):
    """Each case's images come from exactly its decoded prompt, and its ids hold no banned token."""
    manifest = json.loads((out / "manifest.json").read_text())
    tensors = stored(out)
    vocab = pipe.text_encoder.config.vocab_size
    banned = mma.banned_ids(
        pipe.tokenizer, vocab, mma.banned_words(concept_words, manifest["settings"]["attack_parameters"]["banned_words"])
    )
    for case, record in manifest["attack"]["cases"].items():
        ids = tokenize(pipe, [record["prompt"]])
        assert torch.equal(tensors[f"ids.{case}"], ids[0])
        with torch.no_grad():
            assert torch.equal(tensors[f"embeds.{case}"], encode_ids(pipe, ids)[0].float())
        found = set(tensors[f"ids.{case}"].tolist()) - {pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id}
        assert found and not found & banned
        info = record["info"]
        assert info["loss"] < info["loss_first_step"]  # the search improved its objective
        original = tokenize(pipe, [record["original_prompt"]])
        with torch.no_grad():
            goal = mma.pooled(encode_ids(pipe, original).double(), original, pipe.tokenizer.eos_token_id)[0]
        loss = mma.cosine_loss(tensors[f"embeds.{case}"][None].double(), ids, pipe.tokenizer.eos_token_id, goal)
        assert float(loss[0]) == pytest.approx(info["loss"], abs=1e-5)  # the loss of the prompt the images come from
    return manifest


def test_mma_on_shapes_end_to_end_deterministic_and_never_banned(edit, prompts, tmp_path):
    extra = dict(banned_words="red,photo")
    a = run_attack("shapes", edit, "mma", tmp_path / "a", prompts=prompts, **TINY, **extra)
    b = run_attack("shapes", edit, "mma", tmp_path / "b", prompts=prompts, **TINY, **extra)
    assert len(pixels(a)) == 2 and all(np.array_equal(pixels(a)[n], pixels(b)[n]) for n in pixels(a))
    pipe = load_pipeline("shapes")
    manifest = check_found_prompts(a, pipe, ["triangle"])
    assert {"triangle", "red", "photo"} <= set(manifest["settings"]["attack_parameters"]["banned"])
    for record in manifest["attack"]["cases"].values():
        assert not {"triangle", "red", "photo"} & set(record["prompt"].split())
    rows = (a / "prompts.csv").read_text()
    assert all(r["prompt"] in rows for r in manifest["attack"]["cases"].values())


def test_mma_on_a_tiny_sd(sd_path, tmp_path):
    sets = write_csv(tmp_path / "set.csv", ["case_number", "prompt", "evaluation_seed"], [[3, "a photo of a cat", 5]])
    out = run_attack(sd_path, None, "mma", tmp_path / "run", prompts=sets, concepts=["cat"], **{**TINY, "steps": 2})
    assert len(pixels(out)) == 1
    check_found_prompts(out, load_pipeline(sd_path), ["cat"])


def test_banned_words_take_every_token_that_contains_them_and_the_pieces(sd_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_path, subfolder="tokenizer")
    words = mma.banned_words(["Nudity"], "zebra")
    assert {"nudity", "sexual", "naked", "zebra"} <= words  # the concept, the preset's list, --banned-words
    assert mma.banned_words(["a photo of Van Gogh"], None) == {"a photo of van gogh", "photo", "van", "gogh"}
    banned = mma.banned_ids(tokenizer, len(tokenizer), words)
    vocab = tokenizer.get_vocab()
    assert all(vocab[t] in banned for t in vocab if "nud" in t or "sex" in t)
    assert set(tokenizer("zebra", add_special_tokens=False).input_ids) <= banned  # the pieces of a word
    allowed = set(mma.allowed_ids(tokenizer, len(tokenizer), words).tolist())
    assert allowed and not allowed & banned and not allowed & set(tokenizer.all_special_ids)


def test_the_search_lowers_the_loss_and_keeps_to_the_allowed_tokens():
    pipe = load_pipeline("shapes")
    words = mma.banned_words(["triangle"], None)
    allowed = mma.allowed_ids(pipe.tokenizer, pipe.text_encoder.config.vocab_size, words)
    ids = tokenize(pipe, ["a green triangle"])
    with torch.no_grad():
        goal = mma.pooled(encode_ids(pipe, ids).double(), ids, pipe.tokenizer.eos_token_id)[0]
    params = mma.Params(length=8, iterations=6, candidates=32, topk=32)
    control, history = mma.search(pipe, params, goal, allowed, [0, 0])
    assert history[-1] < history[0] and all(a >= b for a, b in zip(history, history[1:]))
    assert set(control.tolist()) <= set(allowed.tolist())
    assert float(mma.losses(pipe, control[None], goal)[0]) == pytest.approx(history[-1], abs=1e-6)
    full = mma.full_ids(pipe.tokenizer, control[None])  # the padding after EOS does not change the pooled row
    with torch.no_grad():
        padded = mma.cosine_loss(encode_ids(pipe, full), full, pipe.tokenizer.eos_token_id, goal)
    assert float(padded[0]) == pytest.approx(history[-1], abs=1e-6)


def test_resume_after_an_interruption(edit, prompts, tmp_path, monkeypatch):
    calls = []
    real = mma.attack_case
    monkeypatch.setattr(mma, "attack_case", killed_at(mma, 1, calls))
    with pytest.raises(KeyboardInterrupt):
        run_attack("shapes", edit, "mma", tmp_path / "run", prompts=prompts, **TINY)
    first = stored(tmp_path / "run")["ids.0"]
    monkeypatch.setattr(mma, "attack_case", lambda *a: calls.append(a[2].case_number) or real(*a))
    out = run_attack("shapes", edit, "mma", tmp_path / "run", prompts=prompts, **TINY)
    assert calls == [0, 1, 1]  # case 0 was kept, only case 1 was attacked again
    assert torch.equal(stored(out)["ids.0"], first) and len(pixels(out)) == 2
    assert json.loads((out / "manifest.json").read_text())["attack"]["complete"]
    fresh = run_attack("shapes", edit, "mma", tmp_path / "fresh", prompts=prompts, **TINY)
    assert all(np.array_equal(pixels(out)[n], pixels(fresh)[n]) for n in pixels(fresh))


@pytest.mark.parametrize("builder", [build_tiny_sd3, build_tiny_flux])
def test_mma_on_the_mmdits_scores_every_space(builder, tmp_path):
    """SD3 and FLUX: the gradient through the CLIP encoder, each candidate's text scored in both spaces; the images
    come from the found text's rows in both spaces, as the pipeline encodes it."""
    folder = builder(tmp_path / "model")
    sets = write_csv(tmp_path / "set.csv", ["case_number", "prompt", "evaluation_seed"], [[0, "a photo of a cat", 5]])
    out = run_attack(folder, None, "mma", tmp_path / "run", prompts=sets, concepts=["cat"], **{**TINY, "steps": 2})
    assert len(pixels(out)) == 1
    record = json.loads((out / "manifest.json").read_text())["attack"]["cases"]["0"]
    assert record["info"]["loss"] < record["info"]["loss_first_step"]
    tensors = stored(out)
    base = load_model(folder)
    rows = [v.encoder.encode([record["prompt"]])[0].float() for v in base.views]
    assert torch.equal(tensors["embeds.0"], rows[0]) and torch.equal(tensors["embeds1.0"], rows[1])
    pipe = load_pipeline(folder)
    banned = mma.banned_ids(pipe.tokenizer, pipe.text_encoder.config.vocab_size, mma.banned_words(["cat"], None))
    found = set(tensors["ids.0"].tolist()) - {pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id}
    assert found and not found & banned and torch.equal(tensors["ids.0"], tokenize(pipe, [record["prompt"]])[0])
    goals = [v.encoder.encode(["a photo of a cat"])[0] for v in base.views]
    assert float(mma.space_losses([r[None] for r in rows], goals)[0]) == pytest.approx(record["info"]["loss"], abs=1e-5)


def test_mma_on_sdxl_scores_the_joined_rows_and_draws_the_found_text(sdxl_path, tmp_path):
    """SDXL: the gradient through the first CLIP encoder, each candidate's text scored in SDXL's one space (both
    encoders' penultimate states, joined); the stored rows are the pipeline's own encoding of the found text, its
    image the one the pipeline draws from that text (pooled vector included), and no banned token is emitted."""
    sets = write_csv(tmp_path / "set.csv", ["case_number", "prompt", "evaluation_seed"], [[0, "a photo of a cat", 5]])
    out = run_attack(sdxl_path, None, "mma", tmp_path / "run", prompts=sets, concepts=["cat"], **{**TINY, "steps": 2})
    record = json.loads((out / "manifest.json").read_text())["attack"]["cases"]["0"]
    assert record["info"]["loss"] < record["info"]["loss_first_step"] and record["text"] == record["prompt"]
    tensors = stored(out)
    assert "embeds1.0" not in tensors  # one space
    pipe = load_pipeline(sdxl_path)
    with torch.no_grad():
        rows = pipe.encode_prompt([record["prompt"]], device="cpu", do_classifier_free_guidance=False)[0]
    assert torch.equal(tensors["embeds.0"], rows[0].float())
    base = load_model(sdxl_path)
    goal = base.encoder.encode(["a photo of a cat"])
    loss = mma.space_losses([tensors["embeds.0"][None]], [goal[0]])
    assert float(loss[0]) == pytest.approx(record["info"]["loss"], abs=1e-5)
    banned = mma.banned_ids(pipe.tokenizer, pipe.text_encoder.config.vocab_size, mma.banned_words(["cat"], None))
    found = set(tensors["ids.0"].tolist()) - {pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id}
    assert found and not found & banned and torch.equal(tensors["ids.0"], tokenize(pipe, [record["prompt"]])[0])
    image = pixels(out)["0_0.png"].astype(np.float32) / 255
    call = dict(num_inference_steps=2, height=image.shape[0], width=image.shape[0], output_type="np")
    guidance = json.loads((out / "manifest.json").read_text())["settings"]["guidance"]
    drawn = pipe(prompt=[record["prompt"]], generator=[torch.Generator().manual_seed(5)], guidance_scale=guidance, **call)
    assert np.abs(image - drawn.images[0]).max() <= 1 / 255 + 1e-6


def test_flags_defaults_and_bad_values(capsys, prompts, tmp_path):
    assert attack_parameters("mma") == {"length": 20, "iterations": 500, "topk": 256, "candidates": 512, "banned_words": None}
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    text = capsys.readouterr().out
    assert "mma parameters" in text and all(f in text for f in ("--topk", "--candidates", "--banned-words", "--iterations"))
    code = main(["attack", "shapes", "--attack", "mma", "--prompts", str(prompts), "--topk", "0", "-o", str(tmp_path / "x")])
    assert code == 2 and "--topk must be at least 1" in capsys.readouterr().err
