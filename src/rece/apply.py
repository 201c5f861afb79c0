"""Putting edits into models: in place on a pipeline in memory (exactly revertible), or into a new diffusers folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ReceError
from .families import family_of_pipeline
from .hub import snapshot
from .io import atomic_dir, disk_full_reported, folder_bytes
from .models import BaseModel, load_model
from .weights import component_weight_files, load_pickled_weights

APPLIED = "_rece_applied"  # the stack of (edit id, original weights) kept on the denoiser of a pipeline


def _edited_modules(pipe) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """A pipeline's denoiser and its edited layers by name."""
    family = family_of_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser)
    return denoiser, family.edited_modules(denoiser)


def apply_edit(edit, pipe, allow_other_base: bool = False):
    """Edit a diffusers pipeline in place, keeping the weights it replaces so `revert_edit` restores them exactly."""
    denoiser, modules = _edited_modules(pipe)
    kv = {n: m.weight for n, m in modules.items()}
    new = edit.edited_kv(kv, allow_other_base, source=type(pipe).__name__)
    denoiser.__dict__.setdefault(APPLIED, []).append((edit.edit_id(), {n: kv[n].detach().clone() for n in new}))
    with torch.no_grad():
        for n, w in new.items():
            modules[n].weight.copy_(w)
    return pipe


def revert_edit(edit, pipe):
    """Restore the exact weights the pipeline had before `edit` was applied (the last edit applied comes off first)."""
    denoiser, modules = _edited_modules(pipe)
    stack = denoiser.__dict__.get(APPLIED, [])
    if not stack or stack[-1][0] != edit.edit_id():
        raise ReceError(
            "this edit is not the last one applied to this pipeline; revert edits in reverse order, or reload the model"
        )
    _, originals = stack.pop()
    with torch.no_grad():
        for n, w in originals.items():
            modules[n].weight.copy_(w)
    return pipe


def _rewrite_weights(folder: Path, new: dict[str, torch.Tensor]) -> None:
    """Replace the edited weights in a copied denoiser folder's weight files (safetensors metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in component_weight_files(folder):
        if file.suffix == ".bin":
            state = dict(load_pickled_weights(file))
            for key in state:
                if key.endswith(".weight") and key[:-7] in new:
                    state[key] = new[key[:-7]].to(state[key].dtype)
            file.unlink()
            torch.save(state, file)
            continue
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
        for key in state:
            if key.endswith(".weight") and key[:-7] in new:
                state[key] = new[key[:-7]].to(state[key].dtype).contiguous()
        file.unlink()  # copytree may have copied a link into a cache; never write through it
        save_file(state, str(file), metadata=meta)


def composed_weights(
    edits: Sequence, kv: dict[str, torch.Tensor], allow_other_base: bool = False, source: str = "model"
) -> dict[str, torch.Tensor]:
    """The new weights of every layer some edit changes, the edits applied in order to the original weights `kv`
    (each checks its base against the weights it is given)."""
    kv, new = dict(kv), {}
    for edit in edits:
        changed = edit.edited_kv(kv, allow_other_base, source)
        kv.update(changed)
        new.update(changed)
    return new


def write_applied_pipeline(
    model, edits: Sequence, out_dir: str | os.PathLike, allow_other_base: bool = False, overwrite: bool = False
) -> Path:
    """Write a complete diffusers pipeline folder with the edits applied; every other byte's content unchanged."""
    base = model if isinstance(model, BaseModel) else load_model(model)
    new = composed_weights(edits, base.kv, allow_other_base, base.source)
    if base.folder is None:  # a pipeline in memory, e.g. from a single-file checkpoint
        pipe = base.pipeline
        with disk_full_reported(out_dir, lambda: pipeline_bytes(pipe)), atomic_dir(out_dir, overwrite=overwrite) as tmp:
            applied = []
            try:
                for edit in edits:
                    applied.append(apply_edit(edit, pipe, allow_other_base) and edit)
                pipe.save_pretrained(tmp)
            finally:  # the pipeline is the caller's: it leaves as it came, the save failed or not
                for edit in reversed(applied):
                    revert_edit(edit, pipe)
        return Path(out_dir)
    folder = base.folder
    if base.source != str(folder) and not (folder / "vae").exists():
        folder = snapshot(base.source)
    # a full disk makes copytree raise one shutil.Error listing every file it could not copy: say it in one line
    with disk_full_reported(out_dir, lambda: folder_bytes(folder)), atomic_dir(out_dir, overwrite=overwrite) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        _rewrite_weights(tmp / base.family.denoiser, new)
    return Path(out_dir)


def pipeline_bytes(pipe) -> int:
    """The bytes of a pipeline's weights (what save_pretrained writes, give or take configs and tokenizers)."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
