"""`rece evaluate`: the paper's metrics on `rece generate` run folders (NudeNet, CLIP score, FID, LPIPS, classifier
accuracy, the shapes detector, attack success rate).

Each metric is a function `evaluate_<name>(run, params, ...) -> MetricResult` (a summary, its parameters and one row
per image) in its own module, with its parameters a dataclass in `params` (the Python API's keywords and the CLI's
flags); `registry` names them. `evaluate()` (in `runner`) runs the named ones on a run folder and merges the results
into RUN_DIR/metrics.json, with the per-image rows in RUN_DIR/metrics_<name>.csv (both written atomically). Models
load from local files or the Hugging Face cache only when offline; weights files not given (FID Inception, LPIPS,
ResNet-50) are downloaded into torch's hub cache when online, as pytorch-fid, lpips and torchvision do. Every missing
piece is a one-line ReceError naming the option that fixes it.

This package imports no torch until a metric runs: `evaluate`, `default_metrics` and `write_results` load the runner
when first used.
"""

from __future__ import annotations

from .registry import METRICS, check_metrics
from .table import results_columns, results_rows, results_table

__all__ = ["METRICS", "check_metrics", "default_metrics", "evaluate", "write_results"]
__all__ += ["results_columns", "results_rows", "results_table"]


def __getattr__(name: str):
    """`evaluate`, `default_metrics` and `write_results`, from the runner (torch loads with the metrics)."""
    if name in ("evaluate", "default_metrics", "write_results"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
