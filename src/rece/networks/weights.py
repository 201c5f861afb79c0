"""Where the metric networks' weights come from: a local file, or torch's hub cache (downloaded there when online)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ReceError
from ..hub import first_line, hub_offline

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision AlexNet_Weights.IMAGENET1K_V1
LPIPS_ALEX_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
LPIPS_ALEX_FILE = "lpips-v0.1-alex.pth"  # the cache name of LPIPS_ALEX_URL ('alex.pth' alone says too little)
RESNET50_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"  # torchvision ResNet50_Weights.IMAGENET1K_V2


def load_state(path: str | os.PathLike, option: str) -> dict:
    """A state dict from a .safetensors or torch file; errors name `option`, the flag that passed the file."""
    path = Path(path)
    if not path.is_file():
        raise ReceError(f"{option} '{path}' does not exist; pass the path of a local weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ReceError(
            f"{option} '{path}' is not a readable weights file ({type(exc).__name__}); pass a .pth or .safetensors state dict"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ReceError(f"{option} '{path}' does not hold a state dict; save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def download_weights(url: str, option: str, file_name: str | None = None, check_hash: bool = False) -> dict:
    """A state dict from torch's hub cache (checkpoints/), downloaded there first when online, as the libraries do.

    Offline (HF_HUB_OFFLINE=1) only the cache is read; a file missing there, or a failed download, is a ReceError
    naming the file, its URL and `option` (the flag that takes a local copy).
    """
    file_name = file_name or url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    fix = f"download {url} to {cached}, or pass {option}"
    if hub_offline() and not cached.is_file():
        raise ReceError(f"weights file {file_name} is not in torch's cache and HF_HUB_OFFLINE=1 stops its download; {fix}")
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", weights_only=True, file_name=file_name, check_hash=check_hash
        )
    except Exception as exc:  # network, HTTP, hash mismatch, damaged file: the same user error
        raise ReceError(f"cannot download weights file {file_name} ({first_line(exc)}); {fix}") from None
    if not isinstance(state, dict):
        raise ReceError(f"weights file {file_name} does not hold a state dict; delete {cached} and retry, or pass {option}")
    return {k.removeprefix("module."): v for k, v in state.items()}
