"""GGUF denoisers (ComfyUI-GGUF's quantised FLUX.1): read dequantised, erased from, exported as a LoRA that gives the
edit on the dequantised weights; `apply` refused in one line; the gguf package missing is one line."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from rece.cli import main
from rece.edit import load_edit
from rece.errors import ReceError
from rece.families import FLUX
from rece.models import load_model

from . import comfy_files as cf

gguf = pytest.importorskip("gguf")  # rece[gguf]; the dev extra installs it

QTYPES = {
    "q8_0+f16": {"txt_in.weight": "Q8_0", "vector_in.in_layer.weight": "F16"},
    "q4_k+bf16": {"txt_in.weight": "Q4_K", "vector_in.in_layer.weight": "BF16"},
    "q5_k+q8_0": {"txt_in.weight": "Q5_K", "vector_in.in_layer.weight": "Q8_0"},
}
EDITED = {"txt_in.weight": "context_embedder", "vector_in.in_layer.weight": "time_text_embed.text_embedder.linear_1"}


def expected(built, name: str, qtype: str) -> torch.Tensor:
    """What a tensor of the file holds, known without rece's reader: F16 / BF16 the original rounded; Q8_0 within half
    a step of each 32-value block's scale; K types the gguf package's own dequantisation of the raw blocks."""
    import numpy as np

    original = cf.flux_transformer(256, 256, seed=40)[name]
    if qtype == "F16":
        return original.half().float()
    if qtype == "BF16":
        return original.bfloat16().float()
    if qtype == "Q8_0":
        return original
    kind = gguf.GGMLQuantizationType[qtype]
    raw = cf.k_quant_rows(*original.shape, kind, seed=len(name))
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, kind))).reshape(original.shape)


@pytest.mark.parametrize("case", list(QTYPES))
def test_gguf_weights_read_dequantised(case, tmp_path):
    built = cf.flux_gguf(tmp_path, QTYPES[case])
    base = load_model(built.path, config=str(built.tokenizers), text_encoders=list(map(str, built.split.values())))
    assert base.family is FLUX and set(base.kv) == set(EDITED.values())
    for name, qtype in QTYPES[case].items():
        got, want = base.kv[EDITED[name]], expected(built, name, qtype)
        assert got.dtype == torch.float32 and got.shape == want.shape == torch.Size([128, 256])
        if qtype == "Q8_0":  # one fp16 scale (amax / 127) per 32 values: half a step, and the scale's own fp16 rounding
            amax = want.reshape(128, -1, 32).abs().amax(-1, keepdim=True)
            assert ((got.reshape(128, -1, 32) - want.reshape(128, -1, 32)).abs() <= amax / 254 + amax * 2**-10).all()
        else:
            assert torch.equal(got, want), name


def test_erase_and_lora_from_gguf_and_apply_refused(tmp_path, capsys):
    """`rece erase` and `rece lora --format diff` from a .gguf: the .diff read by ComfyUI's rule on the dequantised
    weights gives the edit exactly; `rece apply` to a .gguf is one line pointing to the LoRA, nothing written."""
    from .test_checkpoint_mmdit import comfy_key_map

    built = cf.flux_gguf(tmp_path, QTYPES["q4_k+bf16"])
    encoders = [a for f in built.split.values() for a in ("--text-encoder", str(f))]
    edit = tmp_path / "edit.safetensors"
    argv = ["erase", str(built.path), "-c", "cat", "--config", str(built.tokenizers), *encoders, "-o", str(edit)]
    assert main(argv) == 0, capsys.readouterr().err
    lora = tmp_path / "erased-diff.safetensors"
    argv = ["lora", str(built.path), str(edit), "--format", "diff"]  # a LoRA reads the edited weights alone
    assert main([*argv, "-o", str(lora)]) == 0, capsys.readouterr().err
    base = load_model(built.path, config=str(built.tokenizers), text_encoders=list(map(str, built.split.values())))
    exact = load_edit(edit).edited_kv(base.kv)
    state, keys = load_file(lora), comfy_key_map([f"{n}" for n in EDITED])
    assert {keys[k.split(".")[0]] for k in state} == set(EDITED)
    for module, diff in ((k.split(".")[0], v) for k, v in state.items()):
        name = EDITED[keys[module]]
        assert torch.allclose(base.kv[name].double() + diff.double(), exact[name].double(), atol=1e-6), module
    capsys.readouterr()
    for out in ("erased.gguf", "erased.safetensors", "erased-folder"):
        assert main(["apply", str(built.path), str(edit), "-o", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "is a GGUF file" in err and "--format diff" in err and not (tmp_path / out).exists()


def test_gguf_missing_package_and_damaged_files_are_one_line(tmp_path, monkeypatch):
    built = cf.flux_gguf(tmp_path, QTYPES["q8_0+f16"])
    files = list(map(str, built.split.values()))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(built.path.read_bytes()[:5000])
    with pytest.raises(ReceError) as info:
        load_model(truncated, config=str(built.tokenizers), text_encoders=files)
    assert "\n" not in str(info.value) and f"cannot read '{truncated}' as GGUF" in str(info.value)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ReceError) as info:
        load_model(built.path, config=str(built.tokenizers), text_encoders=files)
    assert str(info.value) == f"reading '{built.path}' needs the gguf package; install it: pip install 'rece[gguf]'"


def test_generate_from_a_gguf_file_is_one_line_pointing_to_the_lora(tmp_path, capsys):
    built = cf.flux_gguf(tmp_path, QTYPES["q8_0+f16"])
    prompts = tmp_path / "set.csv"
    prompts.write_text("prompt,evaluation_seed,case_number\na cat,1,0\n")
    argv = [built.path, "--prompts", prompts, "-o", tmp_path / "run", "--config", built.tokenizers]
    argv += [x for f in built.split.values() for x in ("--text-encoder", f)]
    assert main(["generate", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "\n" not in err.strip() and "does not build pipelines from GGUF" in err and "rece lora" in err
    assert not (tmp_path / "run").exists()
