"""MMDiT families through the family seam: FLUX.1 and SD3 read the prompt in two spaces (token rows →
context_embedder; pooled vector → time_text_embed.text_embedder.linear_1), each erased on its own. Tiny random
pipelines with locally made tokenizers (rece.tiny_dit) stand in for the real ones."""

import json
from dataclasses import dataclass

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

import rece
from rece import closed_form as cf
from rece.attacks import run_attack
from rece.cli import main
from rece.families.flux import FLUX
from rece.families.sd3 import SD3
from rece.models import load_model
from rece.runs import read_manifest
from rece.tiny_dit import build_tiny_flux, build_tiny_sd3

from .family_checks import assert_cli_erase_info_apply, assert_only_edited_layers_change, built_case, cli, fused_lora_weights
from .reference import best_reachable_residual, reference_erase

PROMPTS = ["a red cat", "nudity", "", "a photo of van gogh starry night"]  # distinct token ids: one batch as the pipeline's
LAYERS = {"context_embedder", "time_text_embed.text_embedder.linear_1"}


@dataclass(frozen=True)
class Case:
    family: object
    build: object
    pipeline: type
    rows: int  # token rows of the context space
    guidance: float

    def encode(self, pipe, prompts):
        """(token rows, pooled vector) as the pipeline's __call__ builds them."""
        if self.pipeline is FluxPipeline:
            rows, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None)
            return rows, pooled
        rows, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        return rows, pooled


CASES = {
    "flux": Case(FLUX, build_tiny_flux, FluxPipeline, 512, 3.5),
    "sd3": Case(SD3, build_tiny_sd3, StableDiffusion3Pipeline, 77 + 256, 7.0),
}


case = built_case(CASES)


@pytest.fixture(scope="module")
def flux(case):
    return load_model(case[1])


def weights(edit, base, names):
    new = edit.edited_kv(base.kv)
    return [new[n].double() for n in names]


def test_both_spaces_read_what_the_pipeline_feeds_the_transformer(case, flux):
    c, path = case
    pipe = c.pipeline.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        rows, pooled = c.encode(pipe, PROMPTS)
    for base in (flux, load_model(pipe)):
        context, pooled_space = base.spaces
        assert base.family is c.family and set(base.kv) == LAYERS
        assert list(context.kv) == ["context_embedder"] and list(pooled_space.kv) == ["time_text_embed.text_embedder.linear_1"]
        assert torch.equal(context.encoder.encode(PROMPTS), rows.double()) and rows.shape[1] == c.rows
        assert torch.equal(pooled_space.encoder.encode(PROMPTS)[:, 0], pooled.double())


def test_each_space_equals_the_reference(flux):
    edit = rece.erase(flux, ["nudity"], preserve=["a red cat"], epochs=2)
    assert edit.kind == "layers" and set(edit.layers) == LAYERS
    new = edit.edited_kv(flux.kv)
    for view in flux.spaces:
        enc = view.encoder
        expected = reference_erase(
            view.kv, lambda t, enc=enc: enc.encode([t])[0], lambda t, enc=enc: enc.token_counts([t])[0], ["nudity"],
            preserve=["a red cat"], epochs=2, whole=view.family.whole_rows,
        )  # fmt: skip
        for name, w in expected.items():
            assert (new[name].double() - w).norm() / w.norm() < 1e-5, name
    assert edit.derived[0].shape == (1, flux.spaces[0].encoder.encode(["x"]).shape[1], flux.spaces[0].dim)  # token space c′


def test_uce_maps_the_concept_in_both_spaces_and_rece_undoes_the_derived_embedding(flux):
    exact = rece.erase(flux, ["nudity"], method="uce", uce_lamb=1e-4, preserve_empty=False)
    for view in flux.spaces:
        names = list(view.kv)
        w0 = [view.kv[n].double() for n in names]
        (c, t), (n_c, n_t) = view.encoder.encode(["nudity", " "]), view.encoder.token_counts(["nudity", " "])
        rows, target = (c, t) if view.family.whole_rows else cf.uce_token_rows(c, n_c, t, n_t)
        # nothing preserved, λ small: the erased rows' outputs are the least-squares fit to the target's outputs
        wanted = target @ w0[0].T
        best = torch.linalg.lstsq(rows, wanted).solution
        optimum = ((rows @ best - wanted).norm() / wanted.norm()).item()
        assert cf.relative_residual(weights(exact, flux, names), w0, rows, target) < optimum + 1e-3, view.family.name
    context = flux.spaces[0]
    w0 = [context.kv["context_embedder"].double()]
    uce = rece.erase(flux, ["nudity"], method="uce")
    rc = rece.erase(flux, ["nudity"], epochs=1, regularization=1e-3)
    c, n = context.encoder.encode(["nudity"])[0], context.encoder.token_counts(["nudity"])[0]
    derived = cf.derive_against(c, weights(uce, flux, ["context_embedder"]), w0, 1e-3, None)
    # judged on the text's own rows: the padding rows (not masked) stay close to the preserved " "'s whatever happens
    after_uce = cf.relative_residual(weights(uce, flux, ["context_embedder"]), w0, derived[:n], c[:n])
    after_rece = cf.relative_residual(weights(rc, flux, ["context_embedder"]), w0, derived[:n], c[:n])
    assert after_uce < 0.1 and after_rece > 5 * after_uce


