"""kohya LoRAs and `.diff` files for ComfyUI / Automatic1111 / Forge, and a LoRA made on a base used on a fine-tune."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from rece.cli import main
from rece.edit import load_edit
from rece.errors import ReceError
from rece.families import FLUX, SANA, SDXL
from rece.lora import denoiser_config, kohya_modules, lora_factors, read_lora_record
from rece.models import load_model

from .family_checks import WITH_SCHNELL

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
def test_kohya_lora_loads_in_diffusers_under_its_names(family, edits, tmp_path, capsys):
    """kohya's names reach the right modules at scale 1 through diffusers' converter (factors only: a rank below
    every layer's width, since diffusers reads no `.diff` key)."""
    folder, edit_path = edits[family]
    lora = tmp_path / "kohya.safetensors"
    code = main(["lora", str(folder), str(edit_path), "--format", "kohya", "--max-rank", "16", "-o", str(lora)])
    assert code == 0, capsys.readouterr().err
    assert "this is for ComfyUI" not in capsys.readouterr().out  # SD1/SDXL kohya LoRAs load in diffusers too
    state = load_file(lora)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)
    blocks = ("input_blocks", "output_blocks", "middle_block") if family == "sdxl" else ("down_blocks", "up_blocks", "mid_block")
    assert all(any(f"_{b}_" in k for b in blocks) for k in state)  # SGM names for SDXL, diffusers' for SD1
    assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {16.0}

    edit, base = load_edit(edit_path), load_model(folder)
    modules = kohya_modules(base.family, list(edit.layers), denoiser_config(base))
    pipe = PIPELINES[family].from_pretrained(folder, dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    fused = dict(pipe.unet.named_modules())
    for name in edit.layers:
        up, down = state[f"{modules[name]}.lora_up.weight"].double(), state[f"{modules[name]}.lora_down.weight"].double()
        assert _relative(fused[name].weight, base.kv[name].double() + up @ down) <= 1e-6, name


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_diff_file_holds_the_exact_change_under_the_kohya_names(family, edits, tmp_path):
    folder, edit_path = edits[family]
    kohya, diff = tmp_path / "kohya.safetensors", tmp_path / "diff.safetensors"
    assert main(["lora", str(folder), str(edit_path), "--format", "kohya", "-o", str(kohya)]) == 0
    assert main(["lora", str(folder), str(edit_path), "--format", "diff", "-o", str(diff)]) == 0
    names = {k.split(".")[0] for k in load_file(kohya)}  # its factored modules and those it holds as .diff
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
    assert main(["lora", str(sd_path), str(edit_path), "--format", "diffusers", "--tolerance", "1e-6", "-o", str(lora)]) == 0
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


def test_info_describes_rece_loras_and_names_other_ones(edits, tmp_path, capsys):
    # `rece info LORA` said "not a complete rece edit ... re-create it with rece erase" for rece's own LoRAs
    folder, edit_path = edits["sd"]
    edit = load_edit(edit_path)
    files = {}
    for fmt in ("diffusers", "kohya", "diff"):
        files[fmt] = tmp_path / f"{fmt}.safetensors"
        assert main(["lora", str(folder), str(edit_path), "--format", fmt, "-o", str(files[fmt])]) == 0
    capsys.readouterr()
    for fmt, path in files.items():
        assert main(["info", str(path)]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert out.startswith(f"rece LoRA     {fmt} (")
        assert f"layers        {len(edit.layers)}: " in out
        assert ("exact full differences" in out) == (fmt == "diff") and ("rank " in out.splitlines()[0]) == (fmt != "diff")
        assert "concepts      cat" in out and "method        rece (preset nudity)" in out and "\nbase          " in out
        prefix = "unet." if fmt == "diffusers" else "lora_unet_"
        assert out.splitlines()[1].split(": ", 1)[1].startswith(prefix)
    assert main(["info", str(files["kohya"]), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["lora_format"] == "kohya" and record["rank"] == record["lora_rank"] and record["edit"]["concepts"] == ["cat"]
    assert len(record["modules"]) == len(edit.layers)

    foreign = tmp_path / "foreign.safetensors"  # the same tensors without rece's record: another tool's LoRA
    save_file(load_file(files["kohya"]), str(foreign))
    assert main(["info", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is a LoRA that rece did not write ({len(edit.layers)} modules, rank " in err
    assert main(["apply", str(folder), str(files["kohya"]), "-o", str(tmp_path / "out")]) == 2  # a LoRA is not an edit
    assert "is a rece LoRA (kohya), not an edit file" in capsys.readouterr().err


BUILDERS = WITH_SCHNELL


@pytest.fixture(scope="module", params=["sd", "sdxl", *BUILDERS])
def family_edit(request, tmp_path_factory):
    """A folder of each tiny family and an edit erasing 'nudity' from it with the defaults."""
    root = tmp_path_factory.mktemp("lora-" + request.param)
    if request.param in BUILDERS:
        folder = BUILDERS[request.param](root / "model")
    else:
        folder = request.getfixturevalue(f"{request.param}_path")
    path = root / "edit.safetensors"
    assert main(["erase", str(folder), "-c", "nudity", "-o", str(path)]) == 0
    return folder, path


def fused_weights(state: dict, base, fmt: str, layers: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's weight with the LoRA file fused as its readers fuse it, in the model's dtype: W + B·A (diffusers),
    W + alpha/rank · up·down or W + diff (kohya)."""
    modules = kohya_modules(base.family, layers, denoiser_config(base)) if fmt == "kohya" else {}
    out = {}
    for n in layers:
        w = base.kv[n].double()
        if fmt == "diffusers":
            a, b = state[f"{base.family.denoiser}.{n}.lora_A.weight"], state[f"{base.family.denoiser}.{n}.lora_B.weight"]
            change = b.double() @ a.double()
        elif f"{modules[n]}.diff" in state:
            change = state[f"{modules[n]}.diff"].double()
        else:
            down, up = state[f"{modules[n]}.lora_down.weight"].double(), state[f"{modules[n]}.lora_up.weight"].double()
            change = state[f"{modules[n]}.alpha"].item() / down.shape[0] * up @ down
        out[n] = (w + change).to(base.kv[n].dtype)
    return out


def test_default_lora_equals_the_applied_edit_on_every_family(family_edit, tmp_path, capsys):
    """`rece lora` with its defaults: every fused weight equals the applied edit to 1e-4 (relative), on every family and
    in both formats; the layers that need their full width are written exactly, and the command says so."""
    folder, edit_path = family_edit
    edit, base = load_edit(edit_path), load_model(folder)
    applied = edit.edited_kv(base.kv)
    for fmt in ("diffusers", "kohya") if base.family.has_kohya_names() else ("diffusers",):
        lora = tmp_path / f"{fmt}.safetensors"
        assert main(["lora", str(folder), str(edit_path), "--format", fmt, "-o", str(lora)]) == 0
        printed, state, record = capsys.readouterr().out, load_file(lora), read_lora_record(lora)
        assert record["tolerance"] == 1e-4
        for name, w in fused_weights(state, base, fmt, list(edit.layers)).items():
            assert _relative(w, applied[name]) <= 1e-4, (fmt, name)
        exact = record["exact_layers"]
        assert ("exact:" in printed) == bool(exact)
        for name in exact:  # full width: the exact change, as .diff (kohya) or full-rank factors (diffusers)
            if fmt == "kohya":
                assert f"{kohya_modules(base.family, [name], denoiser_config(base))[name]}.diff" in state
            else:
                assert state[f"{base.family.denoiser}.{name}.lora_A.weight"].shape[0] == min(base.kv[name].shape)


def test_a_layer_that_needs_its_width_is_written_exactly():
    g = torch.Generator().manual_seed(0)
    kv = {"a": torch.randn(8, 8, generator=g), "b": torch.randn(64, 32, generator=g)}
    deltas = {  # a: full rank; b: rank 3
        "a": 0.1 * torch.randn(8, 8, generator=g, dtype=torch.float64),
        "b": 0.1 * torch.randn(64, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 32, generator=g, dtype=torch.float64),
    }
    factors, rank, exact = lora_factors(deltas, kv, 1e-4, None)
    assert exact == ["a"] and rank == 3 and factors["a"][0].shape == (8, 8) and factors["b"][0].shape == (3, 32)
    for n, (a, b) in factors.items():
        assert _relative(b.double() @ a.double(), deltas[n]) <= 1e-5, n
    _, rank, exact = lora_factors(deltas, kv, 1e-4, 2)  # capped below a's width: factors for both
    assert exact == [] and rank == 2
    _, rank, exact = lora_factors(deltas, kv, 1e-4, 8)  # b's rank 3 ... and a at 8 = its width: exact
    assert exact == ["a"] and rank == 3
    # a layer that needs less than its width but is narrower than the shared rank: its full rank, exact, too
    f64 = dict(generator=g, dtype=torch.float64)
    wide = 0.1 * torch.randn(64, 6, **f64) @ torch.randn(6, 32, **f64)
    narrow = 0.1 * torch.randn(4, 1, **f64) @ torch.randn(1, 64, **f64)
    _, rank, exact = lora_factors({"b": wide, "c": narrow}, {"b": kv["b"], "c": torch.randn(4, 64, generator=g)}, 1e-4, None)
    assert rank == 6 and exact == ["c"]
