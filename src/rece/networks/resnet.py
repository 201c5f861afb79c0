"""torchvision's ResNet-50 in pure torch (same module names, so its state dicts load strictly) and its loader."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..errors import ReceError
from .weights import RESNET50_URL, download_weights, load_state


class Bottleneck(torch.nn.Module):
    """torchvision's ResNet bottleneck block (stride on the 3×3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: torch.nn.Module | None = None):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(torch.nn.Module):
    """torchvision's ResNet with bottleneck blocks (same module names, so its state dicts load strictly)."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        nn = torch.nn
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(64, layers[0])
        self.layer2 = self._layer(128, layers[1], 2)
        self.layer3 = self._layer(256, layers[2], 2)
        self.layer4 = self._layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def _layer(self, planes: int, blocks: int, stride: int = 1) -> torch.nn.Sequential:
        nn = torch.nn
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
        mods = [Bottleneck(self.inplanes, planes, stride, down)]
        self.inplanes = planes * 4
        mods += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50, torchvision's architecture (randomly initialised)."""
    return ResNet((3, 4, 6, 3), num_classes)


def load_classifier(weights: str | os.PathLike | None = None) -> ResNet:
    """ResNet-50 with a torchvision-format state dict from a local file, else torchvision's IMAGENET1K_V2 file downloaded."""
    if weights:
        state, source = load_state(weights, "--classifier-weights"), f"--classifier-weights '{weights}'"
    else:
        state = download_weights(RESNET50_URL, "--classifier-weights FILE (a torchvision resnet50 state dict)", check_hash=True)
        source = f"the downloaded {RESNET50_URL.rsplit('/', 1)[-1]}"
    model = resnet50()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ReceError(f"{source} is not a torchvision ResNet-50 state dict ({first}); pass resnet50 weights") from None
    return model.eval()
