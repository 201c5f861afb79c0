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
from .io import atomic_dir, disk_full_reported, folder_bytes, is_disk_full
from .models import BaseModel, load_model
from .pipelines import load_pipeline
from .weights import component_weight_files, kv_fingerprint, load_pickled_weights

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
    new = edit.edited_kv(kv, allow_other_base, source=type(pipe).__name__, family=family_of_pipeline(pipe))
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
    edits: Sequence, kv: dict[str, torch.Tensor], allow_other_base: bool = False, source: str = "model", family=None
) -> dict[str, torch.Tensor]:
    """The new weights of every layer some edit changes, the edits applied in order to the original weights `kv` of a
    model of `family` (each checks its base against the weights it is given)."""
    kv, new = dict(kv), {}
    original = kv_fingerprint(kv)
    for i, edit in enumerate(edits):
        if i and not allow_other_base and edit.base_fingerprint == original and kv_fingerprint(kv) != original:
            raise ReceError(
                f"edit {i + 1} ({', '.join(edit.concepts)}) was made from '{source}' itself, not from it with the edits "
                "before it applied, so it cannot follow them; erase all the concepts in one edit, or make each next edit "
                "from the previous result (rece erase MODEL --base-edit PREVIOUS.safetensors ...) and apply them in order"
            )
        changed = edit.edited_kv(kv, allow_other_base, source, family)
        kv.update(changed)
        new.update(changed)
    return new


def copy_error(exc: shutil.Error, folder: Path) -> ReceError:
    """One line for a failed copy of the model folder: the first file that failed and why, how many more did."""
    failures = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    if not failures:
        return ReceError(f"cannot copy '{folder}' ({exc}); check free space and permissions, then run again")
    source, _, reason = failures[0]
    more = f" and {len(failures) - 1} more file(s)" if len(failures) > 1 else ""
    return ReceError(f"cannot copy '{source}'{more} into the output ({reason}); check free space and permissions, then run again")


def write_applied_pipeline(
    model,
    edits: Sequence,
    out_dir: str | os.PathLike,
    allow_other_base: bool = False,
    overwrite: bool = False,
    config: str | None = None,
    text_encoders: Sequence[str] = (),
    vae: str | None = None,
) -> Path:
    """Write a complete diffusers pipeline folder with the edits applied; every other byte's content unchanged (a
    single file's pipeline is built with its `text_encoders` and `vae` files, where it lacks them)."""
    base = model if isinstance(model, BaseModel) else load_model(model)
    new = composed_weights(edits, base.kv, allow_other_base, base.source, base.family)
    if base.folder is None:  # a pipeline in memory, or a single-file checkpoint (built through diffusers)
        pipe = base.pipeline if base.pipeline is not None else load_pipeline(base.source, config, text_encoders, vae)
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
        try:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        except shutil.Error as exc:  # its message lists every file that failed, by temporary path
            if is_disk_full(exc):
                raise
            raise copy_error(exc, folder) from None
        _rewrite_weights(tmp / base.family.denoiser, new)
    return Path(out_dir)


def pipeline_bytes(pipe) -> int:
    """The bytes of a pipeline's weights (what save_pretrained writes, give or take configs and tokenizers)."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
