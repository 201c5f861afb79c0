"""The contract every attack implements: a module with these names and signatures, as k-diffusion's samplers share
one signature. `runner.run_attack` runs any module that satisfies `Attack`, in this order:

    params = module.Params(...); params.validate()     # before anything is loaded
    module.check(target, params)                       # before the run folder is made
    cases = module.cases(target, params)
    module.resolved(target, params)                    # the parameters as the manifest records them
    shared, info = module.prepare(target, params, store, sampling)   # once, kept in adversarial.safetensors
    result = module.attack_case(target, params, case, {**shared, **sampling})   # per case not yet done

A module satisfies it structurally (PEP 544: a module can implement a protocol); `tests/test_contracts.py`
checks every registered attack against these signatures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..families import Family
    from .common import AttackCase, CaseResult, Target


@runtime_checkable
class AttackParams(Protocol):
    """An attack's parameters: a dataclass of `options.option` fields (the paper's defaults, the CLI's flags)."""

    def validate(self) -> None:
        """Refuse values the attack cannot run with: a one-line ReceError naming the flag."""
        ...


@runtime_checkable
class Attack(Protocol):
    """An attack: its name, the model families it runs on, what it needs, its parameters and its steps."""

    NAME: str  # as `rece attack --attack` spells it
    FAMILIES: tuple[Family, ...] | None  # the families it runs on, their variants included (None: every family rece knows)
    NEEDS_PROMPTS: bool  # attacks a prompt set (True) or the edit's concepts (False)
    IMAGES_PER_PROMPT: int  # images per case unless --images-per-prompt says otherwise
    Params: type[AttackParams]

    def check(self, target: Target, params: AttackParams) -> None:
        """Refuse a run that cannot succeed on this target, before its run folder is made."""
        ...

    def cases(self, target: Target, params: AttackParams) -> list[AttackCase]:
        """What the attack runs on: one case per prompt row or per concept."""
        ...

    def resolved(self, target: Target, params: AttackParams) -> dict:
        """The parameters as the manifest records them (defaults taken from the target filled in, files by checksum)."""
        ...

    def prepare(self, target: Target, params: AttackParams, store: dict, sampling: dict) -> tuple[dict, dict]:
        """Work shared by the cases (tensors kept in adversarial.safetensors, reused from `store` on resume), and its
        numbers for the manifest."""
        ...

    def attack_case(self, target: Target, params: AttackParams, case: AttackCase, shared: dict) -> CaseResult:
        """Attack one case; `shared` holds `prepare`'s tensors and the sampling settings (steps, guidance, size)."""
        ...
