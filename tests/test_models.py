"""Model access: folders, pipelines, fingerprints, and every way a model path can be wrong."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from rece.errors import ReceError
from rece.models import load_model
from rece.weights import kv_fingerprint


def test_fast_reader_matches_full_unet(sd_path, base):
    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    modules = dict(unet.named_modules())
    expected = [n for n in modules if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert list(base.kv) == sorted(expected) and len(expected) == 14
    for name, w in base.kv.items():
        assert torch.equal(w, modules[name].weight)


def test_pipeline_object_gives_same_model(sd_path, base):
    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    from_pipe = load_model(pipe)
    assert from_pipe.fingerprint() == base.fingerprint()
    assert torch.equal(from_pipe.encoder.encode(["cat"]), base.encoder.encode(["cat"]))


def test_fingerprint_ignores_fp32_vs_fp16_but_not_other_weights(base):
    half = {n: w.half() for n, w in base.kv.items()}
    assert kv_fingerprint(half) == base.fingerprint()
    other = dict(base.kv)
    name = next(iter(other))
    other[name] = other[name] + 0.01
    assert kv_fingerprint(other) != base.fingerprint()


def test_fp16_variant_and_sharded_unet(sd_path, tmp_path):
    variant = tmp_path / "variant"
    shutil.copytree(sd_path, variant)
    (variant / "unet" / "diffusion_pytorch_model.safetensors").rename(
        variant / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    )
    assert load_model(variant).fingerprint() == load_model(sd_path).fingerprint()

    sharded = tmp_path / "sharded"
    shutil.copytree(sd_path, sharded)
    state = load_file(sharded / "unet" / "diffusion_pytorch_model.safetensors")
    (sharded / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, sharded / "unet" / name)
        weight_map.update({k: name for k in part})
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert load_model(sharded).fingerprint() == load_model(sd_path).fingerprint()


def _break(sd_path, tmp_path, how):
    broken = tmp_path / "broken"
    shutil.copytree(sd_path, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    if how == "no-cross-attention":
        state = {k: v for k, v in state.items() if "attn2" not in k}
    elif how == "nan":
        key = next(k for k in state if k.endswith("attn2.to_k.weight"))
        state[key][0, 0] = float("nan")
    save_file(state, weights)
    return broken


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda sd, tmp: tmp / "missing", "does not exist"),
        (lambda sd, tmp: tmp, "not a diffusers pipeline"),
        (lambda sd, tmp: _break(sd, tmp, "no-cross-attention"), "no cross-attention"),
        (lambda sd, tmp: _break(sd, tmp, "nan"), "NaN/Inf"),
        (lambda sd, tmp: (tmp / "notes.txt").write_text("hi") and tmp / "notes.txt", "not a diffusers folder"),
    ],
    ids=["missing", "not-diffusers", "no-cross-attention", "nan-weights", "plain-file"],
)
def test_bad_model_paths(sd_path, tmp_path, make, message):
    with pytest.raises(ReceError, match=message) as info:
        load_model(make(sd_path, tmp_path))
    assert "\n" not in str(info.value)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ReceError, match="cannot fetch 'someone/not-a-model' from the hub"):
        load_model("someone/not-a-model")


def test_corrupt_unet_file(sd_path, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(sd_path, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ReceError, match="corrupt or incomplete"):
        load_model(broken)


def test_hub_id_path_with_a_local_stand_in_for_the_hub(sd_path, tmp_path, monkeypatch):
    """The hub code path (partial download for erase, full snapshot for apply), served from a local folder."""
    import fnmatch

    import huggingface_hub

    import rece

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        target = tmp_path / "hub" / repo_id.replace("/", "--") / ("partial" if allow_patterns else "full")
        for file in sd_path.rglob("*"):
            rel = str(file.relative_to(sd_path))
            if file.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_bytes(file.read_bytes())
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    base = load_model("someone/tiny-sd")
    assert base.source == "someone/tiny-sd" and base.fingerprint() == load_model(sd_path).fingerprint()
    assert not (base.folder / "vae").exists()  # erase reads only what it needs
    edit = rece.erase(base, ["cat"])
    out = rece.write_applied_pipeline(base, [edit], tmp_path / "applied")
    assert (out / "vae" / "config.json").is_file() and calls[-1][1] is None  # apply fetched the whole pipeline
    StableDiffusionPipeline.from_pretrained(out)


@pytest.mark.parametrize("layout", ["plain", "prefixed-fp16", "sharded"])
def test_mapped_text_encoder_equals_from_pretrained(sd_path, tmp_path, layout):
    """The mapped loader computes exactly what the float32 model from_pretrained builds does, without making a
    float32 copy of half-precision weights."""
    from transformers import CLIPTextModel

    from rece.text_encoders import Float32Cast, mapped_text_encoder

    folder = tmp_path / "text_encoder"
    reference = CLIPTextModel.from_pretrained(sd_path, subfolder="text_encoder", dtype=torch.float32)
    variant = None
    if layout == "plain":
        shutil.copytree(sd_path / "text_encoder", folder)
    elif layout == "sharded":
        reference.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:  # the layout of the SD1.x releases: keys under `text_model.`, weights in half precision
        variant = "fp16"
        folder.mkdir()
        shutil.copy(sd_path / "text_encoder" / "config.json", folder)
        state = {f"text_model.{k}": v.half().contiguous() for k, v in reference.state_dict().items()}
        save_file(state, folder / "model.fp16.safetensors")
        reference = CLIPTextModel.from_pretrained(folder, variant="fp16", dtype=torch.float32)
    mapped = mapped_text_encoder(folder, CLIPTextModel, variant)
    assert mapped is not None
    modules = dict(mapped.named_modules())
    for name, module in reference.named_modules():
        for key in ("weight", "bias"):
            want = getattr(module, key, None) if isinstance(getattr(module, key, None), torch.Tensor) else None
            if want is not None:
                got = getattr(modules[name], key)
                assert got.dtype == want.dtype == torch.float32 or name.endswith("token_embedding"), (name, key)
                assert torch.equal(got.float(), want), (name, key)
    for name, buffer in reference.named_buffers():
        assert torch.equal(mapped.get_buffer(name), buffer), name
    table = mapped.get_input_embeddings()
    casts = [m for m in mapped.modules() if isinstance(m, Float32Cast)]
    if layout == "prefixed-fp16":  # half-precision weights stay as stored; only their use is in float32
        assert table.weight.dtype == torch.float16 and len(casts) == sum(isinstance(m, torch.nn.Linear) for m in mapped.modules())
    else:
        assert table.weight.dtype == torch.float32 and not casts
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert table(ids).dtype == torch.float32
        assert torch.equal(mapped.eval()(ids)[0], reference.eval()(ids)[0])


def test_mapped_text_encoder_falls_back_when_tensors_are_missing(sd_path, tmp_path):
    from transformers import CLIPTextModel

    from rece.text_encoders import mapped_text_encoder

    folder = tmp_path / "text_encoder"
    shutil.copytree(sd_path / "text_encoder", folder)
    state = load_file(folder / "model.safetensors")
    state.pop(next(k for k in state if "final_layer_norm" in k))
    save_file(state, folder / "model.safetensors")
    assert mapped_text_encoder(folder, CLIPTextModel, None) is None


def test_original_gram_is_cached_and_checked(sd_path, tmp_path, monkeypatch):
    import rece.closed_form as cf
    from rece.gram_cache import gram_cache_file

    monkeypatch.setenv("RECE_CACHE", str(tmp_path))
    first = load_model(sd_path)
    exact = cf.weight_gram(first.kv.values())
    assert torch.equal(first.original_gram(), exact)
    path = gram_cache_file(first)
    assert path.is_file() and path.parent == tmp_path / "grams"

    def no_gram(weights):
        raise AssertionError("the gram was multiplied out again")

    monkeypatch.setattr(cf, "weight_gram", no_gram)
    assert torch.equal(load_model(sd_path).original_gram(), exact)  # read from the cache
    monkeypatch.undo()
    monkeypatch.setenv("RECE_CACHE", str(tmp_path))
    # a cache that does not match the weights (same name, other numbers) or is damaged is recomputed, never used
    from rece.gram_cache import gram_checksum

    save_file({"gram": exact * (1 + 1e-6)}, str(path))  # no checksum, or one of other bytes: damaged
    assert torch.equal(load_model(sd_path).original_gram(), exact)
    save_file({"gram": exact * (1 + 1e-6)}, str(path), metadata={"crc32": gram_checksum(exact)})
    assert torch.equal(load_model(sd_path).original_gram(), exact)
    other = exact * (1 + 1e-3)  # intact, but another model's numbers: the probe against the weights refuses it
    save_file({"gram": other}, str(path), metadata={"crc32": gram_checksum(other)})
    assert torch.equal(load_model(sd_path).original_gram(), exact)
    path.write_bytes(b"not safetensors")
    assert torch.equal(load_model(sd_path).original_gram(), exact)
    assert torch.equal(load_file(str(path))["gram"], exact)  # and rewritten
    # fp32 and fp16 releases share a fingerprint but not a cache entry
    assert gram_cache_file(load_model(sd_path)) != gram_cache_file(
        load_model(StableDiffusionPipeline.from_pretrained(sd_path).to(torch.float16))
    )


def test_gram_cache_can_be_turned_off(sd_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RECE_CACHE", str(tmp_path))
    monkeypatch.setenv("RECE_GRAM_CACHE", "0")
    load_model(sd_path).original_gram()
    assert not (tmp_path / "grams").exists()
