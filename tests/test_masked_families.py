"""Families whose cross-attention reads projected rows and masks the padding: PixArt-Σ (T5 rows through
caption_projection) and Sana (Gemma-2 rows, instruction prefix and select_index, through caption_projection and
caption_norm), each as a tiny random pipeline with a locally made tokenizer (rece.tiny_dit)."""

import json
from dataclasses import dataclass

import pytest
import torch
from diffusers import PixArtSigmaPipeline, SanaPipeline
from safetensors.torch import load_file

import rece
from rece import closed_form as cf
from rece.config import PAIRINGS
from rece.families.pixart import PIXART_SIGMA
from rece.families.sana import INSTRUCTION, SANA
from rece.models import load_model
from rece.tiny_dit import build_tiny_pixart, build_tiny_sana

from .family_checks import assert_cli_erase_info_apply, assert_only_edited_layers_change, built_case, cli, fused_lora_weights
from .reference import best_reachable_residual, reference_erase

PROMPTS = ["a red cat", "Nudity", "", " ", "A photo of Van Gogh starry night"]


@dataclass(frozen=True)
class Case:
    family: object
    build: object
    pipeline: type
    encode: dict  # what the pipeline's __call__ passes to encode_prompt
    guidance: float

    def projected(self, pipe, embeds):
        rows = pipe.transformer.caption_projection(embeds)
        return pipe.transformer.caption_norm(rows) if hasattr(pipe.transformer, "caption_norm") else rows


CASES = {
    "pixart-sigma": Case(PIXART_SIGMA, build_tiny_pixart, PixArtSigmaPipeline, {"clean_caption": False}, 4.5),
    "sana": Case(
        SANA, build_tiny_sana, SanaPipeline, {"clean_caption": False, "complex_human_instruction": list(INSTRUCTION)}, 4.5
    ),
}


case = built_case(CASES)


@pytest.fixture(scope="module")
def model(case):
    return load_model(case[1])


def test_rows_are_what_the_pipeline_feeds_to_cross_attention(case, model):
    c, path = case
    pipe = c.pipeline.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # as the pipeline's __call__ runs
        embeds, mask, *_ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, **c.encode)
        theirs = c.projected(pipe, embeds)
    for base in (model, load_model(pipe)):
        assert base.family is c.family and base.kind == c.family.name
        assert torch.equal(base.encoder.encode(PROMPTS), theirs.double())
        assert base.encoder.token_counts(PROMPTS) == mask.sum(dim=1).tolist()
    assert model.dim == theirs.shape[-1] and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in model.kv)


def test_rece_equals_the_reference_on_attended_rows(model):
    edit = rece.erase(model, ["nudity"], preserve=["a red cat"], epochs=2)  # the defaults: unshared pairing, UCE rows
    encoder = model.encoder
    expected = reference_erase(
        model.kv, lambda t: encoder.encode([t])[0], lambda t: encoder.token_counts([t])[0], ["nudity"],
        preserve=["a red cat"], epochs=2, masked=True, end_rows=model.family.end_rows, pairing="unshared",
        ids=lambda t: encoder.attended_ids([t])[0], uce_rows="unshared",
    )  # fmt: skip
    ours = edit.edited_kv(model.kv)
    for name, w in expected.items():
        assert (ours[name].double() - w).norm() / w.norm() < 1e-5, name
    attended = encoder.token_counts(["nudity"])[0]
    assert edit.derived[0].shape == (1, 300, model.dim) and edit.derived[0][0, :attended].abs().sum() > 0
    assert not edit.derived[0][0, attended:].any()  # c′ has the concept's attended rows only


@pytest.mark.parametrize("pairing", ["position", "attended", "unshared"])
def test_each_pairing_of_rece_equals_the_reference(model, pairing):
    encoder = model.encoder
    concepts, preserve = ["nudity", "a red dog"], ["a red cat"]
    edit = rece.erase(model, concepts, preserve=preserve, epochs=2, pairing=pairing)
    expected = reference_erase(
        model.kv, lambda t: encoder.encode([t])[0], lambda t: encoder.token_counts([t])[0], concepts, preserve=preserve,
        epochs=2, masked=True, end_rows=model.family.end_rows, pairing=pairing, ids=lambda t: encoder.attended_ids([t])[0],
        uce_rows="unshared",
    )  # fmt: skip
    ours = edit.edited_kv(model.kv)
    for name, w in expected.items():
        assert (ours[name].double() - w).norm() / w.norm() < 1e-5, name
    assert edit.metadata["config"]["pairing"] == edit.metadata["pairing"] == pairing
    assert f"λ2 0.1, pairing {pairing}" in edit.summary()  # rece info says it


