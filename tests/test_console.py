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
