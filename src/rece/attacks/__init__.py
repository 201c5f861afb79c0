"""`rece attack`: red-team an edited model with six attacks and write a run folder `rece evaluate` scores (ASR).

    from rece.attacks import run_attack
    run_attack("shapes", "triangle-rece.safetensors", "derived", "runs/derived-rece")
    run_attack("./sd", "nudity.safetensors", "ring-a-bell", "runs/rab", prompts="i2p-nudity", pairs="nudity-ring-a-bell.csv")

Attacks (one module each): `derived` (RECE's closed-form c′), `ring-a-bell` (genetic search over tokens for
E(prompt) + η·concept vector; text encoder only), `unlearndiff` (white-box prompt optimisation through the edited
UNet), `textual-inversion` (a new word learned on images of the concept with the edited model frozen), `mma`
(MMA-Diffusion's greedy coordinate-gradient search for tokens whose pooled CLIP embedding matches the prompt's, banned
words removed from the vocabulary; text encoder only), `inversion` (the conditioning rows themselves, every space and
the pooled vector, optimised through the edited denoiser on images of the concept). Every one satisfies the contract
`base.Attack` (its `Params`, `FAMILIES`, and the signatures of its steps); `registry` names them, `params` holds their parameters,
`runner` runs one into a run folder, `common` is the glue they share.

This package imports no torch until an attack runs: `run_attack` and `residual_table` load the runner when first used.
"""

from __future__ import annotations

from .registry import ATTACKS, attack_module, attack_parameters, make_params

__all__ = ["ATTACKS", "attack_module", "attack_parameters", "make_params", "residual_table", "run_attack"]


def __getattr__(name: str):
    """`run_attack` and `residual_table`, from the runner (torch and diffusers load with it)."""
    if name in ("run_attack", "residual_table"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
