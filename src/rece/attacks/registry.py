"""The attacks rece has: each name with the module that runs it and its parameters, and the lookups by name.

Light on purpose: names and `Params` are all the command line needs to make its flags, so an attack's module (torch,
diffusers) is imported only when the attack is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import NamedTuple

from ..errors import ReceError
from .base import Attack, AttackParams
from .params import (
    DerivedParams,
    InversionParams,
    MMAParams,
    RingABellParams,
    TextualInversionParams,
    UnlearnDiffParams,
)


class Registered(NamedTuple):
    """One attack: its module in rece.attacks (satisfying `base.Attack`) and its parameters (that module's `Params`)."""

    module: str
    Params: type


ATTACKS: dict[str, Registered] = {
    "derived": Registered("derived", DerivedParams),
    "ring-a-bell": Registered("ring_a_bell", RingABellParams),
    "unlearndiff": Registered("unlearndiff", UnlearnDiffParams),
    "textual-inversion": Registered("textual_inversion", TextualInversionParams),
    "mma": Registered("mma", MMAParams),
    "inversion": Registered("inversion", InversionParams),
}


def registered(name: str) -> Registered:
    """The registry entry of an attack name; an unknown name is a one-line error listing the known ones."""
    if name not in ATTACKS:
        raise ReceError(f"unknown attack '{name}'; choose one of: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def attack_module(name: str) -> Attack:
    """The module that runs an attack (imported now)."""
    return importlib.import_module(f"{__package__}.{registered(name).module}")


def attack_parameters(name: str) -> dict[str, object]:
    """Every parameter of an attack with its default (the paper's setting)."""
    return {f.name: f.default for f in dataclasses.fields(registered(name).Params)}


def make_params(name: str, **values) -> AttackParams:
    """An attack's Params from keyword values (None means "the default"); unknown names are one-line errors."""
    known = attack_parameters(name)
    given = {k: v for k, v in values.items() if v is not None}
    unknown = [k for k in given if k not in known]
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in known)
        raise ReceError(f"--{unknown[0].replace('_', '-')} is not a parameter of the {name} attack; it takes {flags}")
    params = registered(name).Params(**given)
    params.validate()
    return params
