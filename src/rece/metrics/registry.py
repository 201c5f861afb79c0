"""The metrics rece has: each name with the module that computes it and its parameters, and the lookups by name.

Light on purpose: names and `Params` are all the command line needs to make `rece evaluate`'s flags, so a metric's
module (torch, its network) is imported only when the metric runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..errors import ReceError
from .params import AsrParams, ClassifyParams, ClipScoreParams, FidParams, LpipsParams, NudenetParams, ShapesParams


class Registered(NamedTuple):
    """One metric: its module in rece.metrics, which defines `evaluate_<name>(run, params, ...)`, and its parameters."""

    module: str
    Params: type


METRICS: dict[str, Registered] = {
    "nudenet": Registered("nudenet", NudenetParams),
    "clip-score": Registered("clip", ClipScoreParams),
    "fid": Registered("fid", FidParams),
    "lpips": Registered("lpips", LpipsParams),
    "classify": Registered("classify", ClassifyParams),
    "shapes": Registered("shapes", ShapesParams),
    "asr": Registered("asr", AsrParams),
}


def check_metrics(names: Sequence[str]) -> list[str]:
    """Metric names split at commas, de-duplicated, each one known."""
    out = []
    for name in (part.strip() for n in names for part in n.split(",")):
        if name not in METRICS:
            raise ReceError(f"unknown metric '{name}'; choose from {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    return out


def metric_function(name: str) -> Callable:
    """`evaluate_<name>(run, params, ...)` of a metric (its module imported now)."""
    module = importlib.import_module(f"{__package__}.{METRICS[name].module}")
    return getattr(module, "evaluate_" + name.replace("-", "_"))