def test_the_pairings_differ_and_a_fully_shared_concept_gets_no_rece_update(model):
    name = next(iter(model.kv))
    kv = {p: rece.erase(model, ["a red dog"], preserve=["a red cat"], pairing=p).edited_kv(model.kv)[name] for p in PAIRINGS}
    assert not torch.allclose(kv["position"], kv["attended"]) and not torch.allclose(kv["position"], kv["unshared"])
    # every token of "a red" is in "a red cat": unshared pairing leaves RECE nothing to erase, the edit is UCE's
    uce = rece.erase(model, ["a red"], preserve=["a red cat"], method="uce").edited_kv(model.kv)[name]
    assert torch.allclose(rece.erase(model, ["a red"], preserve=["a red cat"], pairing="unshared").edited_kv(model.kv)[name], uce)


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_uce_rows_unshared_equals_the_reference_and_adds_only_the_words_before_the_slice(model, method):
    encoder = model.encoder
    concepts, preserve = ["a blue dog", "a red dog"], ["a red cat"]
    edit = rece.erase(model, concepts, preserve=preserve, epochs=2, method=method)  # the default: unshared
    expected = reference_erase(
        model.kv, lambda t: encoder.encode([t])[0], lambda t: encoder.token_counts([t])[0], concepts, preserve=preserve,
        epochs=2, masked=True, end_rows=model.family.end_rows, pairing="unshared", method=method,
        ids=lambda t: encoder.attended_ids([t])[0], uce_rows="unshared",
    )  # fmt: skip
    ours = edit.edited_kv(model.kv)
    for name, w in expected.items():
        assert (ours[name].double() - w).norm() / w.norm() < 1e-5, name
    assert edit.metadata["uce_rows"] == "unshared" and "technique replace, rows unshared" in edit.summary()
    # "blue" precedes UCE's slice (from "dog") and no preserved text has it: the edit changes
    name = next(iter(model.kv))
    last = rece.erase(model, concepts, preserve=preserve, epochs=2, method=method, uce_rows="last").edited_kv(model.kv)[name]
    assert not torch.allclose(ours[name], last)
    # every word of "a red dog" before "dog" is in "a red cat": nothing to add, the edit is UCE's slice alone
    same = [rece.erase(model, ["a red dog"], preserve=preserve, method=method, uce_rows=r).edited_kv(model.kv)[name]
            for r in ("last", "unshared")]  # fmt: skip
    assert torch.equal(same[0], same[1])
    with pytest.raises(rece.ReceError, match="unknown UCE rows 'all'; choose one of: last, unshared"):
        rece.erase(model, ["a red dog"], uce_rows="all")


def test_attended_ids_are_the_tokens_of_the_attended_rows(case, model):
    c, path = case
    texts = ["A red cat", " ", "nudity"]
    ids = model.encoder.attended_ids(texts)
    assert [len(i) for i in ids] == model.encoder.token_counts(texts)
    tokenizer = model.encoder.tokenizers[0]
    for text, got in zip(texts, ids):
        assert tokenizer.decode(got, skip_special_tokens=True).strip() == text.lower().strip()


def test_uce_maps_the_concept_and_rece_undoes_the_derived_embedding(model):
    names = list(model.kv)
    w0 = [model.kv[n].double() for n in names]
    uce = rece.erase(model, ["nudity"], method="uce")
    rc = rece.erase(model, ["nudity"], epochs=1, regularization=1e-3)
    w_uce = [uce.edited_kv(model.kv)[n].double() for n in names]
    w_rece = [rc.edited_kv(model.kv)[n].double() for n in names]
    enc = model.encoder
    (c, t), (n_c, n_t) = enc.encode(["nudity", " "]), enc.token_counts(["nudity", " "])
    rows, target = cf.attended_token_rows(c, n_c, t, n_t, model.family.end_rows)
    assert cf.relative_residual(w_uce, w0, rows, target) < 0.6 * cf.relative_residual(w0, w0, rows, target)
    # with nothing preserved and a small λ the closed form maps the erased rows onto the target's exactly
    exact = rece.erase(model, ["nudity"], method="uce", uce_lamb=1e-4, preserve_empty=False)
    w_exact = [exact.edited_kv(model.kv)[n].double() for n in names]
    assert cf.relative_residual(w_exact, w0, rows, target) < 1e-3
    derived = cf.derive_against(c[:n_c], w_uce, w0, 1e-3, None)  # the embedding that brings the concept back after UCE
    after_uce = cf.relative_residual(w_uce, w0, derived, c[:n_c])
    assert after_uce < 0.05  # it reproduces the original keys and values on the UCE model ...
    assert cf.relative_residual(w_rece, w0, derived, c[:n_c]) > 10 * after_uce  # ... and RECE erased it


