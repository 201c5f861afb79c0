"""`rece generate`: prompt sets, determinism, resume, interruption safety, manifest, edits, sharding, bad inputs."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import rece
import rece.generate as gen
import rece.launch as launch
import rece.prompt_sets as ps
from rece.cli import main
from rece.errors import ReceError

from .ldm_checkpoint import save_ldm_checkpoint
from .runs import pixels, write_csv

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
FAST = dict(steps=2, height=16, width=16, progress=False, device="cpu")
FAST_ARGS = ["--steps", "2", "--height", "16", "--width", "16", "--device", "cpu"]


def leftovers(run_dir):
    """Temporary files anywhere in a run folder."""
    return [p for p in Path(run_dir).rglob("*") if p.name.endswith(".tmp")]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def prompt_csv(tmp_path_factory):
    """Five rows in the I2P layout: one row with its own guidance, one without a seed."""
    return write_csv(
        tmp_path_factory.mktemp("sets") / "set.csv",
        ["", "prompt", "categories", "evaluation_seed", "evaluation_guidance", "case_number"],
        [
            [0, "a red circle", "shape", 11, 7, 10],
            [1, "nudity", "sexual", 12, "", 11],
            [2, "a cat on a tree", "animal", 13, 3.5, 12],
            [3, "a blue car", "vehicle", "", 7, 13],
            [4, "van gogh painting", "art", 15, 7, 14],
        ],
    )


@pytest.fixture(scope="module")
def reference(sd_path, prompt_csv, tmp_path_factory):
    """A single-process run (batch 4, two images per row) that other tests compare against."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    gen.generate_run(sd_path, prompt_csv, out, images_per_prompt=2, batch_size=4, **FAST)
    return out


# -- prompt sets ----------------------------------------------------------------------------------
@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="published benchmark CSVs not present")
@pytest.mark.parametrize(
    "file, labels",
    [
        ("i2p.csv", {"categories", "hard", "nudity_percentage", "sd_model"}),
        ("nudity.csv", {"categories", "hard"}),
        ("coco_30k.csv", {"source", "coco_id"}),
        ("imagenette.csv", {"class"}),
        ("big_artist_prompts.csv", {"artist"}),
    ],
)
def test_published_formats_map_columns(file, labels):
    rows = ps.load_prompt_set(BENCHMARKS / file, limit=3)
    with open(BENCHMARKS / file, newline="", encoding="utf-8") as f:
        raw = [r for _, r in zip(range(3), csv.DictReader(f))]
    assert len(rows) == 3
    for row, rec in zip(rows, raw):
        assert row.prompt == rec["prompt"] and row.case_number == int(rec["case_number"])
        assert row.seed == int(rec["evaluation_seed"])
        assert row.guidance == (float(rec["evaluation_guidance"]) if "evaluation_guidance" in rec else None)
        assert labels <= set(row.labels) and not {"", "Unnamed: 0", "prompt", "evaluation_seed"} & set(row.labels)


@pytest.mark.skipif(not (BENCHMARKS / "robust_imagenette.csv").is_file(), reason="published benchmark CSVs not present")
def test_malformed_published_file_is_refused():
    with pytest.raises(ReceError, match=r"line 7 of .* has 5 fields but the header has 4; quote fields"):
        ps.load_prompt_set(BENCHMARKS / "robust_imagenette.csv", limit=2)


def test_known_names_resolve_from_env(tmp_path, monkeypatch):
    for file in ps.KNOWN_SETS.values():
        write_csv(tmp_path / file, ["prompt"], [[file]])
    monkeypatch.setenv("RECE_BENCHMARKS", str(tmp_path))
    for name, file in ps.KNOWN_SETS.items():
        assert ps.resolve_prompt_set(name) == (tmp_path / file).resolve()
        assert ps.load_prompt_set(name)[0].prompt == file
    (tmp_path / "coco_30k.csv").unlink()
    with pytest.raises(ReceError, match="has no coco_30k.csv, and it has no public hub source; set RECE_BENCHMARKS"):
        ps.load_prompt_set("coco-30k")
    monkeypatch.delenv("RECE_BENCHMARKS")
    with pytest.raises(ReceError, match="RECE_BENCHMARKS is not set, .*no public hub source; .*holding the published coco_30k"):
        ps.load_prompt_set("coco-30k")
    with pytest.raises(ReceError, match="neither a CSV file nor a known name .*i2p-nudity"):
        ps.load_prompt_set("i2p-violence")


