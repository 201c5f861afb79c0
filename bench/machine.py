"""The machine a bench ran on, printed at the top of every bench's output so that its numbers carry their context."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(threads: int | None = None) -> str:
    """One line: CPU model, cores, torch threads and versions; torch is imported only to ask it.

    `threads`: the torch threads the measured work runs with when that is not this process (a bench's children);
    by default this process's own."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"machine: {cpu_model()}, {cores} cores, torch threads {threads or torch.get_num_threads()}, {gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


if __name__ == "__main__":
    print(describe())
