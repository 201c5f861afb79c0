"""Parameters defined once: dataclass fields that carry their default and help, from which the CLI flags are made.

    @dataclass
    class Params:
        steps: int = option(40, "optimisation steps per timestep")

`add_options(parser, Params)` adds `--steps` (type from the annotation, default None meaning "the field's default",
help with the default appended) and `option_values(args, Params)` reads back the values given. A `bool` field whose
default is True becomes a `--no-NAME` switch; a `list[str]` field a repeatable flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence

_MISSING = dataclasses.MISSING


def option(
    default=_MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    short: str | None = None,
    cli: bool = True,
    default_factory=_MISSING,
):
    """A dataclass field with its help text; `flag` overrides the derived `--name`, `cli=False` keeps it off the CLI."""
    metadata = {"help": help, "flag": flag, "short": short, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def finite_float(text: str) -> float:
    """argparse type of a number (range checks are the config's)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def _kind(field: dataclasses.Field) -> str:
    """'bool', 'list', 'int', 'float' or 'str', from the (string) annotation."""
    annotation = str(field.type)
    for kind in ("bool", "list", "int", "float"):
        if annotation.startswith(kind) or f" {kind}" in annotation:
            return kind
    return "str"


def default_of(field: dataclasses.Field):
    """A field's default value (a fresh one for default_factory fields)."""
    return field.default_factory() if field.default_factory is not _MISSING else field.default


def shown(value) -> str:
    """A default as help texts show it: numbers as written (0.001), strings quoted (' ')."""
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def flag_of(field: dataclasses.Field) -> str:
    """The CLI flag of a field: its own, else `--name` (or `--no-name` for a switch that turns a default True off)."""
    if field.metadata.get("flag"):
        return field.metadata["flag"]
    name = field.name.replace("_", "-")
    return f"--no-{name}" if _kind(field) == "bool" and default_of(field) is True else f"--{name}"


def cli_fields(cls, skip: Sequence[str] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` that have a CLI flag."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and "help" in f.metadata and f.name not in skip]


def field_of(cls, name: str) -> dataclasses.Field:
    """The field `name` of the dataclass `cls`."""
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def help_of(field: dataclasses.Field) -> str:
    """A field's help with its default appended (None and empty defaults are explained by the help itself)."""
    default = default_of(field)
    text = field.metadata["help"]
    if default is None or default == [] or isinstance(default, bool):
        return text
    return f"{text} ({shown(default)})"


def add_option(parser, field: dataclasses.Field, help_text: str | None = None) -> None:
    """Add one field's flag to an argparse parser or group (default None: 'not given')."""
    flags = [flag_of(field)] + ([field.metadata["short"]] if field.metadata.get("short") else [])
    text = help_text if help_text is not None else help_of(field)
    kind = _kind(field)
    metavar = flags[0].lstrip("-").replace("-", "_").upper()  # named after the flag, not the field: --detector DETECTOR
    if kind == "bool":
        parser.add_argument(*flags, dest=field.name, action="store_true", default=None, help=text)
    elif kind == "list":
        parser.add_argument(*flags, dest=field.name, action="append", default=None, metavar=metavar, help=text)
    else:
        convert = {"int": int, "float": finite_float, "str": str}[kind]
        parser.add_argument(*flags, dest=field.name, type=convert, default=None, metavar=metavar, help=text)


def add_options(parser, cls, skip: Sequence[str] = ()) -> None:
    """Add a flag for every CLI field of the dataclass `cls`."""
    for field in cli_fields(cls, skip):
        add_option(parser, field)


def add_option_groups(parser, classes: dict[str, type], title: Callable[[str, type], str]) -> None:
    """One argument group per dataclass (`classes`: owner name → dataclass; `title(owner, cls)`: the group's heading)
    with the flags of its CLI fields. A field several dataclasses take is one flag, in its first owner's group, with
    each owner's default in its help when they differ; the other owners' groups name it in their description."""
    owners: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for owner, cls in classes.items():
        for field in cli_fields(cls):
            owners.setdefault(field.name, []).append((owner, field))
    groups = {}
    for owner, cls in classes.items():
        shared = [flag_of(f) for f in cli_fields(cls) if owners[f.name][0][0] != owner]
        groups[owner] = parser.add_argument_group(title(owner, cls), f"also {', '.join(shared)} (above)" if shared else None)
    for taken in owners.values():
        owner, field = taken[0]
        text = None
        if len({shown(default_of(f)) for _, f in taken}) > 1:
            defaults = ", ".join(f"{o} {shown(default_of(f))}" for o, f in taken)
            text = f"{field.metadata['help']} (defaults: {defaults})"
        add_option(groups[owner], field, text)


def option_values(args: argparse.Namespace, cls, skip: Sequence[str] = ()) -> dict:
    """The values of `cls`'s fields given on the command line (None: not given; a switch gives the opposite default)."""
    values = {}
    for field in cli_fields(cls, skip):
        value = getattr(args, field.name, None)
        if _kind(field) == "bool":
            value = (not default_of(field)) if value else None
        values[field.name] = value
    return values
