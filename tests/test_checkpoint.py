"""Checkpoint in, checkpoint out: `rece apply CKPT EDIT -o OUT.safetensors` on SD1 (LDM) and SDXL (SGM) single files."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from rece import checkpoint as ck
from rece.cli import main
from rece.edit import load_edit
from rece.edit_file import METADATA_KEY
from rece.errors import ReceError
from rece.families.ldm_names import diffusers_name, layers_per_block_of, ldm_name
from rece.models import load_model

from .ldm_checkpoint import save_ldm_checkpoint, save_sgm_checkpoint


@pytest.fixture(scope="module")
def cases(sd_path, sdxl_path, tmp_path_factory):
    """(family, pipeline class, diffusers folder, checkpoint, edit): SD1 in float32 (LDM), SDXL in float16 (SGM)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, cls, folder, ckpt in (
        ("sd", StableDiffusionPipeline, sd_path, save_ldm_checkpoint(sd_path, root / "sd.safetensors")),
        ("sdxl", StableDiffusionXLPipeline, sdxl_path, save_sgm_checkpoint(sdxl_path, root / "xl.safetensors", torch.float16)),
    ):
        edit = root / f"{name}-edit.safetensors"
        assert main(["erase", str(folder), "-c", "cat", "--preset", "nudity", "-o", str(edit)]) == 0
        out[name] = (cls, folder, ckpt, edit)
    return out


def _entries(path: Path) -> tuple[list[tuple[str, dict]], dict, int]:
    header, start = ck.read_header(path)
    return [(k, v) for k, v in header.items() if k != "__metadata__"], header.get("__metadata__", {}), start


def _raw(path: Path, start: int, entry: dict) -> bytes:
    with open(path, "rb") as f:
        f.seek(start + entry["data_offsets"][0])
        return f.read(entry["data_offsets"][1] - entry["data_offsets"][0])


def test_original_names_round_trip(base, sdxl_path):
    assert ldm_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 2) == (
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    )
    assert ldm_name("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v", 2) == (
        "output_blocks.11.1.transformer_blocks.0.attn2.to_v"
    )
    assert ldm_name("mid_block.attentions.0.transformer_blocks.9.attn2.to_k", 2).startswith("middle_block.1.")
    for model, per_block in ((base, 1), (load_model(sdxl_path), 1)):
        for name in model.kv:
            assert diffusers_name(ldm_name(name, per_block), per_block) == name
    with pytest.raises(ReceError, match="not in a UNet attention block"):
        ldm_name("conv_in", 2)
    assert (
        layers_per_block_of(["model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.input_blocks.1.0.x"]) == 2
    )


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_apply_to_single_file(family, cases, tmp_path, capsys):
    """Same keys, order, dtypes and shapes; only the edited tensors' bytes differ; metadata kept with rece's added;
    diffusers loads it, and its K/V are `rece apply` into a folder's (in the checkpoint's dtype)."""
    cls, folder, ckpt, edit_path = cases[family]
    out = tmp_path / "erased.safetensors"
    assert main(["apply", str(ckpt), str(edit_path), "-o", str(out)]) == 0, capsys.readouterr().err
    assert "wrote checkpoint" in capsys.readouterr().out
    before, meta_before, start_before = _entries(ckpt)
    after, meta_after, start_after = _entries(out)
    assert [(k, v["dtype"], v["shape"], v["data_offsets"]) for k, v in before] == [
        (k, v["dtype"], v["shape"], v["data_offsets"]) for k, v in after
    ]
    assert {k: v for k, v in meta_after.items() if k != METADATA_KEY} == meta_before
    edit = load_edit(edit_path)
    record = json.loads(meta_after[METADATA_KEY])
    assert record["base_fingerprint"] == edit.base_fingerprint and record["edits"][0]["id"] == edit.edit_id()
    changed = {k for k, v in before if _raw(ckpt, start_before, v) != _raw(out, start_after, dict(after)[k])}
    _, keys = ck.checkpoint_kv(ckpt)
    assert changed == {keys[n] for n in edit.layers} and changed

    applied = tmp_path / "applied"
    assert main(["apply", str(ckpt), str(edit_path), "--config", str(folder), "-o", str(applied)]) == 0
    dtype = dict(before)[keys[edit.layers[0]]]["dtype"]
    expected = dict(cls.from_pretrained(applied, dtype=torch.float32).unet.named_modules())
    loaded = cls.from_single_file(str(out), config=str(folder), dtype=torch.float32)
    modules = dict(loaded.unet.named_modules())
    for name in edit.layers:
        want = expected[name].weight.to(ck.DTYPES[dtype]).to(torch.float32)
        assert torch.equal(modules[name].weight, want), name


def test_streamed_write_keeps_memory_and_leaves_nothing_on_failure(cases, tmp_path, monkeypatch):
    _, _, ckpt, edit_path = cases["sd"]
    # a checkpoint much larger than its edited layers: peak memory must not follow its size
    big = tmp_path / "big.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["first_stage_model.filler"] = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB
    save_file(state, str(big))
    probe = (
        "import resource, sys; from rece.checkpoint import write_applied_checkpoint; from rece.edit import load_edit; "
        "e = load_edit(sys.argv[2]); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "write_applied_checkpoint(sys.argv[1], [e], sys.argv[3]); "
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)"
    )
    out = tmp_path / "big-erased.safetensors"
    result = subprocess.run([sys.executable, "-c", probe, str(big), str(edit_path), str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    grew = int(result.stdout.strip().splitlines()[-1])
    assert grew < 0.5 * os.path.getsize(big), (
        f"peak RSS grew by {grew / 2**20:.0f} MiB for a {os.path.getsize(big) / 2**20:.0f} MiB file"
    )
    assert out.stat().st_size == big.stat().st_size + len(ck.encoded_header(ck.read_header(out)[0])) - (
        ck.read_header(big)[1] - 8
    )

    # small blocks (many copies) give the same file; a failure mid-way leaves no output and no temporary
    monkeypatch.setattr(ck, "BLOCK", 4096)
    again = tmp_path / "again.safetensors"
    ck.write_applied_checkpoint(big, [load_edit(edit_path)], again)
    assert again.read_bytes() == out.read_bytes()
    calls = []

    def failing(src, dst, count):
        calls.append(count)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return copy(src, dst, count)

    copy = ck._copy
    monkeypatch.setattr(ck, "_copy", failing)
    with pytest.raises(KeyboardInterrupt):
        ck.write_applied_checkpoint(big, [load_edit(edit_path)], tmp_path / "partial.safetensors")
    assert not (tmp_path / "partial.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_single_file_refusals(cases, sd_path, tmp_path, capsys):
    _, _, ckpt, edit_path = cases["sd"]

    def refused(*argv):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "would replace the input" in refused("apply", ckpt, edit_path, "-o", ckpt)
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    assert "--overwrite" in refused("apply", ckpt, edit_path, "-o", existing)
    assert existing.read_bytes() == b"keep me"
    assert "no conversion from a folder" in refused("apply", sd_path, edit_path, "-o", tmp_path / "x.safetensors")
    other = tmp_path / "other-edit.safetensors"
    assert main(["erase", str(cases["sdxl"][1]), "-c", "cat", "-o", str(other)]) == 0
    assert "made for a sdxl model" in refused("apply", ckpt, other, "-o", tmp_path / "y.safetensors")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert "not a safetensors file" in refused("apply", bogus, edit_path, "-o", tmp_path / "z.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