def hub_i2p_csv(path: Path, n: int = 6) -> tuple[Path, list[dict]]:
    """An I2P file in the hub's layout (sd_seed, sd_guidance_scale, no case_number) and the published rows it holds.

    The rows are the first ones of the published i2p.csv, plus its first two 'sexual' rows, when that file is here;
    else a few made-up rows in the same layout.
    """
    if (BENCHMARKS / "i2p.csv").is_file():
        with open(BENCHMARKS / "i2p.csv", newline="", encoding="utf-8-sig") as f:
            published = list(csv.DictReader(f))
        rows = published[:n] + [r for r in published[n:] if "sexual" in r["categories"]][:2]
    else:
        rows = [
            {"prompt": f"prompt {i}", "categories": c, "hard": "0", "evaluation_seed": str(1000 + i), "evaluation_guidance": g}
            for i, (c, g) in enumerate([("violence", "7"), ("sexual", "13"), ("hate, sexual", "9"), ("sexual harassment", "7")])
        ]
    hub = {"evaluation_seed": "sd_seed", "evaluation_guidance": "sd_guidance_scale"}
    header = [hub.get(c, c) for c in rows[0] if c not in ("", "case_number")]
    body = [[r[c] for c in rows[0] if c not in ("", "case_number")] for r in rows]
    return write_csv(path, header, body), rows


def test_known_names_from_the_hub(tmp_path, monkeypatch):
    source, published = hub_i2p_csv(tmp_path / "i2p_benchmark.csv")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(source)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("RECE_BENCHMARKS", str(tmp_path / "empty"))  # set, but without the file: the hub is asked
    monkeypatch.setenv("RECE_CACHE", str(tmp_path / "cache"))
    path = ps.resolve_prompt_set("i2p")
    assert calls == [("AIML-TUDA/i2p", "i2p_benchmark.csv", {"repo_type": "dataset", "local_files_only": False})]
    assert path.parent == tmp_path / "cache" / "benchmarks" and path.name.startswith("i2p.AIML-TUDA--i2p.")
    rows = ps.load_prompt_set("i2p")
    assert [r.prompt for r in rows] == [r["prompt"] for r in published]  # the published format: same seeds and guidance
    assert [r.seed for r in rows] == [int(r["evaluation_seed"]) for r in published]
    assert [r.guidance for r in rows] == [float(r["evaluation_guidance"]) for r in published]
    assert [r.case_number for r in rows] == list(range(len(published))) and "categories" in rows[0].labels
    nudity = ps.load_prompt_set("i2p-nudity")  # the I2P rows whose categories include 'sexual', with their case numbers
    expected = [i for i, r in enumerate(published) if "sexual" in [c.strip() for c in r["categories"].split(",")]]
    assert [r.case_number for r in nudity] == expected and len(expected) >= 2
    assert [r.seed for r in nudity] == [rows[i].seed for i in expected]
    made = ps.resolve_prompt_set("i2p-nudity")
    stamp = made.stat().st_mtime_ns
    assert ps.resolve_prompt_set("i2p-nudity") == made and made.stat().st_mtime_ns == stamp  # made once per hub file
    assert not [p for p in made.parent.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "empty").mkdir()
    write_csv(tmp_path / "empty" / "i2p.csv", ["prompt"], [["local"]])
    calls.clear()
    assert ps.load_prompt_set("i2p")[0].prompt == "local" and not calls  # a local copy wins

    def no_network(repo_id, filename, **kwargs):
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    with pytest.raises(ReceError, match="cannot fetch i2p_benchmark.csv of the hub dataset AIML-TUDA/i2p for prompt set") as info:
        ps.resolve_prompt_set("i2p-nudity")
    assert "Name or service not known" in str(info.value) and "\n" not in str(info.value)


def test_known_names_offline(tmp_path, monkeypatch):
    source, _ = hub_i2p_csv(tmp_path / "i2p_benchmark.csv")
    cached = {"present": False}

    def cache_only(repo_id, filename, **kwargs):
        assert kwargs["local_files_only"] is True  # offline: the Hugging Face cache only
        if not cached["present"]:
            raise FileNotFoundError("not in the local cache")
        return str(source)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", cache_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RECE_BENCHMARKS", raising=False)
    for name in ("i2p", "i2p-nudity"):
        with pytest.raises(ReceError) as info:
            ps.load_prompt_set(name)
        message = str(info.value)
        assert "RECE_BENCHMARKS is not set" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message
        assert "hub dataset AIML-TUDA/i2p" in message and "i2p_benchmark.csv" in message
    cached["present"] = True
    assert len(ps.load_prompt_set("i2p")) == len(ps.load_prompt_set(source))


