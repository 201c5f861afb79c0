"""Where a model comes from: what MODEL names (a pipeline object, a folder, a hub id, a single file, or a name rece
knows), resolved the same way for erasing, generating and attacking."""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .errors import ReceError
from .hub import is_hub_id
from .toy import door

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".gguf")
NAMED_MODELS = (*door.MODELS, "tiny")


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL: `kind` is pipeline, folder, single-file or hub; `name` what the user passed."""

    kind: str
    name: str
    path: Path | None = None
    pipeline: object | None = None


def is_pipeline(model) -> bool:
    """Whether MODEL is a diffusers pipeline object already in memory (rather than something naming one)."""
    return not isinstance(model, (str, os.PathLike)) and (hasattr(model, "components") or hasattr(model, "unet"))


def named_model_path(name: str) -> Path:
    """Folder of a model rece knows by name: `shapes` / `shapes-mmdit` / `shapes-dit` (trained, shipped in the package) or `tiny`
    (built locally)."""
    if name == "tiny":
        from .tiny import tiny_model_path

        return tiny_model_path()
    return door.shapes_model_path(name)


def resolve_model(model) -> ModelSource:
    """What MODEL is; a one-line error when it is none of the accepted kinds."""
    if is_pipeline(model):
        return ModelSource("pipeline", type(model).__name__, pipeline=model)
    if not isinstance(model, (str, os.PathLike)):
        raise ReceError(f"cannot read a model from {type(model).__name__}; pass a pipeline, a folder or a hub id")
    name = str(model)
    if name in NAMED_MODELS:
        return ModelSource("folder", name, named_model_path(name))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return ModelSource("single-file", name, path)
    if path.is_dir():
        return ModelSource("folder", name, path)
    if path.exists():
        raise ReceError(f"'{name}' is not a diffusers folder or a .safetensors checkpoint; pass one of those or a hub id")
    if is_hub_id(name):
        return ModelSource("hub", name)
    raise ReceError(f"model path '{name}' does not exist; pass a diffusers folder, a hub id or a .safetensors checkpoint")


def model_path_record(model) -> str | None:
    """The resolved folder or file of MODEL for manifests (None for a pipeline object or a hub id)."""
    if is_pipeline(model):
        return None
    name, local = str(model), Path(str(model)).expanduser()
    return str(named_model_path(name)) if name in NAMED_MODELS else str(local.resolve()) if local.exists() else None


def read_model_index(folder: Path) -> dict:
    """A pipeline folder's model_index.json."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ReceError(f"'{folder}' is not a diffusers pipeline (no model_index.json); pass the pipeline's root folder")
    try:
        return json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReceError(f"cannot read '{index}' ({exc}); the pipeline folder is damaged") from None


def check_components(folder: Path, index: dict, names: Collection[str] | None = None) -> None:
    """Refuse a folder whose model_index.json lists a component (one of `names`, or any) that has no folder of its own."""
    for name, entry in index.items():
        listed = isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
        if name.startswith("_") or not listed or (names is not None and name not in names):
            continue
        if not (Path(folder) / name).is_dir():
            raise ReceError(
                f"'{folder}' lists the component {name} ({entry[1]}) in model_index.json but has no {name}/ folder; "
                "re-download the pipeline, or set it to [null, null] in model_index.json if the pipeline does without it"
            )
