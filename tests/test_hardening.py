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
        (["--target", "cat"], "is also its --target"),
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


# -- second round: no runaway processes or memory, no silent no-op, no cross-family edit ----------------------------
def test_num_processes_are_capped_at_rows_and_the_machine(tmp_path, monkeypatch, capsys):
    from rece import generate as gen
    from rece import launch

    monkeypatch.setattr(launch, "cpu_cores", lambda: 2)
    started = []
    monkeypatch.setattr(gen, "spawn_run", lambda job, processes: started.append(processes))
    one = write_csv(tmp_path / "one.csv", ["case_number", "prompt", "evaluation_seed"], [SHAPES_ROWS[0]])
    argv = ["generate", "shapes", "--prompts", one, "-o", tmp_path / "r", "--device", "cpu", "--steps", "2"]
    err = refused(capsys, *argv, "--num-processes", "1000")
    assert "--num-processes 1000 is far more than this machine's 2 CPU core(s); use at most 8" in err
    assert not started and sorted(p.name for p in tmp_path.iterdir()) == ["one.csv"]  # no folder, no lock
    assert main([str(a) for a in argv] + ["--num-processes", "8"]) == 0  # one row: one process, this one
    assert not started and (tmp_path / "r" / "images" / "0_0.png").is_file()
    prompts, _ = _shapes_run(tmp_path)  # three rows: three processes, more than the cores, said
    with pytest.warns(UserWarning, match="3 processes share 2 CPU core"):
        gen.generate_run("shapes", prompts, tmp_path / "r3", steps=2, device="cpu", num_processes=8, progress=False)
    assert started == [3]


@pytest.mark.parametrize(
    "value, size", [("1e9", 10**9), ("1GB", 10**9), ("800MB", 8 * 10**8), ("1.5 GiB", 3 * 2**29), ("2000", 2000)]
)
def test_memory_limit_takes_sizes(monkeypatch, value, size):
    from rece import budget

    monkeypatch.setenv("RECE_MEMORY_LIMIT", value)
    assert budget.memory_limit() == size


def test_memory_limit_messages(sd_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "e.safetensors"
    monkeypatch.setenv("RECE_MEMORY_LIMIT", "abc")
    assert "RECE_MEMORY_LIMIT='abc' is not a size; set it in bytes (1e9)" in refused(
        capsys, "erase", sd_path, "-c", "cat", "-o", out
    )
    monkeypatch.setenv("RECE_MEMORY_LIMIT", "1")
    err = refused(capsys, "erase", sd_path, "-c", "cat", "-o", out)
    assert "erasing 1 concepts needs about " in err and " MB and 1 B is allowed by RECE_MEMORY_LIMIT;" in err
    assert "--base-edit" in err and not out.exists()


def test_image_sizes_are_checked_before_the_run_folder(tmp_path, capsys):
    prompts, generate = _shapes_run(tmp_path)
    argv = ["generate", "shapes", "--prompts", prompts, "-o", tmp_path / "run", "--steps", "2", "--device", "cpu"]
    err = refused(capsys, *argv, "--height", "100000", "--width", "100000")
    assert "decoding 3 image(s) of 100000×100000 needs about" in err and "TB" in err and "lower --height/--width" in err
    assert not (tmp_path / "run").exists()
    # a run that was refused or stopped before its first image (as an earlier rece left it) is replaced by a sane rerun
    out = generate(height=64, width=64)
    for image in (out / "images").iterdir():
        image.unlink()
    assert main([str(a) for a in argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["height"] == 32 and len(list((out / "images").glob("*.png"))) == 3
    capsys.readouterr()
    err = refused(capsys, *argv, "--height", "64", "--width", "64")  # with images it is kept
    assert "settings differ" in err


def test_a_full_disk_leaves_no_lock_and_copy_errors_are_one_line(sd_path, edit_path, tmp_path, capsys, monkeypatch):
    from rece.io import run_folder_lock

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(OSError, match="No space left"):
            with run_folder_lock(tmp_path / "run"):
                pass
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(shutil, "copyfile", full)
    err = refused(capsys, "apply", sd_path, edit_path, "-o", tmp_path / "out")
    assert err.startswith(f"error: no space left on device writing {tmp_path / 'out'} (") and " MB needed)" in err
    assert not list(tmp_path.iterdir())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shutil, "copyfile", denied)  # any other failure of the copy: the first file and how many more
    err = refused(capsys, "apply", sd_path, edit_path, "-o", tmp_path / "out")
    assert (
        "cannot copy '" in err
        and "more file(s) into the output (" in err
        and "Permission denied); check free space" in err
        and ".tmp" not in err
    )
    assert not list(tmp_path.iterdir())


def test_damaged_inputs_are_named(sd_path, edit_path, tmp_path, capsys):
    from .ldm_checkpoint import save_ldm_checkpoint

    ckpt = save_ldm_checkpoint(sd_path, tmp_path / "model.safetensors")
    with open(ckpt, "r+b") as f:
        f.truncate(ckpt.stat().st_size - 1000)  # a download cut short
    err = refused(capsys, "apply", ckpt, edit_path, "-o", tmp_path / "out.safetensors")
    assert f"'{ckpt}' is truncated" in err and "re-download" in err
    err = refused(capsys, "apply", edit_path, sd_path, "-o", tmp_path / "out")  # the model passed as the edit
    assert f"edit '{sd_path}' is a folder, not an edit file" in err and "MODEL first" in err
    assert "is a folder, not an edit file" in refused(capsys, "info", sd_path)


def test_closed_pipe_ends_quietly(edit_path):
    read, write = os.pipe()
    os.close(read)  # `| head` that has already gone
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "rece", "info", str(edit_path)], stdout=write, stderr=subprocess.PIPE, env=env)
    os.close(write)
    assert done.returncode == 141 and done.stderr == b""


