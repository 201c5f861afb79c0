"""FLUX.1 and SD3 single files (their published key names) and FLUX's kohya LoRA names, on tiny random pipelines."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from rece import checkpoint as ck
from rece.cli import main
from rece.edit import load_edit
from rece.models import load_model
from rece.tiny_dit import build_tiny_flux, build_tiny_sd3

# diffusers module -> (published single-file name, the prefix the file puts it under) for the files made here
LAYOUTS = {
    "flux": ({"context_embedder": "txt_in", "time_text_embed.text_embedder.linear_1": "vector_in.in_layer"}, ""),
    "sd3": (
        {"context_embedder": "context_embedder", "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0"},
        "model.diffusion_model.",
    ),
}


def original_layout(folder, family: str, out, dtype=torch.bfloat16):
    """The tiny transformer's tensors under the names of the family's published single files (the edited layers and
    the blocks, which is how rece recognises the file), in bf16 as released; other tensors keep diffusers' names."""
    names, prefix = LAYOUTS[family]
    blocks = "double_blocks." if family == "flux" else "joint_blocks."
    state = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        new = f"{names[module]}.{param}" if module in names else key.replace("transformer_blocks.", blocks)
        renamed[prefix + new] = value.to(dtype)
    save_file(renamed, str(out), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", params=["flux", "sd3"])
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = (build_tiny_flux if request.param == "flux" else build_tiny_sd3)(root / "model")
    edit = root / "edit.safetensors"
    assert main(["erase", str(folder), "-c", "cat", "--preset", "nudity", "-o", str(edit)]) == 0
    return request.param, folder, original_layout(folder, request.param, root / "original.safetensors"), edit


def test_apply_to_a_published_layout(case, tmp_path, capsys):
    family, folder, single, edit_path = case
    out = tmp_path / "erased.safetensors"
    # the edit was made from the float32 folder; the single file is bf16: same base by fingerprint (fp16-rounded)
    assert main(["apply", str(single), str(edit_path), "-o", str(out), "--allow-other-base"]) == 0, capsys.readouterr().err
    before, after = ck.read_header(single), ck.read_header(out)
    entries = {k: v for k, v in before[0].items() if k != "__metadata__"}
    assert [k for k in after[0] if k != "__metadata__"] == list(entries)
    names, prefix = LAYOUTS[family]
    edited = {f"{prefix}{names[n]}.weight" for n in names}
    original, written = load_file(single), load_file(out)
    for key in entries:
        assert written[key].dtype == original[key].dtype and written[key].shape == original[key].shape
        assert torch.equal(written[key], original[key]) == (key not in edited), key
    edit, base = load_edit(edit_path), load_model(folder)
    expected = edit.edited_kv({n: original[f"{prefix}{names[n]}.weight"].float() for n in names}, allow_other_base=True)
    for name, w in expected.items():
        assert torch.equal(written[f"{prefix}{names[name]}.weight"], w.to(torch.bfloat16)), name
    assert set(edit.layers) == set(names) and set(base.kv) == set(names)


def comfy_key_map(single_file_keys) -> dict[str, str]:
    """How ComfyUI finds a kohya LoRA's module (`comfy.lora.model_lora_keys_unet`): `lora_unet_` + the model's
    single-file key, `diffusion_model.`-relative, with dots as underscores."""
    out = {}
    for key in single_file_keys:
        if key.endswith(".weight"):
            module = key.removeprefix("model.").removeprefix("diffusion_model.")[: -len(".weight")]
            out["lora_unet_" + module.replace(".", "_")] = key
    return out


@pytest.mark.parametrize("fmt", ["kohya", "diff"])
def test_kohya_names_address_the_published_layout(case, fmt, tmp_path, capsys):
    """The kohya (and .diff) file, read the way ComfyUI reads one against the family's single file, gives exactly the
    tensors `rece apply` writes into that file."""
    family, folder, single, edit_path = case
    lora = tmp_path / f"{fmt}.safetensors"
    code = main(["lora", str(folder), str(edit_path), "--format", fmt, "--tolerance", "1e-6", "-o", str(lora)])
    assert code == 0, capsys.readouterr().err
    if fmt == "kohya":  # the family says its kohya LoRA is for ComfyUI (diffusers drops these modules)
        assert "note: this is for ComfyUI; with diffusers use the default --format diffusers" in capsys.readouterr().out
    out = tmp_path / "erased.safetensors"
    assert main(["apply", str(single), str(edit_path), "-o", str(out), "--allow-other-base"]) == 0
    original, written, state = load_file(single), load_file(out), load_file(lora)
    keys = comfy_key_map(original)
    names, prefix = LAYOUTS[family]
    unrounded = load_edit(edit_path).edited_kv(  # what the written file holds before its bf16 rounding
        {n: original[f"{prefix}{names[n]}.weight"].float() for n in names}, allow_other_base=True
    )
    unrounded = {f"{prefix}{names[n]}.weight": w for n, w in unrounded.items()}
    modules = {k.split(".")[0] for k in state}
    assert modules <= set(keys) and len(modules) == 2
    for module in modules:
        if f"{module}.diff" in state:  # --format diff, or a layer the LoRA holds exactly
            delta = state[f"{module}.diff"].double()
        else:
            down, up = state[f"{module}.lora_down.weight"].double(), state[f"{module}.lora_up.weight"].double()
            delta = state[f"{module}.alpha"].item() / down.shape[0] * up @ down
        got, want = original[keys[module]].double() + delta, unrounded[keys[module]].double()
        assert ((got - want).norm() / want.norm()).item() <= 1e-4, module
        assert torch.equal(want.to(torch.bfloat16), written[keys[module]]), module
