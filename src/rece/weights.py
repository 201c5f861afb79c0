"""Reading weight tensors from a diffusers component folder without building the model, and checking them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import ReceError
from .families import Family


def safetensors_files(folder: Path, stem: str) -> list[Path]:
    """`stem`.safetensors, or the shards its index lists; [] when neither is there."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def component_weight_files(folder: Path) -> list[Path]:
    """A denoiser component's weight file(s): plain, fp16 variant or sharded safetensors, else a .bin file."""
    for stem in ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16"):
        files = safetensors_files(folder, stem)
        if files:
            return files
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise ReceError(
        f"no {folder.name} weights in '{folder}' (expected diffusion_pytorch_model.safetensors); the folder is incomplete"
    )


def load_pickled_weights(file: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict through torch's weights-only unpickler (it never runs code); anything else in it is refused
    in one line, asking for safetensors."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ReceError(
            f"'{file}' is a pickle rece will not load ({str(exc).splitlines()[0][:120]}); rece needs safetensors weights: "
            "convert the file (e.g. save_pretrained(safe_serialization=True)) or download the .safetensors"
        ) from None


def read_component_tensors(folder: Path, keep) -> dict[str, torch.Tensor]:
    """The tensors of a component folder whose names `keep(name)` accepts, read without building the model."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for file in component_weight_files(folder):
        if file.suffix == ".bin":
            state = load_pickled_weights(file)
            out.update({n: state[n].clone() for n in state if keep(n)})
            continue
        try:
            with safe_open(file, framework="pt") as f:
                out.update({key: f.get_tensor(key) for key in f.keys() if keep(key)})
        except (SafetensorError, OSError) as exc:
            raise ReceError(f"cannot read {folder.name} weights '{file}' ({exc}); the file is corrupt or incomplete") from None
    return out


def read_edited_weights(folder: Path, family: Family) -> dict[str, torch.Tensor]:
    """Only the weights of the layers `family` edits, from its denoiser folder: {module name: weight}, sorted."""
    tensors = read_component_tensors(folder, family.is_edited_weight)
    return dict(sorted((key[: -len(".weight")], w) for key, w in tensors.items()))


def kv_fingerprint(kv: dict[str, torch.Tensor]) -> str:
    """sha256 of the edited layers' names, shapes and float16-rounded values.

    Rounding to float16 makes the fp32 and fp16 releases of one base model share a fingerprint.
    """
    h = hashlib.sha256()
    for name in sorted(kv):
        w = kv[name].detach().to("cpu", torch.float16).contiguous()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy())
    return h.hexdigest()[:16]


def check_finite(kv: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf weights. The smallest and largest value are both finite exactly when every value is (NaN
    propagates through min/max): one pass in the weights' own dtype, no copy and no mask as large as the weights."""
    for name, w in kv.items():
        if w.numel() and not all(torch.isfinite(v).item() for v in torch.aminmax(w.detach())):
            raise ReceError(f"model '{source}' has NaN/Inf in weight {name}; the checkpoint is corrupt, re-download it")
