"""LPIPS with torchvision's AlexNet backbone (the lpips package's net='alex', v0.1), in pure torch, and its loader."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..errors import ReceError
from .weights import ALEXNET_URL, LPIPS_ALEX_FILE, LPIPS_ALEX_URL, download_weights, load_state

ALEX_LAYERS = ((0, 1), (2, 4), (5, 7), (8, 9), (10, 11))  # (first, last) torchvision AlexNet.features index per LPIPS slice
ALEX_CHANNELS = (64, 192, 384, 256, 256)


def alexnet_slices() -> torch.nn.ModuleList:
    """torchvision's AlexNet.features, cut after each ReLU into LPIPS's five slices (module indices kept)."""
    nn = torch.nn
    layers = [
        nn.Conv2d(3, 64, 11, 4, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
    ]
    slices = nn.ModuleList()
    for first, last in ALEX_LAYERS:
        s = nn.Sequential()
        for i in range(first, last + 1):
            s.add_module(str(i), layers[i])
        slices.append(s)
    return slices


class LPIPS(torch.nn.Module):
    """LPIPS: unit-normalised backbone features, squared differences, a 1×1 linear weight per layer, spatial mean, sum."""

    def __init__(self, slices: torch.nn.ModuleList, channels: Sequence[int]):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.slices = slices
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in channels)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone activations after each slice, for images in [-1, 1]."""
        h, out = (x - self.shift) / self.scale, []
        for s in self.slices:
            h = s(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per pair of images [n, 3, h, w] in [-1, 1]."""
        total = 0
        for fx, fy, lin in zip(self.features(x), self.features(y), self.lins):
            diff = (_unit(fx) - _unit(fy)) ** 2
            total = total + lin(diff).mean(dim=(2, 3))
        return total.view(-1)


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Features divided by their norm over channels (as LPIPS normalises)."""
    return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + eps)


def lpips_state_dict(state: dict) -> dict:
    """Map an LPIPS(net='alex') state dict (net.sliceN.*, linN.model.1.weight) or torchvision AlexNet keys to ours."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("net.slice"):
            out[f"slices.{int(parts[1][5:]) - 1}.{'.'.join(parts[2:])}"] = value
        elif key.startswith("features."):
            idx = int(parts[1])
            s = next(i for i, (a, b) in enumerate(ALEX_LAYERS) if a <= idx <= b)
            out[f"slices.{s}.{'.'.join(parts[1:])}"] = value
        elif key.startswith("lin") and key.endswith("weight"):
            out[f"lins.{int(parts[0][3:])}.weight"] = value
    return out


def load_lpips(weights: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS-AlexNet from one local file with backbone + lin weights, as torch.save(lpips.LPIPS(net='alex').state_dict()).

    Without a file: torchvision's AlexNet (the backbone lpips builds) and the lpips package's v0.1 lin layers,
    downloaded into torch's hub cache.
    """
    if weights:
        state, source = load_state(weights, "--lpips-weights"), f"--lpips-weights '{weights}'"
    else:
        option = "--lpips-weights FILE (torch.save of LPIPS(net='alex').state_dict())"
        state = download_weights(ALEXNET_URL, option, check_hash=True)
        state.update(download_weights(LPIPS_ALEX_URL, option, LPIPS_ALEX_FILE))
        source = f"the downloaded {ALEXNET_URL.rsplit('/', 1)[-1]} + {LPIPS_ALEX_FILE}"
    model = LPIPS(alexnet_slices(), ALEX_CHANNELS)
    mapped = lpips_state_dict(state)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k not in ("shift", "scale")]
    if missing or unexpected:
        raise ReceError(
            f"{source} is not an LPIPS-AlexNet state dict (missing {len(missing)} tensors, e.g. "
            f"{(missing or unexpected)[0]}); save LPIPS(net='alex').state_dict() from the lpips package"
        )
    return model.eval()
