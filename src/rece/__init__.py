"""rece: reliable, efficient closed-form concept erasure for text-to-image diffusion models (RECE, ECCV 2024).

The public names are imported on first use (PEP 562), so `import rece` and the command line start without torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from ._version import __version__ as __version__
from .console import silence_library_noise  # noqa: E402

silence_library_noise()  # the known-noisy library warnings and log lines (console.NOISY_*), as a library too

# public name -> the module that defines it
_EXPORTS = {
    "PRESETS": "config",
    "BaseModel": "models",
    "Edit": "edit",
    "EraseConfig": "config",
    "ReceError": "errors",
    "erase": "erase",
    "load_edit": "edit",
    "load_model": "models",
    "run_attack": "attacks",
    "write_applied_pipeline": "apply",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see (`X as X`: re-exported)
    from .apply import write_applied_pipeline as write_applied_pipeline
    from .attacks import run_attack as run_attack
    from .config import PRESETS as PRESETS
    from .config import EraseConfig as EraseConfig
    from .edit import Edit as Edit
    from .edit import load_edit as load_edit
    from .erase import erase as erase
    from .errors import ReceError as ReceError
    from .models import BaseModel as BaseModel
    from .models import load_model as load_model


def __getattr__(name: str):
    """Import a public name's module when the name is first used, and keep the name."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rece' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The `rece` package, whose public names win over its submodules of the same name: importing the submodule
    `rece.erase` would otherwise rebind `rece.erase` from the function to the module."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
