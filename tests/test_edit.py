"""Edit files: save/load, apply/revert on pipelines, applied pipeline folders, LoRA export, and bad edit files."""

import hashlib
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

import rece
from rece.errors import ReceError
from rece.models import load_model


@pytest.fixture(scope="module")
def nudity_edit(base):
    return rece.erase(base, preset="nudity")


@pytest.fixture(scope="module")
def tensor_edit(base):
    return rece.erase(base, ["cat"], technique="tensor", epochs=1)


def _kv(pipe):
    return {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


@pytest.mark.parametrize("which", ["nudity_edit", "tensor_edit"])
def test_save_load_round_trip(request, base, which, tmp_path):
    edit = request.getfixturevalue(which)
    path = edit.save(tmp_path / "edit.safetensors")
    assert not list(tmp_path.glob(".*tmp"))  # written under a temporary name, then renamed
    loaded = rece.load_edit(path)
    assert loaded.metadata == json.loads(json.dumps(edit.metadata))
    assert len(loaded.derived) == len(edit.derived)
    for name, w in base.kv.items():
        if name in edit.layers:
            a, b = loaded.edited_weight(name, w.double()), edit.edited_weight(name, w.double())
            assert ((a - b).norm() / b.norm()).item() < 1e-6  # stored in float32
    meta = loaded.metadata
    assert meta["method"] == ("rece") and meta["base"]["fingerprint"] == base.fingerprint()
    assert set(meta["versions"]) >= {"rece", "torch", "diffusers", "transformers"}
    assert meta["config"]["epochs"] == (3 if which == "nudity_edit" else 1)


def test_edit_file_is_small(nudity_edit, tmp_path):
    path = nudity_edit.save(tmp_path / "e.safetensors")
    assert path.stat().st_size < 200_000  # one 64×64 transform + derived embeddings


def test_apply_and_revert_pipeline(sd_path, nudity_edit, base):
    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    original = _kv(pipe)
    nudity_edit.apply(pipe)
    applied = _kv(pipe)
    for name, w in original.items():
        expected = (w.double() @ nudity_edit.transform).float()
        assert torch.equal(applied[name], expected)
    with pytest.raises(ReceError, match="made for base model"):
        nudity_edit.apply(pipe)  # the weights are no longer the edit's base
    nudity_edit.apply(pipe, allow_other_base=True)  # stacking is allowed on request
    nudity_edit.revert(pipe)
    nudity_edit.revert(pipe)
    for name, w in _kv(pipe).items():
        assert torch.equal(w, original[name])
    with pytest.raises(ReceError, match="not the last one applied"):
        nudity_edit.revert(pipe)


def test_applied_edit_changes_generation_and_revert_restores_it(sd_path, nudity_edit):
    pipe = StableDiffusionPipeline.from_pretrained(sd_path)

    def image():
        gen = torch.Generator().manual_seed(0)
        return pipe("nudity", num_inference_steps=2, height=16, width=16, generator=gen, output_type="np").images

    before = image()
    nudity_edit.apply(pipe)
    during = image()
    nudity_edit.revert(pipe)
    assert not (before == during).all()
    assert (image() == before).all()


def test_apply_refuses_other_base_model(tmp_path, nudity_edit):
    from rece.tiny import build_tiny_sd

    other = build_tiny_sd(tmp_path / "other", text_dim=64, seed=1)
    pipe = StableDiffusionPipeline.from_pretrained(other)
    with pytest.raises(ReceError, match="allow-other-base"):
        nudity_edit.apply(pipe)
    nudity_edit.apply(pipe, allow_other_base=True)  # a fine-tune of the same architecture


def test_write_applied_pipeline(sd_path, nudity_edit, tmp_path):
    out = rece.write_applied_pipeline(sd_path, [nudity_edit], tmp_path / "applied")
    files = sorted(p.relative_to(sd_path) for p in sd_path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    for rel in files:
        if str(rel) != unet_file:
            assert hashlib.sha256((sd_path / rel).read_bytes()).digest() == hashlib.sha256((out / rel).read_bytes()).digest()
    before, after = load_file(sd_path / unet_file), load_file(out / unet_file)
    assert before.keys() == after.keys()
    for key in before:
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            expected = (before[key].double() @ nudity_edit.transform).to(before[key].dtype)
            assert torch.equal(after[key], expected) and after[key].dtype == before[key].dtype
        else:
            assert torch.equal(before[key], after[key])
    pipe = StableDiffusionPipeline.from_pretrained(out)  # diffusers loads it as is
    assert load_model(pipe).fingerprint() != nudity_edit.base_fingerprint
    with pytest.raises(ReceError, match="already exists"):
        rece.write_applied_pipeline(sd_path, [nudity_edit], out)


def test_lora_export_loads_in_diffusers_and_reproduces_edit(sd_path, base, tensor_edit, tmp_path):
    path = tmp_path / "lora.safetensors"
    tolerance = 1e-3
    state = tensor_edit.to_lora(base, path, tolerance=tolerance)
    rank = state[next(iter(state))].shape[0]
    assert rank < base.dim  # low rank
    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe.load_lora_weights(str(path))
    modules = dict(pipe.unet.named_modules())
    x = torch.randn(7, base.dim, generator=torch.Generator().manual_seed(0))
    for name, w in base.kv.items():
        want = x @ tensor_edit.edited_weight(name, w).T
        got = modules[name](x)
        assert ((got - want).norm() / want.norm()).item() < 3 * tolerance
    # a lower rank cap costs accuracy
    capped = tensor_edit.to_lora(base, tolerance=tolerance, max_rank=2)
    assert capped[next(iter(capped))].shape[0] == 2


def test_sdxl_erase_apply_and_revert(sdxl_path, tmp_path):
    edit = rece.erase(sdxl_path, ["nudity"], preset="nudity")
    assert edit.metadata["base"]["pipeline"] == "sdxl" and edit.metadata["base"]["dim"] == 80
    path = edit.save(tmp_path / "xl.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    original = _kv(pipe)
    rece.load_edit(path).apply(pipe)
    changed = _kv(pipe)
    assert all(not torch.equal(changed[n], original[n]) for n in original)
    gen = torch.Generator().manual_seed(0)
    pipe("nudity", num_inference_steps=2, height=16, width=16, generator=gen, output_type="np")


@pytest.mark.parametrize("kind", ["missing", "garbage", "not-an-edit", "lora", "nan", "incomplete"])
def test_bad_edit_files(nudity_edit, tmp_path, kind):
    path = tmp_path / "bad.safetensors"
    if kind == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif kind == "not-an-edit":
        save_file({"x": torch.zeros(2)}, path)
    elif kind == "lora":
        save_file({"unet.a.lora_A.weight": torch.zeros(2, 2)}, path, metadata={"format": "pt"})
    elif kind in ("nan", "incomplete"):
        nudity_edit.save(path)
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        if kind == "nan":
            tensors["transform.delta"][0, 0] = float("nan")
        else:
            del tensors["transform.delta"]
        save_file(tensors, path, metadata=meta)
    message = {
        "missing": "does not exist",
        "garbage": "corrupt or not a safetensors file",
        "not-an-edit": "not a rece edit",
        "lora": "not a rece edit",
        "nan": "NaN/Inf",
        "incomplete": "not a complete rece edit",
    }[kind]
    with pytest.raises(ReceError, match=message) as info:
        rece.load_edit(path)
    assert "\n" not in str(info.value)
