"""`rece robustness`: the whole matrix on the shapes model (CSV, page, resume, refusals) and its bad input."""

from __future__ import annotations

import csv
import json

import pytest

from rece import robustness
from rece.cli import main
from rece.errors import ReceError
from rece.robustness import CSV_FILE, HTML_FILE, RECORD_FILE, key, run_robustness
from rece.robustness_params import attack_overrides, chosen_attacks

METHODS = ("none", "uce", "rece")
MEASURES = ("named", "others", "colours", "erased_colours", "attack:derived", "attack:ring-a-bell")
TINY = ["--images", "1", "--steps", "6", "--attack-param", "ring-a-bell:population=4"]
TINY += ["--attack-param", "ring-a-bell:generations=2", "--attack-param", "ring-a-bell:length=4"]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def counting(monkeypatch, name: str) -> list:
    """Count the calls of robustness.NAME (generate_run, run_attack) from now on."""
    calls, original = [], getattr(robustness, name)

    def wrapped(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(robustness, name, wrapped)
    return calls


def test_matrix_on_shapes_end_to_end_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "matrix"
    argv = ["robustness", "shapes", "--concept", "triangle", "--methods", "uce", "rece"]
    argv += ["--attacks", "derived", "ring-a-bell", *TINY, "-o", str(out)]
    assert main(argv) == 0
    assert "robustness.csv" in capsys.readouterr().out
    header, *rows = read_csv(out / CSV_FILE)
    assert header == ["model", "concept", "method", "measure", "value", "images"]
    cells = {(r[2], r[3]): (float(r[4]), int(r[5])) for r in rows}
    assert len(cells) == len(rows) == len(METHODS) * len(MEASURES)  # each (method, measure) once
    assert set(cells) == {(m, s) for m in METHODS for s in MEASURES}
    assert {(r[0], r[1]) for r in rows} == {("shapes", "triangle")}
    assert all(0 <= value <= 200 and images > 0 for value, images in cells.values())
    assert cells["none", "others"][0] == 100.0  # the baseline relative to itself
    assert cells["none", "named"][1] == 8 * 1 and cells["none", "colours"][1] == 32  # 8 of 32 prompts name it
    assert cells["none", "attack:derived"][1] == 4  # 4 × the images of a prompt for the one concept
    assert cells["uce", "named"][0] < cells["none", "named"][0]  # the erasure works on the prompts naming it
    page = (out / HTML_FILE).read_text(encoding="utf-8")
    assert page.count("<table") == 1 and "<h2>shapes</h2>" in page and "ring-a-bell" in page and "population" in page
    # a rerun does nothing again: no image drawn, no attack run, no file rewritten
    files = {p: p.stat().st_mtime_ns for p in (out / "triangle").rglob("*") if p.is_file()}
    generated, attacked = counting(monkeypatch, "generate_run"), counting(monkeypatch, "run_attack")
    assert main(argv) == 0
    assert generated == [] and attacked == []
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert read_csv(out / CSV_FILE) == [header, *rows]
    # a killed run (one measurement unfinished, images missing) continues with exactly that one
    record = json.loads((out / RECORD_FILE).read_text())
    del record["results"][key("triangle", "rece", "attack:ring-a-bell")]
    (out / RECORD_FILE).write_text(json.dumps(record))
    images = sorted((out / "triangle" / "rece" / "attack-ring-a-bell" / "images").iterdir())
    for image in images[:3]:
        image.unlink()
    edit = out / "triangle" / "rece" / "edit.safetensors"
    edited = edit.stat().st_mtime_ns
    assert main(argv) == 0
    assert generated == [] and len(attacked) == 1
    assert all(image.is_file() for image in images) and edit.stat().st_mtime_ns == edited
    assert read_csv(out / CSV_FILE)[0] == header and len(read_csv(out / CSV_FILE)) == len(rows) + 1
    # a rerun may add an attack (a concept named twice is measured once): only the new one runs
    at = argv.index("ring-a-bell") + 1
    more = [*argv[:at], "derived-from-uce", *argv[at:], "--concept", "triangle"]
    assert main(more) == 0
    assert generated == [] and len(attacked) == 1 + len(METHODS)
    added = [r for r in read_csv(out / CSV_FILE)[1:] if r[3] == "attack:derived-from-uce"]
    assert sorted(r[2] for r in added) == sorted(METHODS) and all(float(r[4]) >= 0 for r in added)
    # other settings are refused in one line
    capsys.readouterr()
    assert main([*argv[:-2], "--images", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and len(err.splitlines()) == 1
    # ... and so is an attack measured with other parameters (an added attack is not: above)
    assert main([*argv, "--attack-param", "ring-a-bell:generations=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ring-a-bell with other parameters" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--concept", "triangle", "--methods", "uce", "esd"], "unknown method 'esd'"),
        (["--concept", "triangle", "--attacks", "mystery"], "unknown attack 'mystery'"),
        ([], "no concept"),
        (["--concept", "dog"], "not a shape or colour"),
        (["--concept", "red", "--attacks", "derived", "--attack-param", "ring-a-bell:population=4"], "not among the attacks"),
        (["--concept", "red", "--attack-param", "ring-a-bell:population=1"], "--population must be at least 2"),
        (["--concept", "red", "--attack-param", "population"], "ATTACK:KEY=VALUE"),
        (["--concept", "red", "--images", "0"], "--images must be at least 1"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "matrix"
    assert main(["robustness", "shapes", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_other_models_need_prompts_for_the_prompt_attacks(tmp_path):
    with pytest.raises(ReceError, match="pass --prompts"):
        run_robustness("tiny", tmp_path / "m", concepts=["cat"], attacks=["ring-a-bell"])


def test_attack_choices():
    assert chosen_attacks(["all"])[-1] == "derived-from-uce" and "textual-inversion" in chosen_attacks(["all"])
    assert chosen_attacks(["ring-a-bell", "derived"]) == ["derived", "ring-a-bell"]  # the registry's order
    assert attack_overrides(["ring-a-bell:eta=5.5", "unlearndiff:adv-tokens=3"]) == {
        "ring-a-bell": {"eta": 5.5},
        "unlearndiff": {"adv_tokens": 3},
    }


def test_an_edit_that_erased_nothing_is_said_plainly():
    def row(method, value, concept="red"):
        return {"model": "shapes-mmdit", "concept": concept, "method": method, "measure": "named", "value": value, "images": 8}

    rows = [row("none", 100.0), row("uce", 0.0), row("rece", 100.0), row("robust", 12.5)]
    rows += [row("none", 100.0, "triangle"), row("rece", 0.0, "triangle")]
    rows.append({**row("rece", 100.0), "measure": "colours"})  # only `named` says whether the concept was erased
    said = robustness.not_erased(rows)
    assert said == [
        "rece erased nothing of 'red' from shapes-mmdit: prompts naming it show it 100.0 % of the time, 100.0 % on the "
        "unedited model"
    ]
    assert robustness.not_erased([row("rece", 100.0)]) == []  # no baseline row: nothing to compare with


def test_csv_grows_while_the_matrix_runs(tmp_path, monkeypatch):
    """An interrupted matrix leaves the CSV of what it finished: a long run can be read while it runs."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(robustness, "measure_attack", interrupted)
    out = tmp_path / "matrix"
    argv = ["robustness", "shapes", "--concept", "red", "--methods", "uce", "--attacks", "derived", *TINY[:4], "-o", str(out)]
    assert main(argv) != 0  # the CLI says it was interrupted
    header, *rows = read_csv(out / CSV_FILE)
    assert header == list(robustness.HEADER) and rows
    assert {(r[2], r[3]) for r in rows} == {("none", m) for m in ("named", "others", "colours", "erased_shapes")}


def test_preservation_measures_say_what_they_count():
    """A shape erased: colours over every image (the erased prompts keep theirs); a colour erased: colours over the
    other prompts' images (its own are meant to lose it) and erased_shapes over its own."""
    from rece.robustness import preservation_rows

    counts = dict(named=8, named_shown=1, named_coloured=2, named_shaped=6, others=24, others_kept=24,
                  others_coloured=21, all=32, coloured=23)  # fmt: skip
    shape = {r["measure"]: (r["value"], r["images"]) for r in preservation_rows(counts, counts, "triangle")}
    assert shape == {"named": (12.5, 8), "others": (100.0, 24), "colours": (71.875, 32), "erased_colours": (25.0, 8)}
    colour = {r["measure"]: (r["value"], r["images"]) for r in preservation_rows(counts, counts, "red")}
    assert colour == {"named": (12.5, 8), "others": (100.0, 24), "colours": (87.5, 24), "erased_shapes": (75.0, 8)}


def test_erase_options_reach_every_edit_and_the_settings(tmp_path):
    """--erase-option KEY=VALUE: over the recipe for each method's edit, recorded in the settings (only when given, so
    folders measured before stay comparable); an unknown key or a bad value is one line before anything runs."""
    from rece.edit import load_edit
    from rece.models import load_model
    from rece.robustness import Matrix, check_config
    from rece.robustness_params import RobustnessConfig, erase_overrides

    assert erase_overrides(["support=1", "adversarial-rounds=2", "map_to_target=false"]) == {
        "support": 1, "adversarial_rounds": 2, "map_to_target": False}  # fmt: skip
    config = RobustnessConfig(concepts=["triangle"], methods=["robust"], erase_option=["support=1", "adversarial_rounds=1"])
    matrix = Matrix("shapes", config, [], {}, tmp_path, base=load_model("shapes"))
    assert matrix.settings()["erase_options"] == {"support": 1, "adversarial_rounds": 1}
    assert "erase_options" not in Matrix("shapes", RobustnessConfig(concepts=["triangle"]), [], {}, tmp_path).settings()
    edit = load_edit(matrix.edit_path("triangle", "robust"))
    assert edit.metadata["config"]["support"] == 1 and edit.metadata["config"]["adversarial_rounds"] == 1
    assert edit.metadata["config"]["targets"][4] == "a blue cross"  # the robust recipe's own targets kept
    for bad, message in ((["suport=1"], "takes KEY=VALUE"), (["concepts=x"], "takes KEY=VALUE"), (["support=2"], "support")):
        with pytest.raises(ReceError, match=message):
            check_config("shapes", RobustnessConfig(concepts=["triangle"], erase_option=bad))
