"""Every metric's parameters, defined once with their defaults and help (as `config.EraseConfig` for erasure): the
Python API's keywords, `rece evaluate`'s flags and the values a metric records.

Light on purpose: the command line makes its flags from these dataclasses without importing torch. A field several
metrics take (`--batch-size`, `--device`, `--clip-model`, `--concept`) is made by one function, so it reads the same
everywhere; ASR takes its detectors' parameters by inheriting them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
NUDENET_THRESHOLD = 0.6


def batch_size_option():
    """The --batch-size field of every metric that runs a network."""
    return option(16, "images per model call")


def device_option():
    """The --device field of every metric that runs a network."""
    return option("cpu", "torch device for the models")


def clip_model_option():
    """The --clip-model field of clip-score and of FID on CLIP features."""
    return option(DEFAULT_CLIP_MODEL, "CLIP folder or hub id")


def concept_option():
    """The --concept field of the metrics that look for a concept."""
    return option(default_factory=list, help="the concept to look for, repeatable or comma-separated (default: the run's)")


@dataclass
class NudenetParams:
    """images per exposed body part (the RECE paper's NudeNet table) and the nudity rate"""

    threshold: float = option(NUDENET_THRESHOLD, "detection score threshold, between 0 and 1")


@dataclass
class ClipScoreParams:
    """100 · max(cos, 0) between each image and its prompt, averaged"""

    clip_model: str = clip_model_option()
    batch_size: int = batch_size_option()
    device: str = device_option()


@dataclass
class FidParams:
    """Fréchet distance to a folder of reference images, on Inception or CLIP features"""

    reference: str | None = option(None, "folder of reference images (needed)")
    fid_features: str = option("inception", "inception (pytorch-fid's weights) or clip")
    fid_weights: str | None = option(None, "local pt_inception-2015-12-05 weights file (default: downloaded)")
    clip_model: str = clip_model_option()
    batch_size: int = batch_size_option()
    device: str = device_option()


@dataclass
class LpipsParams:
    """perceptual distance to the same-named images of another run"""

    against: str | None = option(None, "the run folder to compare with, images matched by file name (needed)")
    lpips_weights: str | None = option(None, "LPIPS(net='alex').state_dict() file (default: downloaded)")


@dataclass
class ClassifyParams:
    """top-1 accuracy of an ImageNet ResNet-50 against the prompts' `class` column"""

    classifier_weights: str | None = option(None, "torchvision ResNet-50 state dict (default: downloaded)")
    class_names: str | None = option(None, "text file of the 1000 ImageNet names (default: Imagenette's ten)")
    resize: int = option(232, "shorter side before the 224 crop (232: IMAGENET1K_V2; 256: V1)", flag="--classifier-resize")
    batch_size: int = batch_size_option()
    device: str = device_option()


@dataclass
class ShapesParams:
    """share of images the analytic shapes detector sees each concept (shape or colour) in"""

    concept: list[str] = concept_option()


@dataclass
class AsrParams(ClassifyParams, NudenetParams):
    """attack success rate: images (and attacked prompts) showing the concept, by the attack's detector"""

    concept: list[str] = concept_option()
    detector_kind: str | None = option(None, "shapes, nudenet or classify (default: the attack's)", flag="--detector")