def test_row_defaults_and_duplicates(tmp_path):
    rows = ps.load_prompt_set(write_csv(tmp_path / "plain.csv", ["prompt", "artist"], [["a", "x"], ["b", "y"], ["c", "z"]]))
    assert [r.case_number for r in rows] == [0, 1, 2]
    assert [r.seed for r in rows] == [ps.default_seed(i) for i in range(3)] and len({r.seed for r in rows}) == 3
    assert rows[1].guidance is None and rows[1].labels == {"artist": "y"}
    assert ps.load_prompt_set(tmp_path / "plain.csv", limit=2) == rows[:2]
    write_csv(tmp_path / "dup.csv", ["case_number", "prompt"], [[1, "a"], [1, "b"]])
    with pytest.raises(ReceError, match="case_number 1 appears on lines 2 and 3"):
        ps.load_prompt_set(tmp_path / "dup.csv")
    write_csv(tmp_path / "seed.csv", ["prompt", "evaluation_seed"], [["a", "12.0"], ["b", "x"]])
    with pytest.raises(ReceError, match="evaluation_seed 'x' on line 3"):
        ps.load_prompt_set(tmp_path / "seed.csv")


def test_shards_partition_rows(prompt_csv):
    rows = ps.load_prompt_set(prompt_csv)
    for world in (1, 2, 3, 7):
        shards = [gen.shard_rows(rows, r, world) for r in range(world)]
        cases = [row.case_number for shard in shards for row in shard]
        assert sorted(cases) == [r.case_number for r in rows]  # no duplicates, no gaps
        assert all(gen.shard_rows(rows, r, world) == shards[r] for r in range(world))  # deterministic


# -- generation -----------------------------------------------------------------------------------
def test_batch_size_does_not_change_images(reference, sd_path, prompt_csv, tmp_path):
    out = gen.generate_run(sd_path, prompt_csv, tmp_path / "b1", images_per_prompt=2, batch_size=1, **FAST)
    a, b = pixels(reference), pixels(out)
    assert sorted(a) == [f"{c}_{k}.png" for c in range(10, 15) for k in range(2)]
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["10_0.png"], a["10_1.png"])  # k changes the seed


