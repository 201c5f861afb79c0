"""Original-format (LDM) single-file checkpoints: loading through diffusers offline, erase and apply from the CLI."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from rece.cli import main
from rece.edit import load_edit
from rece.errors import ReceError
from rece.families import SD
from rece.models import load_model

from .ldm_checkpoint import save_ldm_checkpoint

PROMPTS = ["cat", "a photo of a dog", ""]


@pytest.fixture(scope="module")
def ckpt(sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD pipeline written as one LDM-format `.safetensors` checkpoint."""
    return save_ldm_checkpoint(sd_path, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module, name: str) -> None:
    """Same parameter/buffer names and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{name}: {sorted(set(sa) ^ set(sb))[:5]}"
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{name}: {different[:5]}"


def test_checkpoint_has_ldm_layout(ckpt: Path) -> None:
    """Every key sits under one of the three LDM prefixes, with SD1.x's marker keys present."""
    keys = set(load_file(ckpt))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert {p for p in prefixes if any(k.startswith(p) for k in keys)} == set(prefixes)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in keys  # downsampler of level 0 (layers_per_block=1)
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in keys  # upsampler after a cross-attention block


def test_diffusers_round_trip_is_exact(sd_path: Path, ckpt: Path, tmp_path: Path) -> None:
    """diffusers' own single-file loader turns the checkpoint back into the folder's exact weights."""
    original = StableDiffusionPipeline.from_pretrained(sd_path, dtype=torch.float32)
    loaded = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(sd_path), dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(loaded, name), getattr(original, name), name)

    # the weights come from the checkpoint, not the config folder: a folder with configs only works the same
    configs_only = tmp_path / "configs"
    shutil.copytree(sd_path, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    loaded = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(configs_only), dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(loaded, name), getattr(original, name), name)


def test_load_model_matches_folder(sd_path: Path, ckpt: Path, base) -> None:
    """A single-file base model is the same model as its diffusers folder: fingerprint, K/V weights, prompt embeddings."""
    single = load_model(ckpt, config=str(sd_path))
    assert single.source == str(ckpt) and single.kind == "sd" and single.folder is None
    assert single.fingerprint() == base.fingerprint()
    assert list(single.kv) == list(base.kv) and len(single.kv) == 14
    for name, w in base.kv.items():
        assert torch.equal(single.kv[name], w), name
    assert torch.equal(single.encoder.encode(PROMPTS), base.encoder.encode(PROMPTS))


def test_cli_erase_and_apply_single_file(capsys, sd_path: Path, ckpt: Path, base, tmp_path: Path) -> None:
    """`rece erase` / `rece apply` on a checkpoint: same base fingerprint, and a loadable pipeline with the edit applied."""
    out = tmp_path / "cat.safetensors"
    code = main(["erase", str(ckpt), "--config", str(sd_path), "-c", "cat", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    edit = load_edit(out)
    assert edit.base_fingerprint == base.fingerprint() and edit.concepts == ["cat"]

    applied = tmp_path / "applied"
    code = main(["apply", str(ckpt), str(out), "--config", str(sd_path), "-o", str(applied)])
    assert code == 0, capsys.readouterr().err
    pipe = StableDiffusionPipeline.from_pretrained(applied, dtype=torch.float32)
    modules = dict(pipe.unet.named_modules())
    expected = edit.edited_kv(base.kv)
    assert set(expected) == set(edit.layers) and expected
    for name, w in expected.items():
        assert torch.equal(modules[name].weight, w), name
        assert not torch.equal(w, base.kv[name]), name

    # everything else is the original model, bit for bit
    original = load_file(sd_path / "unet" / "diffusion_pytorch_model.safetensors")
    state = pipe.unet.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original if not SD.is_edited_weight(k))
    reference = StableDiffusionPipeline.from_pretrained(sd_path, dtype=torch.float32)
    _assert_same_state(pipe.text_encoder, reference.text_encoder, "text_encoder")
    _assert_same_state(pipe.vae, reference.vae, "vae")


def test_not_a_checkpoint_is_a_one_line_error(capsys, sd_path: Path, tmp_path: Path) -> None:
    """A `.safetensors` file without a Stable Diffusion model in it fails with one line, from the API and the CLI."""
    bogus = tmp_path / "bogus.safetensors"
    save_file({"x": torch.zeros(3)}, bogus)
    with pytest.raises(ReceError) as info:
        load_model(bogus, config=str(sd_path))
    message = str(info.value)
    assert "\n" not in message and str(bogus) in message

    out = tmp_path / "edit.safetensors"
    code = main(["erase", str(bogus), "--config", str(sd_path), "-c", "cat", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("error: ") and err.count("\n") == 1