def test_only_cross_attention_changes_apply_reverts_and_lora_loads_with_peft(case, model, tmp_path):
    edit = rece.erase(model, ["nudity"])
    pipe = case[0].pipeline.from_pretrained(case[1], dtype=torch.float32)
    assert_only_edited_layers_change(edit, pipe, model.kv)

    state = edit.to_lora(model, tmp_path / "lora.safetensors", tolerance=1e-6)
    assert set(load_file(tmp_path / "lora.safetensors")) == set(state)
    assert all(k.startswith("transformer.") and ".attn2.to_" in k for k in state)
    # Sana: the pipeline's own load_lora_weights; PixArt pipelines have none: peft loads it (docs/families.md)
    fused, new = fused_lora_weights(pipe, tmp_path / "lora.safetensors", state, edit.layers), edit.edited_kv(model.kv)
    for name in edit.layers:
        assert (fused[name] - new[name]).norm() / new[name].norm() < 1e-4


def test_cli_erase_info_apply_generate(capsys, case, tmp_path):
    c, path = case
    run = cli(capsys)
    edit = assert_cli_erase_info_apply(run, path, c.family.name, tmp_path)
    (tmp_path / "p.csv").write_text("prompt,evaluation_seed\na red cat,1\nnudity,2\n")
    out = run("generate", path, "--edit", edit, "--prompts", tmp_path / "p.csv", "-o", tmp_path / "run", "--steps", "2")
    assert "2 of 2 images" in out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["settings"]["pipeline"] == c.pipeline.__name__ and manifest["settings"]["guidance"] == c.guidance
    assert manifest["settings"]["steps"] == 2 and c.family.steps == 20
    out = run("erase", path, "-c", "nudity", "--method", "robust", "--preserve", "a red cat", "-o", tmp_path / "r.safetensors")
    assert "robust        rank" in out and (tmp_path / "r.safetensors").is_file()


def test_robust_mode_leaves_no_embedding_that_brings_the_concept_back(model):
    """UCE's edit is invertible in every space (some embedding gives the original outputs back); robust mode's is not."""
    uce = rece.erase(model, ["nudity"], method="uce", preserve=["a red cat", "a photo of a dog"])
    robust = rece.erase(model, ["nudity"], method="robust", preserve=["a red cat", "a photo of a dog"])
    assert robust.metadata["robust"]["rank"] >= 1 and "fresh_residual" in robust.metadata["robust"]
    for view in model.spaces or [model]:
        names, enc = list(view.kv), view.encoder
        rows = enc.encode(["nudity"])[0][: enc.token_counts(["nudity"])[0] if view.family.masks_padding else None]
        assert best_reachable_residual(uce, model, names, rows) < 1e-6, view.family.name
        assert best_reachable_residual(robust, model, names, rows) > 0.02, view.family.name


def test_pairing_leaves_a_model_that_does_not_mask_padding_as_the_paper_does(base):
    name = next(iter(base.kv))
    edits = [rece.erase(base, ["nudity"], preserve=["a red cat"], pairing=p).edited_kv(base.kv)[name] for p in PAIRINGS]
    assert all(torch.equal(edits[0], e) for e in edits[1:])
    assert "pairing" not in rece.erase(base, ["nudity"]).metadata  # SD's pairing: nothing to say
    uce_rows = [rece.erase(base, ["a blue dog"], preserve=["a red cat"], uce_rows=r).edited_kv(base.kv)[name]
                for r in ("last", "unshared")]  # fmt: skip
    assert torch.equal(uce_rows[0], uce_rows[1])  # UCE's slice as the paper's code takes it
    with pytest.raises(rece.ReceError, match="unknown pairing 'rows'; choose one of: position, attended, unshared"):
        rece.erase(base, ["nudity"], pairing="rows")
