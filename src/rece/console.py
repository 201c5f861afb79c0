"""What reaches the terminal: rece's own lines, its warnings and the libraries' warnings, one line each; no library
progress bars or advisory logs; and the few known-noisy library warnings, which are filtered (listed below)."""

from __future__ import annotations

import contextlib
import os
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
