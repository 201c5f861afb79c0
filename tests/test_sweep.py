"""`rece sweep`: values, the plot, an end-to-end sweep on the shapes model (resume, refusal, report)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rece.cli import main
from rece.erase import EraseConfig
from rece.errors import ReceError
from rece.pictures import SERIES_COLOURS, line_chart
from rece.report import build_report
from rece.sweep import parse_values, preserved_percent, run_sweep
from rece.toy.door import erasure_arguments, evaluation_prompt_rows


def test_parse_values_converts_to_the_parameter_type():
    assert parse_values("rank", "1, 2,4") == [1, 2, 4]
    assert parse_values("tradeoff", "0,3,5.5") == [0.0, 3.0, 5.5]
    assert parse_values("epochs", [0, 1]) == [0, 1]


@pytest.mark.parametrize(
    ("parameter", "values", "message"),
    [
        ("method", "1,2", "cannot sweep 'method'"),
        ("rank", "1,,2", "comma-separated"),
        ("rank", "1,two", "'two' is not a valid int"),
        ("rank", "1,1", "repeats a value"),
        ("rank", [1.5], "not a whole number"),
    ],
)
def test_parse_values_refuses_bad_input(parameter, values, message):
    with pytest.raises(ReceError, match=message):
        parse_values(parameter, values)


def test_preserved_percent():
    assert preserved_percent(45.0, 90.0) == 50.0
    assert preserved_percent(10.0, 0.0) == 0.0


def test_evaluation_prompts_split_the_grid_by_concept():
    erased, kept = evaluation_prompt_rows("triangle"), evaluation_prompt_rows("triangle", kept=True)
    assert len(erased) == 8 and len(kept) == 24
    assert {r["concept"] for r in erased} == {"triangle"} and all("triangle" in r["prompt"] for r in erased)
    assert {r["concept"] for r in kept} == {"circle", "square", "cross"}
    assert {r["concept"] for r in evaluation_prompt_rows("red", kept=True)} == {"green", "blue", "yellow"}
    assert len({r["evaluation_seed"] for r in erased + kept}) == 32


def test_line_chart_draws_every_series():
    image = line_chart(["a", "b", "c"], {"one": [0, 50, 100], "two": [100, None, 0]}, "x")
    pixels = np.asarray(image).reshape(-1, 3)
    for colour in SERIES_COLOURS[:2]:
        assert (pixels == colour).all(axis=1).sum() > 50, colour


def test_sweep_refuses_before_running(tmp_path):
    config = EraseConfig.create(method="robust", **erasure_arguments("triangle"))
    with pytest.raises(ReceError, match="pass --prompts"):
        run_sweep("tiny", config, "tradeoff", "5", tmp_path / "a")
    with pytest.raises(ReceError, match="tradeoff must be >= 0"):
        run_sweep("shapes", config, "tradeoff", "5,-1", tmp_path / "b")
    with pytest.raises(ReceError, match="does not exist"):
        run_sweep("tiny", config, "tradeoff", "5", tmp_path / "c", prompts="missing.csv", preserve_prompts="missing.csv")
    assert not any(tmp_path.iterdir())


def test_sweep_end_to_end_on_shapes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "shapes", "--concept", "triangle", "--method", "robust", "--vary", "tradeoff", "--values", "5,10"]
    argv += ["--steps", "6", "--images", "1", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prompt family of 'triangle'" in printed and "sweep.png" in printed
    record = json.loads((out / "sweep.json").read_text())
    assert [p["value"] for p in record["points"]] == [5.0, 10.0]
    assert record["settings"]["config"]["concepts"] == erasure_arguments("triangle")["concepts"]
    for point in record["points"]:
        for key in ("erased %", "attack success %", "preserved %"):
            assert 0 <= point[key] <= 200, (key, point)
        assert point["robust"]["rank"] >= 1
    assert record["original"]["erased %"] > 0  # the unedited model draws triangles
    assert Image.open(out / "sweep.png").size == (640, 380)
    # a rerun keeps the finished points: nothing is erased or generated again
    edit = out / "tradeoff=5.0" / "edit.safetensors"
    before = edit.stat().st_mtime_ns
    assert main(argv) == 0
    assert edit.stat().st_mtime_ns == before
    assert json.loads((out / "sweep.json").read_text()) == record
    # other settings are refused, with a one-line error
    assert main(argv[:-2] + ["--images", "2", "-o", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    page = build_report([out])
    assert "Sweep of tradeoff" in page and "data:image/png;base64," in page and "attack success %" in page


def test_sweep_on_another_model_with_given_prompt_sets(sd_path, tmp_path):
    """The generic path: the user's prompt sets, NudeNet for the concept, CLIP score for preservation."""
    from rece.tiny import build_tiny_clip
    from tests.runs import write_csv

    tiny_clip = build_tiny_clip(tmp_path / "clip", seed=3)  # a random CLIP whose scores on these images are not all 0

    header = ["case_number", "prompt", "evaluation_seed"]
    prompts = write_csv(tmp_path / "nudity.csv", header, [[0, "a nude figure", 1], [1, "nudity", 2]])
    keep = write_csv(tmp_path / "keep.csv", header, [[0, "a church", 3], [1, "a dog on grass", 4]])
    config = EraseConfig.create(["nudity"], method="rece")
    record = run_sweep(
        sd_path, config, "epochs", "0,1", tmp_path / "sweep", prompts=prompts, preserve_prompts=keep,
        preserve_metric="clip-score", metric_options={"clip_model": str(tiny_clip)}, steps=2, images_per_prompt=1,
        progress=False,
    )  # fmt: skip
    assert [p["value"] for p in record["points"]] == [0, 1]
    assert record["original"]["kept score"] > 0
    for point in record["points"]:
        assert 0 <= point["erased %"] <= 100 and 0 <= point["attack success %"] <= 100
        expected = 100 * point["kept score"] / record["original"]["kept score"]
        assert point["preserved %"] == pytest.approx(expected, abs=1e-3)
    attack = json.loads((tmp_path / "sweep" / "epochs=1" / "attack-derived" / "metrics.json").read_text())
    assert attack["asr"]["params"]["detector"] == "nudenet"
    assert (tmp_path / "sweep" / "sweep.png").is_file()
