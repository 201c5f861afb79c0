"""What `rece` imports before it works: the package, its parsers, `--help` and `rece info` without torch or
transformers; `rece erase --json` says which part of the wait was imports, load, erase and write."""

import json
import os
import subprocess
import sys
from pathlib import Path

import rece
from rece.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers", "diffusers")


def run_python(code: str, *args: str) -> str:
    """stdout of `code` in a fresh interpreter (rece from this checkout)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def heavy_modules_after(code: str, *args: str) -> list[str]:
    """The heavy libraries imported once `code` has run (its own output is discarded)."""
    report = f"\nimport sys\nprint('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    line = [x for x in run_python(code + report, *args).splitlines() if x.startswith("HEAVY ")][-1]
    return json.loads(line.removeprefix("HEAVY ").replace("'", '"'))


def test_the_parsers_and_help_import_no_torch():
    code = """
import contextlib, io
import rece, rece.cli
parser = rece.cli.build_parser()
for argv in (["--help"], ["erase", "--help"], ["attack", "--help"], ["evaluate", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        rece.cli.main(argv)
parser.parse_args(["attack", "m", "--attack", "derived", "-o", "x", "--eta", "2"])
"""
    assert heavy_modules_after(code) == []


def test_info_reads_an_edit_without_torch(base, tmp_path, capsys):
    path = rece.erase(base, ["cat"], progress=False).save(tmp_path / "cat.safetensors")
    code = "import sys\nfrom rece.cli import main\nassert main(['info', sys.argv[1]]) == 0"
    assert heavy_modules_after(code, str(path)) == []
    assert main(["info", str(path)]) == 0
    assert capsys.readouterr().out.startswith(rece.load_edit(path).summary() + "\n")


def test_info_summary_of_per_layer_edits_matches_the_edit(base, tmp_path, capsys):
    path = rece.erase(base, ["cat"], technique="tensor", epochs=1, progress=False).save(tmp_path / "t.safetensors")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(rece.load_edit(path).summary() + "\n") and "derived       1 epoch(s)" in out


def test_info_refuses_an_edit_numpy_cannot_read_in_one_line(base, tmp_path, capsys):
    """rece info reads with numpy, which has no bfloat16: such a file (never an edit) is one line, not a traceback."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = rece.erase(base, ["cat"], progress=False).save(tmp_path / "cat.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()  # rece's metadata, kept
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, tmp_path / "bf16.safetensors", metadata)
    assert main(["info", str(tmp_path / "bf16.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a complete rece edit" in err and "\n" not in err


def test_the_package_names_load_on_first_use():
    code = """
import sys
import rece
assert not any(m in sys.modules for m in ("torch", "rece.erase", "rece.edit"))
assert set(rece.__all__) <= set(dir(rece))
from rece.erase import erase
assert rece.erase is erase  # the function, not the submodule of the same name
import rece.erase
assert rece.erase is erase and callable(rece.load_edit) and rece.EraseConfig.create("cat").concepts == ["cat"]
try:
    rece.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("a missing name must raise AttributeError")
"""
    run_python(code)


def parts(record: dict) -> float:
    return sum(record[f"{p}_seconds"] for p in ("imports", "load", "erase", "write"))


def test_erase_json_splits_the_wait(sd_path, tmp_path, capsys):
    assert main(["erase", str(sd_path), "-c", "cat", "-o", str(tmp_path / "a.safetensors"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert all(record[f"{p}_seconds"] >= 0 for p in ("imports", "load", "erase", "write"))
    assert record["erase_seconds"] > 0 and record["seconds"] >= parts(record) - 0.002  # 4 parts rounded to 0.1 ms
    assert record["imports_seconds"] < record["seconds"] < 60  # in-process: the wait began at main(), not at pytest's start

    assert main(["erase", str(sd_path), "-c", "cat", "-o", str(tmp_path / "b.safetensors"), "--overwrite"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {tmp_path / 'b.safetensors'} in ") and all(
        f"{p} " in last for p in ("imports", "load", "erase", "write")
    )


def test_a_rece_process_counts_its_imports(sd_path, tmp_path):
    """As its own process, `rece erase` counts from the process start: Python and torch's import are in `imports`."""
    env = {**os.environ, "PYTHONPATH": SRC}
    out = tmp_path / "e.safetensors"
    argv = [sys.executable, "-m", "rece", "erase", str(sd_path), "-c", "cat", "-o", str(out), "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout)
    assert record["imports_seconds"] > 0.05  # at least Python's start and torch's import
    assert record["seconds"] >= parts(record) - 0.002 and out.is_file()


def test_process_seconds_counts_from_the_process_start():
    code = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 0.3:\n    pass\n"
    code += "from rece.elapsed import process_seconds\nprint(process_seconds())"
    assert 0.3 <= float(run_python(code)) < 30
