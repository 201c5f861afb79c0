"""PixArt-Σ through the family seam: T5 rows after caption_projection, masked padding, every attn2.to_k / to_v.

A tiny random PixArtSigmaPipeline with a locally made T5 tokenizer (rece.tiny_dit) stands in for the real one.
"""

import json

import pytest
import torch
from diffusers import PixArtSigmaPipeline
from safetensors.torch import load_file

import rece
from rece import closed_form as cf
from rece.cli import main
from rece.families.pixart import PIXART_SIGMA
from rece.models import load_model
from rece.tiny_dit import build_tiny_pixart

from .reference import reference_erase

PROMPTS = ["a red cat", "nudity", "", " ", "a photo of van gogh starry night"]


@pytest.fixture(scope="module")
def pixart_path(tmp_path_factory):
    return build_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart")


@pytest.fixture(scope="module")
def pixart_base(pixart_path):
    return load_model(pixart_path)


def pipeline(path) -> PixArtSigmaPipeline:
    return PixArtSigmaPipeline.from_pretrained(path, dtype=torch.float32)


def test_rows_are_what_the_pipeline_feeds_to_cross_attention(pixart_path, pixart_base):
    pipe = pipeline(pixart_path)
    with torch.no_grad():  # as the pipeline's __call__ runs
        embeds, mask, *_ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clean_caption=False)
        theirs = pipe.transformer.caption_projection(embeds)
    for base in (pixart_base, load_model(pipe)):
        assert base.family is PIXART_SIGMA and base.kind == "pixart-sigma"
        assert torch.equal(base.encoder.encode(PROMPTS), theirs.double())
        assert base.encoder.token_counts(PROMPTS) == mask.sum(dim=1).tolist()
    assert pixart_base.dim == theirs.shape[-1] and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in pixart_base.kv)


def test_rece_equals_the_reference_on_attended_rows(pixart_base):
    edit = rece.erase(pixart_base, ["nudity"], preserve=["a red cat"], epochs=2)
    encoder = pixart_base.encoder
    expected = reference_erase(
        pixart_base.kv, lambda t: encoder.encode([t])[0], lambda t: encoder.token_counts([t])[0], ["nudity"],
        preserve=["a red cat"], epochs=2, masked=True,
    )  # fmt: skip
    ours = edit.edited_kv(pixart_base.kv)
    for name, w in expected.items():
        assert (ours[name].double() - w).norm() / w.norm() < 1e-5, name
    assert edit.derived[0].shape == (1, 300, pixart_base.dim) and not edit.derived[0][0, 2:].any()  # c′ of 2 attended rows


def test_uce_maps_the_concept_and_rece_undoes_the_derived_embedding(pixart_base):
    names = list(pixart_base.kv)
    w0 = [pixart_base.kv[n].double() for n in names]
    uce = rece.erase(pixart_base, ["nudity"], method="uce")
    rc = rece.erase(pixart_base, ["nudity"], epochs=1)
    w_uce = [uce.edited_kv(pixart_base.kv)[n].double() for n in names]
    w_rece = [rc.edited_kv(pixart_base.kv)[n].double() for n in names]
    enc = pixart_base.encoder
    (c, t), (n_c, n_t) = enc.encode(["nudity", " "]), enc.token_counts(["nudity", " "])
    rows, target = cf.attended_token_rows(c, n_c, t, n_t)
    assert cf.relative_residual(w_uce, w0, rows, target) < 0.4 * cf.relative_residual(w0, w0, rows, target)
    derived = cf.derive_against(c[:n_c], w_uce, w0, 0.1, None)  # the embedding that brings the concept back after UCE
    after_uce = cf.relative_residual(w_uce, w0, derived, c[:n_c])
    assert after_uce < cf.relative_residual(w_uce, w0, c[:n_c], c[:n_c])
    assert cf.relative_residual(w_rece, w0, derived, c[:n_c]) > 2 * after_uce  # RECE erased that c′


def test_only_cross_attention_changes_apply_reverts_and_lora_loads_with_peft(pixart_path, pixart_base, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    edit = rece.erase(pixart_base, ["nudity"])
    pipe = pipeline(pixart_path)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    edit.apply(pipe)
    after = pipe.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {n + ".weight" for n in pixart_base.kv}
    edit.revert(pipe)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())

    state = edit.to_lora(pixart_base, tmp_path / "lora.safetensors", tolerance=1e-6)
    assert set(load_file(tmp_path / "lora.safetensors")) == set(state)
    assert all(k.startswith("transformer.") and ".attn2.to_" in k for k in state)
    rank = next(iter(state.values())).shape[0]  # PixArt pipelines have no load_lora_weights: peft loads it
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=edit.layers), pipe.transformer)
    set_peft_model_state_dict(pipe.transformer, {k.removeprefix("transformer."): v for k, v in state.items()})
    modules, new = dict(pipe.transformer.named_modules()), edit.edited_kv(pixart_base.kv)
    for name in edit.layers:
        modules[name].merge()
        assert (modules[name].base_layer.weight - new[name]).norm() / new[name].norm() < 1e-4


def test_cli_erase_info_apply_generate(capsys, pixart_path, tmp_path):
    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    edit = tmp_path / "nudity.safetensors"
    run("erase", pixart_path, "--preset", "nudity", "-o", edit)
    assert "pixart-sigma" in run("info", edit)
    run("apply", pixart_path, edit, "-o", tmp_path / "applied")
    applied, expected = load_model(tmp_path / "applied").kv, rece.load_edit(edit).edited_kv(load_model(pixart_path).kv)
    assert all(torch.equal(applied[n], w) for n, w in expected.items())
    (tmp_path / "p.csv").write_text("prompt,evaluation_seed\na red cat,1\nnudity,2\n")
    out = run("generate", pixart_path, "--edit", edit, "--prompts", tmp_path / "p.csv", "-o", tmp_path / "run", "--steps", "2")
    assert "2 of 2 images" in out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["settings"]["pipeline"] == "PixArtSigmaPipeline" and manifest["settings"]["guidance"] == 4.5
    with pytest.raises(rece.ReceError, match="robust does not support pixart-sigma"):
        rece.erase(load_model(pixart_path), ["nudity"], method="robust")
