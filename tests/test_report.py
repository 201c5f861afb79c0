"""`rece report`: metrics table, images matched by file name, edits, manifests, escaping, atomic writing, bad inputs."""

import base64
import csv
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rece
import rece.generate as gen
import rece.report as rp
from rece.cli import main
from rece.errors import ReceError

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cat", "a dog"]


def make_run(
    folder: Path, files: list[str], prompts: list[str], manifest: dict | None = None, metrics: dict | None = None
) -> Path:
    """A run folder as `rece generate` writes it (images/, prompts.csv, manifest.json), plus metrics.json if given."""
    (folder / "images").mkdir(parents=True)
    with open(folder / "prompts.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "k", "seed", "prompt", "guidance", "image"])
        for i, (name, prompt) in enumerate(zip(files, prompts)):
            rgb = np.full((8, 8, 3), (40 * i % 256, 100, 200), np.uint8)
            Image.fromarray(rgb).save(folder / "images" / name)
            writer.writerow([name.split("_")[0], 0, 100 + i, prompt, 7.5, f"images/{name}"])
    manifest = manifest or {"format": "rece-generate", "settings": {"steps": 2, "guidance": 7.5}, "edits": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def names(n: int) -> list[str]:
    return [f"{i}_0.png" for i in range(n)]


def clip_metrics(value: float) -> dict:
    return {"clip-score": {"summary": {"clip score": value}, "params": {}, "images": 3}}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(tmp_path / "original", names(3), PROMPTS, metrics=clip_metrics(31.25))
    b = make_run(
        tmp_path / "erased",
        names(3),
        PROMPTS,
        manifest={"format": "rece-generate", "edits": [{"method": "rece", "concepts": ["triangle"], "config": {"epochs": 2}}]},
        metrics=clip_metrics(20.5),
    )
    return a, b


def test_report_has_table_values_images_edits_and_manifests(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "report.html"
    code, stdout, err = run_cli(capsys, "report", a, b, "-o", out)
    assert code == 0, err
    assert "wrote" in stdout
    page = out.read_text(encoding="utf-8")
    assert "<th>clip score</th>" in page and "<td>31.250</td>" in page and "<td>20.500</td>" in page
    assert page.count("<img ") == 2 * 3
    assert page.count("src='data:image/png;base64,") == 2 * 3
    assert "<th>original</th>" in page and "<th>erased</th>" in page
    assert "original: 0_0.png" in page and "erased: 2_0.png" in page  # each image labelled with its run
    assert "none (original model)" in page
    assert "rece: triangle (epochs 2)" in page
    assert page.count("<details>") == 2
    for run in (a, b):
        pretty = json.dumps(json.loads((run / "manifest.json").read_text()), indent=2, ensure_ascii=False)
        assert html.escape(pretty) in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "<link" not in page  # self-contained


def test_max_images_limits_rows(two_runs, tmp_path):
    page = rp.build_report(two_runs, max_images=2)
    assert page.count("<img ") == 2 * 2
    assert "2 of the 3 images" in page


def test_images_matched_by_file_name(tmp_path):
    a = make_run(tmp_path / "a", ["0_0.png", "1_0.png", "2_0.png"], PROMPTS)
    b = make_run(tmp_path / "b", ["1_0.png", "2_0.png", "9_0.png"], ["x", "y", "z"])
    page = rp.build_report([a, b])
    assert page.count("<img ") == 2 * 2
    assert "a: 1_0.png" in page and "b: 2_0.png" in page
    assert "0_0.png" not in page and "9_0.png" not in page
    assert page.index("a blue square") < page.index("a green triangle")  # prompts from the first run, in its order


def test_prompts_and_names_are_escaped(tmp_path):
    evil = "<script>alert('x')</script> & <b>bold</b>"
    a = make_run(tmp_path / "a", names(1), [evil])
    page = rp.build_report([a])
    assert "<script>" not in page and "<b>bold</b>" not in page
    assert html.escape(evil) in page


def test_long_prompts_are_truncated_with_full_text_on_hover(tmp_path):
    long = "a painting of " + "very " * 40 + "many things"
    page = rp.build_report([make_run(tmp_path / "a", names(1), [long])])
    assert f"title='{html.escape(long, quote=True)}'" in page
    assert html.escape(rp._truncate(long)) in page and len(rp._truncate(long)) <= rp.PROMPT_CHARS


def test_metrics_columns_across_runs(tmp_path):
    a = make_run(tmp_path / "a", names(1), PROMPTS, metrics=clip_metrics(30.0))
    lpips = {"lpips": {"summary": {"lpips": 0.125}, "params": {}}}
    b = make_run(tmp_path / "b", names(1), PROMPTS, metrics={**clip_metrics(29.0), **lpips})
    c = make_run(tmp_path / "c", names(1), PROMPTS)
    page = rp.build_report([a, b, c])
    assert "<th>clip-score: clip score</th>" in page and "<th>lpips: lpips</th>" in page
    assert "<td>0.125</td>" in page
    assert page.count("<td>-</td>") == 3  # a: lpips; c: both


def test_no_metrics_says_how_to_get_them(tmp_path):
    page = rp.build_report([make_run(tmp_path / "a", names(1), PROMPTS)])
    assert "rece evaluate" in page


def test_run_labels_tell_same_named_folders_apart(tmp_path):
    assert rp.run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]
    assert rp.run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]


def test_written_atomically(two_runs, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old report")
    real_write = Path.write_text

    def failing_write(self, data, *args, **kwargs):
        real_write(self, data[:100], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError):
        rp.write_report(two_runs, out)
    monkeypatch.undo()
    assert out.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("no-manifest", "no manifest.json"),
        ("bad-manifest", "cannot read manifest"),
        ("nothing-in-common", "no image file names in common"),
        ("no-images", "no image file names in common"),
        ("bad-metrics", "no summary for"),
    ],
)
def test_bad_inputs_are_one_line_errors(two_runs, tmp_path, capsys, case, message):
    a, b = two_runs
    other = tmp_path / "other"
    if case == "no-manifest":
        make_run(other, names(3), PROMPTS)
        (other / "manifest.json").unlink()
    elif case == "bad-manifest":
        make_run(other, names(3), PROMPTS)
        (other / "manifest.json").write_text("{not json")
    elif case == "nothing-in-common":
        make_run(other, ["7_0.png"], PROMPTS)
    elif case == "no-images":
        make_run(other, [], [])
    elif case == "bad-metrics":
        make_run(other, names(3), PROMPTS, metrics={"clip-score": {"value": 1}})
    out = tmp_path / "report.html"
    code, _, err = run_cli(capsys, "report", a, other, "-o", out)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_options(two_runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", *two_runs, "-o", tmp_path / "nowhere" / "r.html")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "report", *two_runs, "-o", tmp_path / "r.html", "--max-images", "0")
    assert code == 2 and "--max-images must be at least 1" in err
    with pytest.raises(ReceError, match="at least one run folder"):
        rp.build_report([])


def test_report_of_real_runs_before_and_after_an_edit(sd_path, tmp_path, capsys):
    prompts = tmp_path / "set.csv"
    prompts.write_text("case_number,prompt,evaluation_seed\n0,a red circle,1\n1,van gogh painting,2\n")
    edit_path = tmp_path / "edit.safetensors"
    rece.erase(sd_path, ["van gogh"], method="uce").save(edit_path)
    fast = dict(steps=2, height=16, width=16, progress=False, device="cpu")
    before = gen.generate_run(sd_path, prompts, tmp_path / "before", **fast)
    after = gen.generate_run(sd_path, prompts, tmp_path / "after", edits=[edit_path], **fast)
    out = tmp_path / "report.html"
    code, _, err = run_cli(capsys, "report", before, after, "-o", out)
    assert code == 0, err
    page = out.read_text(encoding="utf-8")
    assert page.count("<img ") == 4
    assert "uce: van gogh (" in page and "technique &#x27;replace&#x27;" in page  # parameters from the edit file
    assert "2 steps" in page and "16×16" in page
    assert "preset" not in page.split("<h2>Edits and settings</h2>")[1].split("<h2>")[0]  # absent, not "preset None"


def test_large_images_are_shrunk_small_ones_kept(tmp_path):
    a = make_run(tmp_path / "a", names(2), PROMPTS)
    Image.fromarray(np.zeros((512, 640, 3), np.uint8)).save(a / "images" / "1_0.png")
    page = rp.build_report([a])
    sizes = [Image.open(io.BytesIO(base64.b64decode(uri.split("'")[0]))).size for uri in page.split("base64,")[1:]]
    assert sizes == [(8, 8), (rp.THUMBNAIL, rp.THUMBNAIL * 512 // 640)]


def test_short_cells_never_break_inside_a_word():
    # `overflow-wrap: anywhere` on every cell let the table squeeze the attack and ASR columns to "derive|d", "98.3|33"
    style = re.sub(r"/\*.*?\*/", "", rp.REPORT_STYLE, flags=re.S)
    for selector, body in (rule.split("{") for rule in style.split("}") if "{" in rule):
        if "anywhere" in body:
            assert ".runs td" not in selector and "td:nth-child(2)" in selector, selector  # only the model path column
    assert ".runs td { overflow-wrap: break-word; }" in rp.REPORT_STYLE


def test_absent_edit_parameters_are_left_out():
    config = {"preset": None, "target": " ", "epochs": 1, "lamb": None}
    manifest = {"edits": [{"method": "rece", "concepts": ["cat"], "config": config}]}
    assert rp.describe_edits(manifest) == "rece: cat (target ' ', epochs 1)"


def test_asr_and_other_values_read_the_same_in_the_page_and_on_the_terminal(tmp_path):
    asr = {"asr": {"summary": {"asr %": 98.33333, "prompt asr %": 100.0}, "params": {}}}
    lpips = {"lpips": {"summary": {"lpips": 0.12345}, "params": {}}}
    attack = {"format": "rece-attack", "attack": {"name": "derived", "concepts": ["cat"]}, "edits": []}
    run = make_run(tmp_path / "a", names(1), PROMPTS, manifest=attack, metrics={**asr, **lpips})
    page = rp.build_report([run])
    from rece.metrics.table import results_table

    terminal = results_table({"a": {**asr, **lpips}})
    for shown in ("98.33", "100.00", "0.123"):
        assert f"<td>{shown}</td>" in page and f" {shown}" in terminal
    assert "98.333" not in page and "98.333" not in terminal


def prompt_set_run(folder: Path, checksum: str, source: str) -> Path:
    manifest = {"format": "rece-generate", "settings": {"prompts_sha256": checksum}, "prompts": {"source": source}, "edits": []}
    return make_run(folder, names(2), PROMPTS, manifest=manifest)


def test_runs_of_different_prompt_sets_are_not_paired_by_file_name(tmp_path, capsys):
    a, b = prompt_set_run(tmp_path / "a", "1" * 64, "cats.csv"), prompt_set_run(tmp_path / "b", "1" * 64, "cats.csv")
    c = prompt_set_run(tmp_path / "c", "2" * 64, "dogs.csv")
    code, _, err = run_cli(capsys, "report", a, b, "-o", tmp_path / "same.html")
    assert code == 0 and "warning" not in err
    assert "<th>a</th><th>b</th>" in (tmp_path / "same.html").read_text()  # one set: side by side
    code, _, err = run_cli(capsys, "report", a, b, c, "-o", tmp_path / "mixed.html")
    assert code == 0
    assert "warning: the runs use 2 different prompt sets (a, b: prompt set cats.csv; c: prompt set dogs.csv)" in err
    page = (tmp_path / "mixed.html").read_text()
    assert "<th>a</th><th>b</th></tr>" in page and "<th>c</th></tr>" in page  # c's images in a table of their own
    assert "<th>b</th><th>c</th>" not in page and page.count("<img ") == 2 * 3
    with pytest.warns(UserWarning, match="different prompt sets"):
        rp.build_report([a, c])