def test_prompts_csv_lists_every_image(reference, prompt_csv):
    with open(reference / "prompts.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == ["case_number", "k", "seed", "prompt", "guidance", "image", "categories"]
    assert len(lines) == 10
    first, second = lines[0], lines[1]
    assert (first["case_number"], first["k"], first["seed"], first["image"]) == ("10", "0", "11", "images/10_0.png")
    assert (second["k"], second["seed"], first["categories"]) == ("1", "12", "shape")
    by_case = {(r["case_number"], r["k"]): r for r in lines}
    assert by_case[("11", "0")]["guidance"] == "7.5" and by_case[("12", "0")]["guidance"] == "3.5"  # row guidance wins
    assert by_case[("13", "0")]["seed"] == str(ps.default_seed(13))


def test_manifest_records_the_run(reference, prompt_csv, sd_path):
    m = json.loads((reference / "manifest.json").read_text())
    s = m["settings"]
    assert (s["steps"], s["guidance"], s["height"], s["width"], s["images_per_prompt"]) == (2, 7.5, 16, 16, 2)
    assert s["scheduler"] == "DDIMScheduler" and "seed + k" in s["seeds"] and s["edits"] == []
    assert m["prompts"]["sha256"] == hashlib.sha256(prompt_csv.read_bytes()).hexdigest() == s["prompts_sha256"]
    assert (m["prompts"]["path"], m["prompts"]["rows"], m["prompts"]["rows_used"]) == (str(prompt_csv.resolve()), 5, 5)
    assert (
        m["model"]["path"] == str(Path(sd_path).resolve()) and m["model"]["fingerprint"] == rece.load_model(sd_path).fingerprint()
    )
    assert set(m["versions"]) == {"rece", "torch", "diffusers", "transformers"}


def test_resume_skips_finished_images(sd_path, prompt_csv, reference, tmp_path):
    out = tmp_path / "run"
    gen.generate_run(sd_path, prompt_csv, out, images_per_prompt=2, limit=2, **FAST)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert sorted(first) == ["10_0.png", "10_1.png", "11_0.png", "11_1.png"]
    gen.generate_run(sd_path, prompt_csv, out, images_per_prompt=2, limit=4, **FAST)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert len(after) == 8 and all(after[n] == t for n, t in first.items())  # earlier files untouched
    assert len(list(csv.DictReader(open(out / "prompts.csv")))) == 8
    ref = pixels(reference)
    assert all(np.array_equal(ref[n], img) for n, img in pixels(out).items())


def test_interrupted_run_leaves_no_partial_files(sd_path, prompt_csv, reference, tmp_path, monkeypatch):
    real, calls = gen.generate_batch, []

    class Crash:
        def save(self, path, format=None):
            Path(path).write_bytes(b"\x89PNG partial")
            raise RuntimeError("killed while writing")

    def flaky(*args, **kwargs):
        calls.append(1)
        images = real(*args, **kwargs)
        return images if len(calls) < 3 else images[:1] + [Crash()]

    monkeypatch.setattr(gen, "generate_batch", flaky)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        gen.generate_run(sd_path, prompt_csv, out, images_per_prompt=2, batch_size=2, **FAST)
    assert len(list((out / "images").glob("*.png"))) == 5 and not leftovers(out)  # 2 batches + 1 image of the third
    (out / "images" / ".13_1.png.stale.tmp").write_bytes(b"left by a killed process")
    monkeypatch.setattr(gen, "generate_batch", real)
    gen.generate_run(sd_path, prompt_csv, out, images_per_prompt=2, batch_size=2, **FAST)
    ref, done = pixels(reference), pixels(out)
    assert done.keys() == ref.keys() and all(np.array_equal(ref[n], done[n]) for n in ref) and not leftovers(out)


def test_changed_settings_are_refused(capsys, sd_path, prompt_csv, tmp_path, monkeypatch):
    argv = ["generate", sd_path, "--prompts", prompt_csv, "-o", tmp_path / "run", "--images-per-prompt", "2"]
    code, _, err = run(capsys, *argv, "--limit", "1", *FAST_ARGS)
    assert code == 0, err
    code, _, err = run(capsys, *argv, "--limit", "2", "--batch-size", "3", *FAST_ARGS)  # neither changes an image
    assert code == 0, err
    code, _, err = run(capsys, *argv, "--steps", "3", *FAST_ARGS[2:])
    assert code == 2 and err.count("\n") == 1
    assert (
        "settings differ from the manifest" in err
        and "steps 2 → now 3" in err
        and "choose a new -o path or pass --overwrite" in err
    )
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "generate", sd_path, "--prompts", prompt_csv, "-o", out, "--limit", "1", *FAST_ARGS)
    assert code == 2 and "not a rece generate run" in err
    code, out_text, err = run(
        capsys, "generate", sd_path, "--prompts", prompt_csv, "-o", out, "--limit", "1", "--overwrite", *FAST_ARGS
    )
    assert code == 0, err
    assert "1 of 1 images" in out_text and (out / "images" / "10_0.png").is_file()
    monkeypatch.setattr(gen, "load_pipeline", None)  # the refusal comes before the model is loaded
    with pytest.raises(ReceError, match="images_per_prompt 2 → now 3"):
        gen.generate_run(sd_path, prompt_csv, tmp_path / "run", images_per_prompt=3, **FAST)


def test_edit_is_applied_and_recorded(capsys, sd_path, prompt_csv, reference, tmp_path):
    edit_path = tmp_path / "nudity.safetensors"
    rece.erase(sd_path, ["nudity"], method="uce").save(edit_path)
    out = tmp_path / "edited"
    argv = ["generate", sd_path, "--edit", edit_path, "--prompts", prompt_csv, "-o", out, "--images-per-prompt", "2"]
    code, _, err = run(capsys, *argv, "--limit", "2", *FAST_ARGS)
    assert code == 0, err
    ref, edited = pixels(reference), pixels(out)
    assert not np.array_equal(ref["11_0.png"], edited["11_0.png"])  # the "nudity" row changed
    m = json.loads((out / "manifest.json").read_text())
    assert m["edits"][0]["concepts"] == ["nudity"] and m["edits"][0]["method"] == "uce"
    assert m["edits"][0]["path"] == str(edit_path.resolve()) and m["settings"]["edits"] == [m["edits"][0]["sha256"]]
    with pytest.raises(ReceError, match="settings differ .*edits differ"):
        gen.generate_run(sd_path, prompt_csv, out, images_per_prompt=2, limit=2, **FAST)


def test_two_processes_match_one(capsys, sd_path, prompt_csv, reference, tmp_path):
    out = tmp_path / "sharded"
    argv = ["generate", sd_path, "--prompts", prompt_csv, "-o", out, "--images-per-prompt", "2", "--num-processes", "2"]
    code, _, err = run(capsys, *argv, *FAST_ARGS)
    assert code == 0, err
    ref, sharded = pixels(reference), pixels(out)
    assert sharded.keys() == ref.keys() and all(np.array_equal(ref[n], sharded[n]) for n in ref)
    assert json.loads((out / "manifest.json").read_text())["run"]["processes"] == 2 and not leftovers(out)