def test_only_the_two_layers_change_and_the_lora_loads_with_load_lora_weights(case, flux, tmp_path):
    edit = rece.erase(flux, ["nudity"])
    pipe = case[0].pipeline.from_pretrained(case[1], dtype=torch.float32)
    assert_only_edited_layers_change(edit, pipe, LAYERS)
    state = edit.to_lora(flux, tmp_path / "lora.safetensors", tolerance=1e-6)
    assert hasattr(pipe, "load_lora_weights")  # FLUX and SD3 load it themselves
    fused, new = fused_lora_weights(pipe, tmp_path / "lora.safetensors", state, LAYERS), edit.edited_kv(flux.kv)
    for name in LAYERS:
        assert (fused[name] - new[name]).norm() / new[name].norm() < 1e-4


def test_cli_and_what_is_refused(capsys, case, tmp_path):
    c, path = case
    run = cli(capsys)
    edit = assert_cli_erase_info_apply(run, path, c.family.name, tmp_path)
    (tmp_path / "p.csv").write_text("prompt,evaluation_seed\na red cat,1\n")
    out = run("generate", path, "--edit", edit, "--prompts", tmp_path / "p.csv", "-o", tmp_path / "run", "--steps", "2",
              "--height", "32", "--width", "32")  # fmt: skip
    assert "1 of 1 images" in out
    settings = json.loads((tmp_path / "run" / "manifest.json").read_text())["settings"]
    assert settings["pipeline"] == c.pipeline.__name__ and settings["guidance"] == c.guidance
    out = run("erase", path, "-c", "cat", "--method", "robust", "--preserve", "a red cat", "-o", tmp_path / "r.safetensors")
    assert "robust        rank" in out and rece.load_edit(tmp_path / "r.safetensors").metadata["robust"]["spaces"]


def test_robust_mode_leaves_no_embedding_that_brings_the_concept_back(flux):
    """UCE's edit is invertible in every space (some embedding gives the original outputs back); robust mode's is not."""
    uce = rece.erase(flux, ["nudity"], method="uce", preserve=["a red cat", "a photo of a dog"])
    robust = rece.erase(flux, ["nudity"], method="robust", preserve=["a red cat", "a photo of a dog"])
    assert robust.metadata["robust"]["rank"] >= 1 and "fresh_residual" in robust.metadata["robust"]
    for view in flux.spaces or [flux]:
        names, enc = list(view.kv), view.encoder
        rows = enc.encode(["nudity"])[0][: enc.token_counts(["nudity"])[0]]  # the text's own rows, not its padding
        assert best_reachable_residual(uce, flux, names, rows) < 1e-6, view.family.name
        assert best_reachable_residual(robust, flux, names, rows) > 0.02, view.family.name