def test_pixart_lora_advice_names_peft():
    from rece.errors import ReceError
    from rece.families.pixart import PIXART_SIGMA
    from rece.lora import kohya_modules

    with pytest.raises(ReceError, match="PixArt pipelines have no load_lora_weights: load it with peft") as info:
        kohya_modules(PIXART_SIGMA, ["transformer_blocks.0.attn2.to_k"], None)
    assert "(the pipeline's load_lora_weights" not in str(info.value)


def test_a_missing_component_is_named(sd_path, tmp_path, capsys):
    from rece.pipelines import load_pipeline

    broken = tmp_path / "model"
    shutil.copytree(sd_path, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(Exception, match="lists the component vae .AutoencoderKL. in model_index.json but has no vae/"):
        load_pipeline(broken)
    shutil.rmtree(broken / "tokenizer")
    err = refused(capsys, "erase", broken, "-c", "cat", "-o", tmp_path / "e.safetensors")
    assert "lists the component tokenizer (CLIPTokenizer) in model_index.json but has no tokenizer/ folder" in err


def test_repeated_concepts_are_erased_once(base):
    import rece

    once = rece.erase(base, ["cat"], method="uce")
    with pytest.warns(UserWarning, match=r"2 repeated concept\(s\) dropped \('Cat ', 'cat'\): each concept is erased once"):
        repeated = rece.erase(base, ["cat", "Cat ", "cat"], method="uce")
    assert repeated.concepts == ["cat"] and torch.equal(repeated.transform, once.transform)


def test_a_preserved_change_over_100_percent_is_warned(base, tmp_path, capsys):
    import rece

    with pytest.warns(UserWarning, match=r"preserved texts' keys/values changed by up to \d+ % \(''\), more than 100 %"):
        edit = rece.erase(base, ["cat"], epochs=300)
    assert edit.metadata["preservation"]["preserved"]["max"] > 1
    edit.save(tmp_path / "e.safetensors")
    assert main(["info", str(tmp_path / "e.safetensors")]) == 0
    assert "warning       the preserved texts' keys/values changed by up to" in capsys.readouterr().out
    assert "warning" not in rece.erase(base, ["cat"]).summary()


def test_allow_other_base_stays_within_the_family(sd_path, edit_path, tmp_path, capsys):
    forged = _forged(edit_path, tmp_path, "flux.safetensors", lambda m: {**m, "base": {**m["base"], "pipeline": "flux"}})
    for argv in (["apply", sd_path, forged, "-o", tmp_path / "out"], ["lora", sd_path, forged, "-o", tmp_path / "l"]):
        err = refused(capsys, *argv, "--allow-other-base")
        assert "this edit was made for a flux model" in err and "is a sd model; an edit applies to its own family only" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "l").exists()