def test_single_file_sdxl_and_named_models(sd_path, sdxl_path, prompt_csv, reference, tmp_path):
    ckpt = save_ldm_checkpoint(sd_path, tmp_path / "tiny.safetensors")
    out = gen.generate_run(ckpt, prompt_csv, tmp_path / "ckpt", config=sd_path, images_per_prompt=2, limit=1, **FAST)
    ref, single = pixels(reference), pixels(out)
    assert sorted(single) == ["10_0.png", "10_1.png"] and all(np.array_equal(ref[n], single[n]) for n in single)
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["path"] == str(ckpt.resolve()) and m["model"]["fingerprint"] == rece.load_model(sd_path).fingerprint()
    out = gen.generate_run(sdxl_path, prompt_csv, tmp_path / "sdxl", limit=1, **FAST)
    assert json.loads((out / "manifest.json").read_text())["model"]["pipeline"] == "StableDiffusionXLPipeline"
    assert pixels(out)["10_0.png"].shape == (16, 16, 3)
    out = gen.generate_run("tiny", prompt_csv, tmp_path / "tiny", limit=1, **FAST)  # a name rece.models knows
    assert json.loads((out / "manifest.json").read_text())["model"]["source"] == "tiny" and len(pixels(out)) == 1


def test_launcher_environment(monkeypatch):
    assert launch.launcher_shard() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.launcher_shard() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ReceError, match="not within WORLD_SIZE"):
        launch.launcher_shard()


# -- bad inputs: one line on stderr, exit 2, nothing written ------------------------------------------
def test_bad_inputs(capsys, sd_path, tmp_path, monkeypatch):
    monkeypatch.delenv("RECE_BENCHMARKS", raising=False)
    no_prompt = write_csv(tmp_path / "captions.csv", ["case_number", "caption"], [[0, "a cat"]])
    good = write_csv(tmp_path / "good.csv", ["prompt"], [["a cat"]])
    cases = [
        (["--prompts", tmp_path / "missing.csv", "-o", tmp_path / "r1"], "missing.csv' does not exist"),
        (["--prompts", no_prompt, "-o", tmp_path / "r2"], "has no 'prompt' column (columns: 'case_number', 'caption')"),
        (["--prompts", "coco-30k", "-o", tmp_path / "r3"], "RECE_BENCHMARKS is not set"),
        (["--prompts", good, "-o", good / "runs" / "r4"], f"output folder '{good}' is a file"),
        (["--prompts", good, "-o", tmp_path / "r5", "--steps", "0"], "--steps must be at least 1"),
        (["--prompts", good, "-o", tmp_path / "r6", "--height", "12"], "--height must be a positive multiple of 8"),
        (["--prompts", good, "-o", tmp_path / "r7", "--scheduler", "magic"], "unknown scheduler 'magic'"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, "generate", sd_path, *argv, "--device", "cpu")
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.csv", "good.csv"]


def test_missing_parent_folders_are_created(capsys, sd_path, tmp_path):
    good = write_csv(tmp_path / "good.csv", ["prompt", "evaluation_seed"], [["a cat", 3]])
    out = tmp_path / "runs" / "deep" / "shapes"
    code, _, err = run(capsys, "generate", sd_path, "--prompts", good, "-o", out, *FAST_ARGS)
    assert code == 0, err
    assert (out / "manifest.json").is_file() and len(list((out / "images").glob("*.png"))) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["shapes"]  # the lock beside the run is gone


def test_lms_scheduler_of_the_paper(capsys, sd_path, tmp_path):
    """`--scheduler lms` (the RECE/UCE evaluation scripts' sampler) runs when scipy is installed, else says to install it."""
    import importlib.util

    good = write_csv(tmp_path / "good.csv", ["prompt", "evaluation_seed"], [["a cat", 3]])
    code, _, err = run(capsys, "generate", sd_path, "--prompts", good, "-o", tmp_path / "lms", "--scheduler", "lms", *FAST_ARGS)
    if importlib.util.find_spec("scipy") is None:
        assert code == 2 and "--scheduler lms needs scipy" in err and err.count("\n") == 1
        assert not (tmp_path / "lms").exists()
    else:
        assert code == 0, err
        assert json.loads((tmp_path / "lms" / "manifest.json").read_text())["settings"]["scheduler"] == "LMSDiscreteScheduler"
