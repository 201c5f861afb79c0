"""What reaches the terminal: warnings from rece and its libraries, one line each; the filtered noisy ones hidden."""

import warnings

import rece.console as console
import rece.edit_file
from rece.cli import main
from rece.errors import ReceError


def failing_load(path):
    warnings.warn("a library says\nsomething on two lines", UserWarning, stacklevel=2)
    warnings.warn("something is deprecated", FutureWarning, stacklevel=2)
    raise ReceError("no such edit")


def test_library_warnings_reach_the_user(capsys, monkeypatch):
    monkeypatch.setattr(rece.edit_file, "read_edit_arrays", failing_load)
    assert main(["info", "x.safetensors"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "warning: a library says something on two lines" in err
    assert "warning: something is deprecated (FutureWarning)" in err
    assert "error: no such edit" in err


def test_known_noisy_warnings_are_filtered(capsys, monkeypatch):
    monkeypatch.setattr(console, "NOISY_WARNINGS", ((FutureWarning, "something is deprec", "test"),))
    monkeypatch.setattr(rece.edit_file, "read_edit_arrays", failing_load)
    assert main(["info", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "deprecated" not in err and "a library says" in err


def test_a_warning_under_a_progress_bar_gets_its_own_line(capsys):
    from tqdm.auto import tqdm

    with console.shown_warnings(), tqdm(total=2, desc="generating", file=None) as bar:
        bar.update(1)
        warnings.warn("careful", UserWarning, stacklevel=1)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "\nwarning: careful\n" in "\n" + err
    with console.shown_warnings():  # the noisy numpy-2 message of diffusers' Euler schedulers is filtered
        warnings.warn("__array__ implementation doesn't accept a copy keyword, so ...", DeprecationWarning, stacklevel=1)
    assert "__array__" not in capsys.readouterr().err


def test_noisy_library_log_lines_are_dropped_for_library_users_too(caplog):
    # transformers 5 without torchvision logs, for each image processor diffusers' pipelines import, that it falls
    # back to the PIL one: `import rece` drops that line (and only that one)
    import logging

    import rece  # noqa: F401  (importing rece installs the filters)

    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger="transformers.utils.import_utils"):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logger.warning("something the user should read")
    assert [r.getMessage() for r in caplog.records] == ["something the user should read"]


def test_the_python_api_prints_no_library_noise(tmp_path):
    # a fresh interpreter: what a script using rece as a library sees on stderr while rece loads and edits a model
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import rece, transformers, diffusers\n"
        "from rece.pipelines import load_pipeline\n"
        "pipe = load_pipeline('shapes')\n"
        "rece.erase(pipe, ['triangle']).apply(pipe)\n"
        "print(transformers.utils.logging.is_progress_bar_enabled(), diffusers.utils.logging.is_progress_bar_enabled())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_VERBOSITY", "PROGRESS_BARS"))}
    env["PYTHONPATH"] = str(Path(console.__file__).parents[1])  # this rece, wherever the test runs from
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no torchvision fallback notice, no loading bars of rece's own loads
    assert done.stdout.split() == ["True", "True"]  # the user's own library bars are left as they were
