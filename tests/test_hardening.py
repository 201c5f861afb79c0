"""No user file lost, no traceback: output paths checked before any work, inputs never replaced, temporaries of
killed writers cleaned, bad parameters and damaged inputs refused in one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rece import demo
from rece.cli import main
from rece.edit_file import METADATA_KEY
from rece.io import atomic_dir, atomic_file

from .runs import write_csv


@pytest.fixture(scope="module")
def edit_path(sd_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("edit") / "cat.safetensors"
    assert main(["erase", str(sd_path), "-c", "cat", "-o", str(path)]) == 0
    return path


def refused(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_demo_never_deletes_the_users_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_load_pipeline", lambda model: pytest.fail("the demo started work before checking -o"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert "not a rece demo folder" in refused(capsys, "demo", "-o", mine)
    assert (mine / "notes.txt").read_text() == "keep"
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert "not a rece demo folder" in refused(capsys, "demo", "-o", afile)
    assert "is a file" in refused(capsys, "demo", "-o", afile / "demo")
    assert afile.read_text() == "keep"
    earlier = tmp_path / "rece-demo"  # an earlier demo's folder is replaced without --overwrite
    earlier.mkdir()
    (earlier / "grid.png").write_bytes(b"x")
    demo.check_demo_output(earlier)
    demo.check_demo_output(mine, overwrite=True)


def test_outputs_never_replace_inputs(sd_path, edit_path, tmp_path, capsys):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    assert "--overwrite" in refused(capsys, "erase", sd_path, "-c", "cat", "-o", existing)
    assert existing.read_bytes() == b"keep"
    assert main(["erase", str(sd_path), "-c", "cat", "-o", str(existing), "--overwrite"]) == 0
    capsys.readouterr()
    before = edit_path.read_bytes()
    assert "would replace the input" in refused(capsys, "lora", sd_path, edit_path, "-o", edit_path)
    assert "--overwrite" in refused(capsys, "lora", sd_path, edit_path, "-o", existing)
    assert edit_path.read_bytes() == before
    copy = tmp_path / "model"
    shutil.copytree(sd_path, copy)
    assert "would replace the input" in refused(capsys, "apply", copy, edit_path, "-o", copy, "--overwrite")
    assert (copy / "model_index.json").is_file()
    run = tmp_path / "run"
    run.mkdir()
    prompts = write_csv(run / "prompts.csv", ["case_number", "prompt", "evaluation_seed"], [[0, "a cat", 1]])
    err = refused(capsys, "generate", sd_path, "--prompts", prompts, "-o", run, "--overwrite", "--steps", "1")
    assert "would delete the input" in err and prompts.is_file()


def test_folders_and_temporaries(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("x")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # as mkdir would make it, not mkdtemp's 0700
    finally:
        os.umask(mask)
    # a writer killed with -9 leaves its temporary; the next write of the same target removes it, not a live one's
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.safetensors.{dead.stdout.strip()}.abc.tmp"
    stale.write_bytes(b"GBs")
    live = tmp_path / f".model.safetensors.{os.getppid()}.def.tmp"
    live.write_bytes(b"in flight")
    with atomic_file(tmp_path / "model.safetensors") as tmp:
        tmp.write_bytes(b"done")
    assert not stale.exists() and live.exists() and (tmp_path / "model.safetensors").read_bytes() == b"done"


def _forged(edit_path: Path, tmp_path: Path, name: str, meta=None, tensors=None) -> Path:
    with safe_open(str(edit_path), framework="pt") as f:
        original = json.loads(f.metadata()[METADATA_KEY])
        state = {k: f.get_tensor(k) for k in f.keys()}
    state.update(tensors or {})
    out = tmp_path / name
    save_file(state, str(out), metadata={METADATA_KEY: json.dumps(original if meta is None else meta(original))})
    return out


@pytest.mark.parametrize(
    "name, meta, tensors, message",
    [
        ("list.safetensors", lambda m: [1, 2], None, "not a complete rece edit (bad or missing metadata, a list"),
        ("text.safetensors", lambda m: "x", None, "not a complete rece edit"),
        ("no-config.safetensors", lambda m: {k: v for k, v in m.items() if k != "config"}, None, "missing 'config'"),
        ("no-base.safetensors", lambda m: {k: v for k, v in m.items() if k != "base"}, None, "missing 'base'"),
        ("layers.safetensors", lambda m: {**m, "edited_layers": "all"}, None, "edited_layers, a str"),
        ("shape.safetensors", None, {"transform.delta": torch.zeros(64)}, "transform.delta of shape [64]"),
        ("huge.safetensors", None, {"transform.delta": torch.full((64, 64), 1e30)}, "changes weights by up to 1e+30"),
    ],
)
def test_damaged_edit_files_are_one_line_errors(sd_path, edit_path, tmp_path, capsys, name, meta, tensors, message):
    forged = _forged(edit_path, tmp_path, name, meta, tensors)
    for argv in (["info", forged], ["apply", sd_path, forged, "-o", tmp_path / "out"]):
        assert message in refused(capsys, *argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--layers", "("], "is not a regular expression"),
        (["--device", "foo"], "is not a torch device"),
        (["--erase-scale", "1e308"], "erase_scale must be at most"),
        (["--tradeoff", "1e308"], "tradeoff must be at most"),
        (["--target", "cat"], "is also the --target"),
        (["--preserve", "Cat"], "is also preserved"),
    ],
)
def test_bad_erase_parameters(sd_path, tmp_path, capsys, flags, message):
    assert message in refused(capsys, "erase", sd_path, "-c", "cat", *flags, "-o", tmp_path / "e.safetensors")
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda(sd_path, tmp_path, capsys):
    assert "CUDA is not available" in refused(capsys, "erase", sd_path, "-c", "cat", "--device", "cuda", "-o", tmp_path / "e")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tolerance", "-1"], "tolerance must be a number in (0, 1)"),
        (["--tolerance", "nan"], "got nan"),
        (["--max-rank", "0"], "max rank must be a whole number >= 1"),
        (["--max-rank", "-5"], "max rank must be a whole number >= 1"),
    ],
)
def test_bad_lora_parameters(sd_path, edit_path, tmp_path, capsys, flags, message):
    assert message in refused(capsys, "lora", sd_path, edit_path, *flags, "-o", tmp_path / "l.safetensors")
    assert not (tmp_path / "l.safetensors").exists()


def test_write_errors_and_pickles_are_one_line(sd_path, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    err = refused(capsys, "erase", sd_path, "-c", "cat", "-o", tmp_path / "e.safetensors")
    assert "No space left on device" in err and not list(tmp_path.iterdir())

    def full_in_rust(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_in_rust)
    err = refused(capsys, "erase", sd_path, "-c", "cat", "-o", tmp_path / "e.safetensors")
    assert "cannot write or read a safetensors file" in err and not list(tmp_path.iterdir())
    monkeypatch.undo()
    pickled = tmp_path / "pickled"
    shutil.copytree(sd_path, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    weights.unlink()
    torch.save({**state, "evil": Path("x")}, pickled / "unet" / "diffusion_pytorch_model.bin")  # not weights only
    assert "rece needs safetensors weights" in refused(capsys, "erase", pickled, "-c", "cat", "-o", tmp_path / "e2")


def test_prompt_sets_and_metrics_files(sd_path, tmp_path, capsys):
    header_only = write_csv(tmp_path / "empty.csv", ["case_number", "prompt", "evaluation_seed"], [])
    assert "has a header but no prompts" in refused(capsys, "generate", sd_path, "--prompts", header_only, "-o", tmp_path / "r")
    from rece.report import REPORT_STYLE, _read_metrics

    listed = tmp_path / "metrics.json"
    listed.write_text("[1, 2]")
    with pytest.raises(Exception, match="is not a JSON object"):
        _read_metrics(listed)
    from rece.pictures import PAGE_STYLE

    assert "overflow-wrap: anywhere" in REPORT_STYLE and "pre-wrap" in PAGE_STYLE  # long lines wrap at 1280 px


SHAPES_ROWS = [[0, "a red circle", 1], [1, "a blue square", 2], [2, "a green triangle", 3]]


def _shapes_run(tmp_path, name="run"):
    from rece.generate import generate_run

    prompts = write_csv(tmp_path / f"{name}.csv", ["case_number", "prompt", "evaluation_seed"], SHAPES_ROWS)
    return prompts, lambda **kw: generate_run("shapes", prompts, tmp_path / name, steps=4, progress=False, **kw)


def test_run_folders_are_locked_and_damaged_images_made_again(tmp_path, capsys):
    prompts, generate = _shapes_run(tmp_path)
    out = generate()
    images = out / "images"
    original = {p.name: p.read_bytes() for p in images.glob("*.png")}
    # another process holds the folder: refused, naming it; once it is gone, its lock is taken over
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".run.rece-lock").write_text(str(holder.pid))
        err = refused(capsys, "generate", "shapes", "--prompts", prompts, "-o", out, "--steps", "4")
        assert f"in use by another rece process (pid {holder.pid})" in err
        live_tmp = images / f".1_0.png.{holder.pid}.abc.tmp"  # that process's image in flight is not deleted
        live_tmp.write_bytes(b"in flight")
    finally:
        holder.kill()
        holder.wait()
    live_tmp.unlink()
    # a truncated image: evaluate names it; generate makes it again, identical to the first time
    (images / "1_0.png").write_bytes(original["1_0.png"][:40])
    from rece.metrics import evaluate

    with pytest.raises(Exception, match=r"1 damaged image\(s\) .*1_0.png"):
        evaluate(out, ["shapes"], concept=["red,circle"])
    with pytest.warns(UserWarning, match="damaged image"):
        generate()
    assert {p.name: p.read_bytes() for p in images.glob("*.png")} == original
    assert not (tmp_path / ".run.rece-lock").exists()


def test_metrics_of_a_changed_run_are_not_shown_as_current(tmp_path):
    from rece.metrics import evaluate
    from rece.report import load_report_run

    _, generate = _shapes_run(tmp_path)
    out = generate()
    (out / "images" / "2_0.png").unlink()  # as if the run had been stopped before its last image
    with pytest.warns(UserWarning, match="unfinished: 2 of 3 images"):
        evaluate(out, ["shapes"], concept=["red,circle"])
    assert "shapes" in load_report_run(out, "run").metrics
    generate()  # resumed to the end: the metric was computed on two images
    with pytest.warns(UserWarning, match="metric shapes of .* changed since; left out of the report"):
        assert "shapes" not in load_report_run(out, "run").metrics
    evaluate(out, ["shapes"], concept=["red,circle"])
    assert load_report_run(out, "run").metrics["shapes"]["images"] == 3


def test_a_run_killed_before_its_manifest_resumes(tmp_path):
    _, generate = _shapes_run(tmp_path)
    (tmp_path / "run" / "images").mkdir(parents=True)  # made, then killed before manifest.json
    out = generate()
    assert len(list((out / "images").glob("*.png"))) == 3
