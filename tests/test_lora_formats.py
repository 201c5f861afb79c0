"""kohya LoRAs and `.diff` files for ComfyUI / Automatic1111 / Forge, and a LoRA made on a base used on a fine-tune."""

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from rece.cli import main
from rece.edit import load_edit
from rece.errors import ReceError
from rece.families import FLUX, SANA, SDXL
from rece.lora import denoiser_config, kohya_modules
from rece.models import load_model

PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def edits(sd_path, sdxl_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    out = {}
    for name, folder in (("sd", sd_path), ("sdxl", sdxl_path)):
        path = root / f"{name}.safetensors"
        assert main(["erase", str(folder), "-c", "cat", "--preset", "nudity", "-o", str(path)]) == 0
        out[name] = (folder, path)
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_lora_loads_in_diffusers_and_fuses_to_the_edit(family, edits, tmp_path, capsys):
    folder, edit_path = edits[family]
    lora = tmp_path / "kohya.safetensors"
    code = main(["lora", str(folder), str(edit_path), "--format", "kohya", "--tolerance", "1e-6", "-o", str(lora)])
    assert code == 0, capsys.readouterr().err
    assert "this is for ComfyUI" not in capsys.readouterr().out  # SD1/SDXL kohya LoRAs load in diffusers too
    state = load_file(lora)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)
    blocks = ("input_blocks", "output_blocks", "middle_block") if family == "sdxl" else ("down_blocks", "up_blocks", "mid_block")
    assert all(any(f"_{b}_" in k for b in blocks) for k in state)  # SGM names for SDXL, diffusers' for SD1
    assert len({v.item() for k, v in state.items() if k.endswith(".alpha")}) == 1

    edit = load_edit(edit_path)
    expected = edit.apply(PIPELINES[family].from_pretrained(folder, dtype=torch.float32))
    pipe = PIPELINES[family].from_pretrained(folder, dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    modules, want = dict(pipe.unet.named_modules()), dict(expected.unet.named_modules())
    for name in edit.layers:
        assert _relative(modules[name].weight, want[name].weight) <= 1e-4, name


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_diff_file_holds_the_exact_change_under_the_kohya_names(family, edits, tmp_path):
    folder, edit_path = edits[family]
    kohya, diff = tmp_path / "kohya.safetensors", tmp_path / "diff.safetensors"
    assert main(["lora", str(folder), str(edit_path), "--format", "kohya", "-o", str(kohya)]) == 0
    assert main(["lora", str(folder), str(edit_path), "--format", "diff", "-o", str(diff)]) == 0
    names = {k.rsplit(".", 2)[0] for k in load_file(kohya) if k.endswith(".lora_down.weight")}
    state = load_file(diff)
    assert {k.removesuffix(".diff") for k in state} == names and all(v.dtype == torch.float32 for v in state.values())
    edit, base = load_edit(edit_path), load_model(folder)
    new = edit.edited_kv(base.kv)
    modules = kohya_modules(base.family, list(edit.layers), denoiser_config(base))
    for name in edit.layers:
        assert _relative(base.kv[name] + state[f"{modules[name]}.diff"], new[name]) <= 1e-6


def test_kohya_names_only_where_they_exist(capsys):
    assert kohya_modules(FLUX, ["context_embedder"], {}) == {"context_embedder": "lora_unet_txt_in"}
    with pytest.raises(ReceError, match=r"Stable Diffusion 1.x/2.x, SDXL, FLUX.1 and SD3/SD3.5 only, not Sana"):
        kohya_modules(SANA, ["transformer_blocks.0.attn2.to_k"], {})
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # level 1, attention 0: input block 1·3 + 0 + 1
    assert kohya_modules(SDXL, [layer], {"layers_per_block": [2, 2]}) == {layer: sgm}
    with pytest.raises(ReceError, match="different numbers of layers"):
        kohya_modules(SDXL, [layer], {"layers_per_block": [2, 1]})


def test_lora_from_the_base_on_a_fine_tune(sd_path, edits, tmp_path):
    """A fine-tune that keeps the base's text encoder and K/V (other weights changed) gets exactly the edit from the
    base's LoRA; one whose K/V moved too gets it up to (W_ft − W⁰)(P − I), measured here."""
    _, edit_path = edits["sd"]
    edit = load_edit(edit_path)
    lora = tmp_path / "lora.safetensors"
    assert main(["lora", str(sd_path), str(edit_path), "--format", "kohya", "--tolerance", "1e-6", "-o", str(lora)]) == 0
    errors, predicted = {}, {}
    base = load_model(sd_path)
    for kind, scale in (("other weights", 0.0), ("K/V too", 0.05)):
        tune = tmp_path / kind.replace(" ", "-").replace("/", "")
        shutil.copytree(sd_path, tune)
        weights = tune / "unet" / "diffusion_pytorch_model.safetensors"
        state = load_file(weights)
        g = torch.Generator().manual_seed(1)
        for k, v in state.items():
            edited = k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
            s = scale if edited else 0.05
            state[k] = v + s * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
        save_file(state, str(weights))
        pipe = StableDiffusionPipeline.from_pretrained(tune, dtype=torch.float32)
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        expected = edit.apply(StableDiffusionPipeline.from_pretrained(tune, dtype=torch.float32), allow_other_base=True)
        got, want = dict(pipe.unet.named_modules()), dict(expected.unet.named_modules())
        errors[kind] = max(_relative(got[n].weight, want[n].weight) for n in edit.layers)
        # the LoRA adds W⁰(P − I), the edit on the fine-tune W_ft(P − I): they differ by (W_ft − W⁰)(P − I)
        on_base = edit.edited_kv(base.kv)
        predicted[kind] = max(
            _relative(state[n + ".weight"] + on_base[n] - base.kv[n], want[n].weight.detach()) for n in edit.layers
        )
    assert errors["other weights"] <= 1e-4 and predicted["other weights"] <= 1e-6
    assert errors["K/V too"] == pytest.approx(predicted["K/V too"], rel=1e-3) and errors["K/V too"] > 1e-3
