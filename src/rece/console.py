"""What reaches the terminal: rece's own lines, its warnings and the libraries' warnings, one line each; no library
progress bars or advisory logs; and the few known-noisy library warnings and log lines, which are filtered (listed
below) whether rece runs as a command or as a library."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

# (category, message regex, why it is filtered): warnings that libraries raise on every run of a rece command and
# that say nothing about the user's input; docs/layout.md lists them too.
NOISY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        DeprecationWarning,
        r"__array__ implementation doesn't accept a copy keyword",
        "numpy 2 about torch tensors: diffusers' Euler schedulers call np.array(tensor) at every set_timesteps",
    ),
)


# (logger, message regex, why it is dropped): library log lines that rece's own work causes and that say nothing the
# user can act on; docs/layout.md lists them too.
NOISY_LOGS: tuple[tuple[str, str, str], ...] = (
    (
        "transformers.utils.import_utils",
        r"requires torchvision \(not installed\); falling back to",
        "transformers 5 without torchvision, once per image processor class diffusers' pipelines import (the safety "
        "checker's feature extractor), none of which rece runs",
    ),
)


class _DropNoisyLogs(logging.Filter):
    """Drops the records of one logger whose message matches one of its NOISY_LOGS patterns."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_library_noise() -> None:
    """Drop NOISY_LOGS and NOISY_WARNINGS in this process, once: as a command or as a library. Every other warning
    and log line is left to the user's own filters (the NOISY_WARNINGS filters go after theirs)."""
    if getattr(silence_library_noise, "done", False):
        return
    silence_library_noise.done = True
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _ in NOISY_LOGS:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():  # the logger exists before the library that logs to it is imported
        logging.getLogger(name).addFilter(_DropNoisyLogs(patterns))
    for category, pattern, _ in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category, append=True)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' and diffusers' progress bars off while rece loads a model from local files (its own few seconds
    of work, not the user's), then as they were; downloads keep theirs."""
    libraries = [sys.modules[name].utils.logging for name in ("transformers", "diffusers") if name in sys.modules]
    enabled = [lib for lib in libraries if lib.is_progress_bar_enabled()]
    for lib in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in enabled:
            lib.enable_progress_bar()


def quiet_libraries(diffusers: bool = True) -> None:
    """No library progress bars or advisory logs (their errors still show).

    diffusers=False leaves diffusers unimported (and its logging as is): `rece erase` from a folder or hub id never
    builds a diffusers object, and importing diffusers costs about 80 MB of memory."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if diffusers:
        import diffusers as diffusers_module

        diffusers_module.utils.logging.set_verbosity_error()
        diffusers_module.utils.logging.disable_progress_bar()
    # transformers reads those when it is imported, so it is imported only by the commands that use it (a second)
    if "transformers" in sys.modules:
        transformers = sys.modules["transformers"]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning as `warning: MESSAGE` (its category when it is not a plain UserWarning), one line."""
    from tqdm import tqdm

    text = " ".join(str(message).split())
    kind = "" if category in (UserWarning,) or category.__module__.startswith("rece") else f" ({category.__name__})"
    tqdm.write(f"warning: {text}{kind}", file=file or sys.stderr)  # above a progress bar, not inside its line


@contextlib.contextmanager
def shown_warnings() -> Iterator[None]:
    """Inside the block every warning is printed once per message as one line, except the known noisy ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for category, pattern, _ in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        warnings.showwarning = _one_line
        yield


PROGRESS_DELAY = 2.0  # seconds of work before a bar appears


def progress_bar(iterable=None, desc: str = "", unit: str = "it", enabled: bool | None = None, total: int | None = None):
    """A tqdm bar on stderr that appears only once the work has taken PROGRESS_DELAY s (quick runs print nothing); `enabled`
    None: when stderr is a terminal; False (--json, --quiet): never."""
    from tqdm import tqdm

    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=None if enabled is None else not enabled, delay=PROGRESS_DELAY,
        dynamic_ncols=True, leave=False,
    )  # fmt: skip