def test_an_sdxl_refiner_single_file_is_refused_by_name_where_a_pipeline_is_built(sdxl_path, tmp_path):
    """diffusers builds no SDXL pipeline from a refiner's single file: the pipeline route (generate, apply to a
    folder) names it; erasing reads it without a pipeline (tests/test_comfy_files.py)."""
    from safetensors.torch import save_file

    from rece.errors import ReceError
    from rece.pipelines import load_single_file_pipeline

    from .ldm_checkpoint import SGM_CLIP_PREFIX, sgm_state_dict

    state = sgm_state_dict(sdxl_path)  # the refiner's layout: OpenCLIP alone, as embedders.0
    refiner = {k.replace("embedders.1.", "embedders.0."): v for k, v in state.items() if not k.startswith(SGM_CLIP_PREFIX)}
    path = tmp_path / "refiner.safetensors"
    save_file({k: v.contiguous() for k, v in refiner.items()}, str(path))
    with pytest.raises(ReceError) as info:
        load_single_file_pipeline(path, str(sdxl_path))
    assert f"'{path}' is an SDXL refiner checkpoint" in str(info.value) and "refiner's diffusers folder" in str(info.value)


def test_edits_made_from_the_previous_result_apply_in_order(sd_path, edit_path, tmp_path, capsys):
    from rece.edit import load_edit
    from rece.models import load_model

    dog = tmp_path / "dog.safetensors"
    assert main(["erase", str(sd_path), "-c", "dog", "-o", str(dog)]) == 0  # from the model itself, like cat
    capsys.readouterr()
    err = refused(capsys, "apply", sd_path, edit_path, dog, "-o", tmp_path / "x")
    assert "edit 2 (dog) was made from" in err and "rece erase MODEL --base-edit PREVIOUS.safetensors" in err
    after = tmp_path / "dog-after-cat.safetensors"
    assert main(["erase", str(sd_path), "--base-edit", str(edit_path), "-c", "dog", "-o", str(after)]) == 0
    assert f"after edit    {edit_path} (cat)" in capsys.readouterr().out
    err = refused(capsys, "apply", sd_path, after, "-o", tmp_path / "x")  # alone, or before its edit: refused
    assert f"after its edit(s) {edit_path}" in err and "with those edits applied first, in order" in err
    assert main(["apply", str(sd_path), str(edit_path), str(after), "-o", str(tmp_path / "both")]) == 0
    # the same weights as applying cat, then erasing dog from that model
    assert main(["apply", str(sd_path), str(edit_path), "-o", str(tmp_path / "cat-model")]) == 0
    cat_model = load_model(tmp_path / "cat-model")
    expected = load_edit(after).edited_kv(cat_model.kv)
    both = load_model(tmp_path / "both").kv
    assert all(torch.equal(both[n], w) for n, w in expected.items())
    assert main(["erase", str(tmp_path / "cat-model"), "-c", "dog", "-o", str(tmp_path / "direct.safetensors")]) == 0
    assert torch.equal(load_edit(tmp_path / "direct.safetensors").transform, load_edit(after).transform)


def test_a_demo_that_erased_nothing_says_so(tmp_path, capsys, monkeypatch):
    erase = demo.erase  # an erasure with no erase weight: the model is unchanged

    monkeypatch.setattr(demo, "erase", lambda pipe, **kw: erase(pipe, **{**kw, "uce_erase_scale": 0.0, "epochs": 0}))
    with pytest.warns(
        UserWarning,
        match=r"erasing 'triangle' from shapes with rece erased nothing: .* (\d+) % of the time before and \1 % after",
    ):
        metrics = demo.run_demo(tmp_path / "d", per_combo=1, steps=8, quiet=True)
    assert metrics["erased"] is False and metrics["before"]["erased_rate"] == metrics["after"]["erased_rate"] > 0
    assert "erased nothing" in (tmp_path / "d" / "report.html").read_text()
    assert main(["demo", "-o", str(tmp_path / "d"), "--per-combo", "1", "--steps", "8"]) == 1
    out, err = capsys.readouterr()
    assert "did not erase 'triangle' from shapes" in out and "warning: erasing 'triangle' from shapes" in err


def test_a_sweep_point_that_erased_nothing_says_so(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "shapes", "--concept", "triangle", "--method", "uce", "--vary", "uce_erase_scale", "--values", "0,1"]
    assert main([*argv, "--steps", "6", "--images", "1", "-o", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert "warning: uce_erase_scale=0.0 erased nothing: prompts naming 'triangle' show it in" in err
    assert "0 (erased nothing)" in printed and "1 (erased nothing)" not in printed
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p.get("erased nothing", False) for p in points] == [True, False]
