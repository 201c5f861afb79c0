"""The command line: happy paths, and each bad input as a one-line error that writes nothing."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rece.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_erase_json_info_apply_lora(capsys, sd_path, tmp_path):
    edit = tmp_path / "nudity.safetensors"
    code, out, err = run(capsys, "erase", sd_path, "--preset", "nudity", "-o", edit, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["concepts"] == ["nudity"] and result["method"] == "rece" and result["output"] == str(edit)
    assert 0 < result["seconds"] < 60 and edit.is_file()

    code, out, _ = run(capsys, "info", edit)
    assert code == 0 and "nudity" in out and "epochs 3" in out
    code, out, _ = run(capsys, "info", edit, "--json")
    assert json.loads(out)["config"]["regularization"] == 0.1

    code, out, err = run(capsys, "apply", sd_path, edit, "-o", tmp_path / "applied")
    assert code == 0, err
    assert (tmp_path / "applied" / "model_index.json").is_file()

    code, out, err = run(capsys, "lora", sd_path, edit, "-o", tmp_path / "lora.safetensors")
    assert code == 0, err
    assert "rank" in out and (tmp_path / "lora.safetensors").is_file()


def test_erase_summary_and_uce_method(capsys, sd_path, tmp_path):
    code, out, err = run(
        capsys,
        "erase",
        sd_path,
        "-c",
        "cat",
        "-c",
        "dog",
        "--method",
        "uce",
        "--preserve",
        "a red car",
        "--uce-lamb",
        "0.3",
        "-o",
        tmp_path / "e.safetensors",
    )
    assert code == 0, err
    assert "cat, dog" in out and "method        uce" in out and "wrote" in out


def _no_cross_attention(sd_path, tmp_path):
    folder = tmp_path / "nocross"
    shutil.copytree(sd_path, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "attn2" not in k}, weights)
    return folder


def _nan_weights(sd_path, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(sd_path, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state[next(k for k in state if k.endswith("attn2.to_v.weight"))][:] = float("inf")
    save_file(state, weights)
    return folder


ERASE_ERRORS = [
    (lambda sd, tmp: ["erase", tmp / "missing", "-c", "cat"], "does not exist"),
    (lambda sd, tmp: ["erase", tmp, "-c", "cat"], "not a diffusers pipeline"),
    (lambda sd, tmp: ["erase", _no_cross_attention(sd, tmp), "-c", "cat"], "no cross-attention"),
    (lambda sd, tmp: ["erase", _nan_weights(sd, tmp), "-c", "cat"], "NaN/Inf"),
    (lambda sd, tmp: ["erase", sd, "-c", ""], "concept is empty"),
    (lambda sd, tmp: ["erase", sd], "no concept to erase"),
    (lambda sd, tmp: ["erase", sd, "--preset", "weird", "-c", "x"], "unknown preset"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "--lamb", "-1"], "lamb must be >= 0"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "--uce-lamb", "-0.5"], "uce_lamb must be >= 0"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "--regularization", "-1"], "regularization must be >= 0"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "--erase-scale", "-2"], "erase_scale must be >= 0"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "--preserve-scale", "nan"], "finite"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "--uce-preserve-scale", "inf"], "finite"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "--epochs", "-1"], "epochs must be"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "--uce-lamb", "0", "--no-preserve-empty"], "raise --uce-lamb"),
    (lambda sd, tmp: ["erase", sd, "-c", "cat", "-o", tmp / "nowhere" / "e.safetensors"], "output folder"),
]


@pytest.mark.parametrize("make, message", ERASE_ERRORS, ids=[m for _, m in ERASE_ERRORS])
def test_erase_bad_input(capsys, sd_path, tmp_path, make, message):
    argv = make(sd_path, tmp_path)
    out_path = tmp_path / "out.safetensors"
    if "-o" not in argv:
        argv += ["-o", out_path]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a temporary


def test_long_concept_warns_and_still_erases(capsys, sd_path, tmp_path):
    code, out, err = run(capsys, "erase", sd_path, "-c", "cat " * 90, "--method", "uce", "-o", tmp_path / "e.safetensors")
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("warning: ") and "truncated to 77" in err


@pytest.fixture(scope="module")
def edit_file(sd_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("edits") / "cat.safetensors"
    assert main(["erase", str(sd_path), "-c", "cat", "-o", str(path)]) == 0
    return path


def test_apply_bad_inputs(capsys, sd_path, tmp_path, edit_file):
    from rece.tiny import build_tiny_sd

    other = build_tiny_sd(tmp_path / "other", text_dim=64, seed=3)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(edit_file.read_bytes()[:100])
    not_edit = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, not_edit)
    cases = [
        (["apply", other, edit_file, "-o", tmp_path / "out1"], "made for base model"),
        (["apply", sd_path, corrupt, "-o", tmp_path / "out2"], "corrupt"),
        (["apply", sd_path, not_edit, "-o", tmp_path / "out3"], "not a rece edit"),
        (["apply", sd_path, tmp_path / "none.safetensors", "-o", tmp_path / "out4"], "does not exist"),
        (["apply", sd_path, edit_file, "-o", tmp_path / "no" / "such" / "dir"], "output folder"),
        (["info", corrupt], "corrupt"),
        (["lora", other, edit_file, "-o", tmp_path / "l.safetensors"], "made for base model"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    assert not any(p.name.startswith(("out", ".out", "l.", ".l.")) for p in tmp_path.iterdir())
    code, out, err = run(capsys, "apply", other, edit_file, "-o", tmp_path / "out5", "--allow-other-base")
    assert code == 0, err


@pytest.mark.parametrize("raised", ["shutil.Error", "OSError"])
def test_apply_on_a_full_disk_says_so_in_one_line(capsys, sd_path, tmp_path, edit_file, monkeypatch, raised):
    # copytree gathers every failed file into one shutil.Error, which printed as a Python list of tuples
    import rece.apply

    def full_disk(src, dst, **kwargs):
        (Path(dst) / "model_index.json").write_text("{}")  # a partial copy, to be cleaned up
        why = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(dst) / "unet" / "x.safetensors"))
        if raised == "OSError":
            raise why
        raise shutil.Error([(str(Path(src) / n), str(Path(dst) / n), str(why)) for n in ("unet", "vae")])

    monkeypatch.setattr(rece.apply.shutil, "copytree", full_disk)
    out = tmp_path / "applied"
    code, _, err = run(capsys, "apply", sd_path, edit_file, "-o", out)
    needed = sum(p.stat().st_size for p in Path(sd_path).rglob("*") if p.is_file())
    assert code == 2 and err == f"error: no space left on device writing {out} ({max(1, round(needed / 1e6))} MB needed); " + (
        "free some space or choose another -o\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial folder left
    monkeypatch.setattr(rece.apply.shutil, "copytree", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    code, _, err = run(capsys, "apply", sd_path, edit_file, "-o", out)  # other errors stay what they are
    assert code == 2 and "no space" not in err and "denied" in err


def test_apply_to_one_file_on_a_full_disk_says_so_in_one_line(capsys, sd_path, tmp_path, edit_file, monkeypatch):
    import rece.checkpoint

    from .ldm_checkpoint import save_ldm_checkpoint

    ckpt = save_ldm_checkpoint(sd_path, tmp_path / "tiny.safetensors")

    def full_disk(src, out, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr(rece.checkpoint, "write_replaced", full_disk)
    out = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "apply", ckpt, edit_file, "-o", out)
    needed = max(1, round(ckpt.stat().st_size / 1e6))
    assert code == 2 and err.startswith(f"error: no space left on device writing {out} ({needed} MB needed)")


def test_erase_reads_concept_and_preserve_prompt_files(capsys, sd_path, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("# the concept's prompt family\na cat\n\na photo of a cat\n")
    preserve = tmp_path / "preserve.csv"
    preserve.write_text("case_number,prompt\n0,a dog\n1,a bird\n")
    edit = tmp_path / "cat.safetensors"
    code, out, err = run(
        capsys, "erase", sd_path, "-c", "cat", "--concept-prompts", concepts, "--preserve-prompts", preserve, "-o", edit, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["concepts"] == ["cat", "a cat", "a photo of a cat"]
    code, out, _ = run(capsys, "info", edit, "--json")
    assert json.loads(out)["config"]["preserve"] == ["a dog", "a bird"]
    # with a preset and no --concept, the file adds to the preset's concepts
    code, out, err = run(
        capsys, "erase", sd_path, "--preset", "nudity", "--concept-prompts", concepts, "-o", edit, "--json", "--overwrite"
    )
    assert code == 0, err
    assert json.loads(out)["concepts"] == ["nudity", "a cat", "a photo of a cat"]

    for bad, message in (
        (tmp_path / "missing.txt", "does not exist"),
        (tmp_path / "empty.txt", "holds no prompt"),
        (tmp_path / "noprompt.csv", "has no 'prompt' column"),
    ):
        if bad.name == "empty.txt":
            bad.write_text("# nothing\n\n")
        if bad.name == "noprompt.csv":
            bad.write_text("text\na cat\n")
        out_path = tmp_path / "bad.safetensors"
        code, _, err = run(capsys, "erase", sd_path, "--concept-prompts", bad, "-o", out_path)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not out_path.exists()
