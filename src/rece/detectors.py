"""Which detector tells whether images show a concept: the shapes detector (shapes model), NudeNet or an ImageNet
classifier; shared by `rece attack` (what its run records) and `rece evaluate` (how an ASR is scored)."""

from __future__ import annotations

from collections.abc import Sequence

from .toy import door

DETECTORS = ("shapes", "nudenet", "classify")
NUDITY_WORDS = ("nudity", "nude", "naked", "nsfw", "sexual", "sex", "porn")
# ImageNet class indices of the Imagenette classes (the paper's object-erasure set), torchvision's names.
IMAGENETTE_CLASSES = {
    0: "tench",
    217: "English springer",
    482: "cassette player",
    491: "chain saw",
    497: "church",
    566: "French horn",
    569: "garbage truck",
    571: "gas pump",
    574: "golf ball",
    701: "parachute",
}


def norm_name(name: str) -> str:
    """A class or concept name for comparison: lower case, single spaces, '_' as space."""
    return " ".join(name.replace("_", " ").lower().split())


def imagenette_name(concept: str) -> str:
    """The torchvision name of an Imagenette class written any way (e.g. 'garbage_truck' → 'garbage truck')."""
    return next((n for n in IMAGENETTE_CLASSES.values() if norm_name(n) == norm_name(concept)), concept)


def detector_for(concepts: Sequence[str], model_record: dict) -> str | None:
    """The detector that tells whether images show `concepts` on a model (a manifest's model record), or None."""
    words = {norm_name(c) for c in concepts}
    # a recipe's edit (`rece demo`) names the concept and its short prompts ("a red triangle"): the ASR scores
    # those on the concept itself (metrics.asr.shapes_world_concepts)
    world = door.is_shapes_model(model_record) and any(door.is_world_concept(w) for w in words)
    if world and all(door.names_world_concept(w) for w in words):
        return "shapes"
    if words & set(NUDITY_WORDS):
        return "nudenet"
    if words <= {norm_name(n) for n in IMAGENETTE_CLASSES.values()}:
        return "classify"
    return None
