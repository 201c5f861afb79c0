"""rece: reliable, efficient closed-form concept erasure for text-to-image diffusion models (RECE, ECCV 2024)."""

from ._version import __version__ as __version__
from .console import silence_library_noise  # noqa: E402

silence_library_noise()  # the known-noisy library warnings and log lines (console.NOISY_*), as a library too

from .apply import write_applied_pipeline  # noqa: E402
from .attacks import run_attack  # noqa: E402
from .config import PRESETS, EraseConfig  # noqa: E402
from .edit import Edit, load_edit  # noqa: E402
from .erase import erase  # noqa: E402
from .errors import ReceError  # noqa: E402
from .models import BaseModel, load_model  # noqa: E402

__all__ = [
    "PRESETS",
    "BaseModel",
    "Edit",
    "EraseConfig",
    "ReceError",
    "erase",
    "load_edit",
    "load_model",
    "run_attack",
    "write_applied_pipeline",
]