def test_flux_schnell_is_told_apart_by_its_transformer(tmp_path, capsys):
    """FLUX.1 [schnell] has no guidance embeddings: drawn with 256 T5 rows (its model card's), 4 steps, guidance 0."""
    from rece.families import family_named

    path = build_tiny_flux(tmp_path / "schnell", schnell=True)
    base = load_model(path)
    pipe = FluxPipeline.from_pretrained(path, dtype=torch.float32)
    assert base.family.name == "flux-schnell" and load_model(pipe).family is base.family
    assert family_named("flux-schnell") is base.family
    with torch.no_grad():
        rows, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=256)
    assert torch.equal(base.spaces[0].encoder.encode(PROMPTS), rows.double()) and rows.shape[1] == 256
    (tmp_path / "p.csv").write_text("prompt,evaluation_seed\na red cat,1\n")
    args = ["generate", path, "--prompts", tmp_path / "p.csv", "-o", tmp_path / "run", "--height", "32", "--width", "32"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    settings = json.loads((tmp_path / "run" / "manifest.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["max_sequence_length"]) == (4, 0.0, 256)


def test_flux_schnell_is_erased_at_both_lengths_it_is_run_with(tmp_path, capsys):
    """FluxPipeline.__call__ encodes 512 T5 rows unless told (schnell's model card passes 256), and T5 masks no padding,
    so a prompt's rows differ with the length: schnell is erased with both lengths' rows as erase / preserve pairs,
    the edit records them, `rece info` shows them, and generate and the attacks draw with the edit's first."""
    run = cli(capsys)
    path = build_tiny_flux(tmp_path / "schnell", schnell=True)
    base = load_model(path)
    context = base.spaces[0]
    pipe = FluxPipeline.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # the pipeline's own rows at its default length are the ones rece reads at 512
        assert torch.equal(context.encoder.at_length(512).encode(PROMPTS), pipe.encode_prompt(PROMPTS, prompt_2=None)[0].double())

    def residual(edit, length):
        """How far the concept's rows (from its last word on) at `length` land from the target's, edited vs original."""
        encoder, new = context.encoder.at_length(length), edit.edited_kv(base.kv)["context_embedder"].double()
        (c, t), (n_c, n_t) = encoder.encode(["nudity", " "]), encoder.token_counts(["nudity", " "])
        rows, target = cf.uce_token_rows(c, n_c, t, n_t)
        return cf.relative_residual([new], [context.kv["context_embedder"].double()], rows, target)

    exact = dict(method="uce", uce_lamb=1e-4, preserve_empty=False)  # nothing preserved: the erased rows are fit
    both, short = rece.erase(base, ["nudity"], **exact), rece.erase(base, ["nudity"], max_sequence_length=256, **exact)
    assert both.sequence_lengths == [256, 512] and short.sequence_lengths == [256]
    assert residual(both, 256) < 1e-3 and residual(both, 512) < 1e-3
    assert residual(short, 512) > 10 * residual(both, 512)  # erased at 256 alone, the 512 rows keep the concept

    (tmp_path / "p.csv").write_text("prompt,evaluation_seed\na red cat,1\n")
    for length, lengths in ((None, "256 and 512"), (512, "512")):
        edit = tmp_path / f"edit-{length}.safetensors"
        run("erase", path, "-c", "nudity", "-o", edit, *(["--max-sequence-length", length] if length else []))
        assert f"T5 rows       erased at {lengths} per prompt; rece draws with {length or 256}" in run("info", edit)
        out = tmp_path / f"run-{length}"
        run("generate", path, "--edit", edit, "--prompts", tmp_path / "p.csv", "-o", out, "--height", "32", "--width", "32")
        assert json.loads((out / "manifest.json").read_text())["settings"]["max_sequence_length"] == (length or 256)
    attack = run_attack(
        path, tmp_path / "edit-512.safetensors", "derived", tmp_path / "attack", images_per_prompt=1, progress=False
    )
    sampler = read_manifest(attack)["sampler"]
    assert load_file(attack / "adversarial.safetensors")["embeds.0"].shape[0] == 512  # c′ at the edit's length
    assert (sampler["steps"], sampler["guidance"]) == (4, 0.0)  # schnell's sampling, not SD's 50 / 7.5


def test_max_sequence_length_only_where_rows_depend_on_it(sd_path, capsys):
    out = cli(capsys)(
        "erase", sd_path, "-c", "cat", "-o", sd_path.parent / "x.safetensors", "--max-sequence-length", "77", code=2
    )
    assert "--max-sequence-length applies to FLUX.1 and SD3/SD3.5" in out and len(out.strip().splitlines()) == 1
    assert not (sd_path.parent / "x.safetensors").exists()


def test_sd3_without_t5(tmp_path, capsys):
    """The SD3 pipeline allows leaving text_encoder_3 out: its T5 rows are then zeros of context_embedder's width."""
    path = build_tiny_sd3(tmp_path / "sd3-no-t5", t5=False)
    base = load_model(path)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    with torch.no_grad():
        rows, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    context, pooled_space = base.spaces
    assert torch.equal(context.encoder.encode(PROMPTS), rows.double()) and not rows[:, 77:].any()
    assert torch.equal(pooled_space.encoder.encode(PROMPTS)[:, 0], pooled.double())
    edit = tmp_path / "e.safetensors"
    (tmp_path / "p.csv").write_text("prompt,evaluation_seed\na red cat,1\n")
    generate = ["generate", path, "--edit", edit, "--prompts", tmp_path / "p.csv", "-o", tmp_path / "run", "--steps", "2"]
    for argv in (["erase", path, "-c", "nudity", "-o", edit], generate):
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 1
