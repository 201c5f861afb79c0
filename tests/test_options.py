"""Parameters defined once: the CLI flags of erase and attack come from the config dataclasses' fields."""

import dataclasses

import pytest

from rece.attacks import ATTACKS
from rece.cli import build_parser
from rece.cli.edit_commands import erase_config
from rece.config import EraseConfig
from rece.options import cli_fields, flag_of


def parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def test_every_erase_parameter_has_its_flag_with_default_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no help line wrapped
    with pytest.raises(SystemExit):
        parse("erase", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(EraseConfig):
        assert flag_of(field) in text, field.name
    assert "λ1 of the RECE step (0.1)" in text and "--no-map-to-target" in text and "--ridge" in text


def test_flags_map_back_to_the_config():
    args = parse(
        "erase", "m", "-c", "cat", "--concept", "dog", "--preserve", "a car", "--no-preserve-empty", "--epochs", "2",
        "--regularization", "1e-3", "--no-map-to-target", "--ridge", "0.5", "--layers", "up", "-o", "x",
    )  # fmt: skip
    config = erase_config(args)
    assert config.concepts == ["cat", "dog"] and config.preserve == ["a car"] and config.preserve_empty is False
    assert (config.epochs, config.regularization, config.ridge, config.layers) == (2, 1e-3, 0.5, ["up"])
    assert config.map_to_target is False and config.templates is True  # switches only turn their default off
    untouched = erase_config(parse("erase", "m", "-c", "cat", "-o", "x"))
    assert untouched == EraseConfig.create(["cat"])
    preset = erase_config(parse("erase", "m", "--preset", "nudity", "-o", "x"))
    assert (preset.concepts, preset.epochs) == (["nudity"], 3)  # a preset's values count unless a flag is given


def test_a_shapes_recipe_fills_what_the_command_line_leaves_unset():
    from rece.toy import door

    recipe = door.erasure_arguments("triangle", door.MMDIT)
    config = erase_config(parse("erase", "m", "-o", "x"), recipe)
    assert (config.target, config.uce_preserve_scale, config.regularization) == ("a circle", 1.0, 1e-3)
    assert config.concepts == recipe["concepts"] and config.preserve == recipe["preserve"]
    flags = parse("erase", "m", "--uce-preserve-scale", "0.5", "--regularization", "0.1", "-o", "x")
    given = erase_config(flags, recipe)
    assert (given.uce_preserve_scale, given.regularization) == (0.5, 0.1)


def test_attack_flags_come_from_each_attacks_params(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        parse("attack", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for module in ATTACKS.values():
        for field in cli_fields(module.Params):
            assert flag_of(field) in text, field.name
    assert "(defaults: unlearndiff 0.01, textual-inversion 0.005, inversion 0.005)" in text  # a flag three attacks share
    assert "genetic algorithm population (200)" in text and "--no-scale-lr" in text
    args = parse("attack", "m", "--attack", "textual-inversion", "-o", "x", "--no-scale-lr", "--lr", "0.1")
    assert (args.scale_lr, args.lr) == (True, 0.1)  # the switch was given; option_values turns it into scale_lr=False
