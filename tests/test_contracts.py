"""Written contracts: every registered attack satisfies `rece.attacks.base.Attack` (names, Params, the signatures of its
steps); every registered metric has a Params dataclass whose fields are `rece evaluate`'s flags, listed in its help with
their defaults; and the command line builds those parsers from light modules (no torch, diffusers or transformers)."""

import dataclasses
import inspect
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rece.attacks import ATTACKS, attack_module
from rece.attacks.base import Attack, AttackParams
from rece.cli import build_parser
from rece.families import FAMILIES
from rece.metrics import METRICS
from rece.metrics.params import AsrParams, ClipScoreParams
from rece.metrics.runner import metric_call
from rece.options import cli_fields, flag_of, help_of, option_values

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = ("check", "cases", "prepare", "attack_case", "resolved")


def contract_signature(module) -> dict[str, tuple[list[str], str]]:
    """(parameter names, return annotation) of each step, as `module` defines it (self left out of the protocol's)."""
    out = {}
    for step in STEPS:
        signature = inspect.signature(getattr(module, step))
        names = [p for p in signature.parameters if p != "self"]
        out[step] = (names, str(signature.return_annotation))
    return out


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_registered_attack_satisfies_the_contract(name):
    module = attack_module(name)
    assert isinstance(module, Attack)
    assert module.NAME == name and module.Params is ATTACKS[name].Params
    assert contract_signature(module) == contract_signature(Attack)
    assert module.FAMILIES is None or all(f in FAMILIES for f in module.FAMILIES)
    assert isinstance(module.NEEDS_PROMPTS, bool) and module.IMAGES_PER_PROMPT >= 1
    params = module.Params()
    assert dataclasses.is_dataclass(params) and isinstance(params, AttackParams)
    params.validate()  # the paper's defaults run
    assert all(f.metadata.get("help") for f in dataclasses.fields(module.Params))


def test_the_contract_refuses_a_module_that_breaks_it():
    module = attack_module("derived")
    missing = types.SimpleNamespace(**{k: getattr(module, k) for k in vars(module) if k != "resolved"})
    assert not isinstance(missing, Attack)
    renamed = types.SimpleNamespace(**vars(module))
    renamed.cases = lambda target, parameters: []
    assert isinstance(renamed, Attack) and contract_signature(renamed) != contract_signature(Attack)


def evaluate_help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # no help line wrapped
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_evaluate_help_lists_every_metric_with_its_options_and_defaults(capsys, monkeypatch):
    text = evaluate_help(capsys, monkeypatch)
    names = ", ".join(METRICS)
    assert f"--metric METRIC {names}" in text
    titles = {name: f"{name}: {entry.Params.__doc__.strip()}:" for name, entry in METRICS.items()}
    starts = sorted((text.index(title), name) for name, title in titles.items())  # every metric has its section
    for (start, name), (end, _) in zip(starts, [*starts[1:], (len(text), "")]):
        section = text[start:end]
        for field in cli_fields(METRICS[name].Params):
            assert flag_of(field) in section, (name, field.name)  # its own flag, or "also --flag (above)"
            assert help_of(field) in text, (name, field.name)  # the help with the default, where the flag is
    assert "--threshold THRESHOLD detection score threshold, between 0 and 1 (0.6)" in text
    assert "--classifier-resize CLASSIFIER_RESIZE shorter side before the 224 crop (232: IMAGENET1K_V2; 256: V1) (232)" in text
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert f"measure run folders: {names}" in " ".join(capsys.readouterr().out.split())


def test_evaluate_flags_become_each_metrics_params():
    args = build_parser().parse_args(
        ["evaluate", "run", "--detector", "nudenet", "--classifier-resize", "256", "--concept", "a,b", "--batch-size", "8"]
    )
    options = {}
    for entry in METRICS.values():
        options.update(option_values(args, entry.Params))
    _, asr, objects = metric_call("asr", {**options, "progress": False, "clip": object()})
    assert asr == AsrParams(detector_kind="nudenet", resize=256, concept=["a,b"], batch_size=8) and objects == {"progress": False}
    _, clip, objects = metric_call("clip-score", {**options, "clip": "stand-in"})
    assert clip == ClipScoreParams(batch_size=8) and objects == {"clip": "stand-in"}


def test_parsers_are_built_without_torch():
    """`rece attack --help` and `rece evaluate --help` read the registries and Params only: no model library loads."""
    script = f"""
import argparse, json, sys, types
# the package's own __init__ is the Python API; what is measured here is the command line's parsers
package = types.ModuleType("rece"); package.__path__ = [{str(SRC / "rece")!r}]; sys.modules["rece"] = package
from rece.cli import run_commands
run_commands.add_parsers(argparse.ArgumentParser().add_subparsers())
print(json.dumps(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
