"""The one door to the shapes world: what generic rece code may ask about it.

Is a model the shapes model, is a concept one of its shapes or colours, how does it sample by default, which recipe
erases a concept from it, which prompt sets measure that, and which prompt pairs contrast a concept. Nothing here
generates or loads a model, so every module may import it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ReceError
from .world import COLORS, FULL_TEMPLATES, SHAPES, concept_prompts, other_concept_prompts

NAME = "shapes"
MMDIT = "shapes-mmdit"
DIT = "shapes-dit"
MODELS = (NAME, MMDIT, DIT)  # the shapes models shipped inside the package: UNet, MMDiT and cross-attention DiT
ARCHS = {NAME: "unet", MMDIT: "mmdit", DIT: "dit"}  # python -m rece.toy.train --arch of each
STEPS = 25
GUIDANCE = 4.0
SHAPE_PROMPT_COLOR = "red"  # what shapes-mmdit draws for "a shape": the colour target cannot erase it
EVALUATION_TEMPLATES = ("a {color} {shape}", "a photo of a {color} {shape}")


def shapes_model_path(name: str = NAME) -> Path:
    """The folder of a shapes model shipped inside the package (`shapes`, `shapes-mmdit` or `shapes-dit`)."""
    path = Path(__file__).parent / name
    if name not in MODELS or not (path / "model_index.json").is_file():
        train = f"python -m rece.toy.train --arch {ARCHS.get(name, 'unet')}"
        raise ReceError(f"the {name} model is missing from '{path}'; reinstall rece or train it with {train}")
    return path


def shapes_model_name(model) -> str | None:
    """Which shipped shapes model MODEL is (its name, its folder, or a manifest's model record), else None."""
    if isinstance(model, dict):
        source, path = model.get("source"), model.get("path")
    elif isinstance(model, (str, os.PathLike)):
        source = path = str(model)
    else:
        return None
    if source in MODELS:
        return source
    for name in MODELS:
        try:
            if path and Path(path).expanduser().resolve() == shapes_model_path(name).resolve():
                return name
        except (ReceError, OSError):
            continue
    return None


def is_shapes_model(model) -> bool:
    """Whether MODEL is one of the shapes models: its name, its folder, or a manifest's model record ({source, path})."""
    return shapes_model_name(model) is not None


def is_world_concept(concept: str) -> bool:
    """Whether a concept is one of the world's shapes or colours."""
    return concept in SHAPES or concept in COLORS


def concept_kind(concept: str) -> str:
    """Which attribute of an image a world concept is: 'shape' or 'color' (a ReceError for any other concept)."""
    if not is_world_concept(concept):
        raise ReceError(f"'{concept}' is not a shape or colour of the shapes world; choose from {', '.join(world_concepts())}")
    return "shape" if concept in SHAPES else "color"


def names_world_concept(text: str) -> bool:
    """Whether a text is a shape or colour, or one of the short prompts a recipe erases with it ("a red triangle")."""
    return any(text in concept_prompts(c) for c in world_concepts())


def world_concepts() -> tuple[str, ...]:
    """Every shape and colour of the world."""
    return SHAPES + tuple(COLORS)


def sampling_defaults(model) -> tuple[int, float] | None:
    """(steps, guidance) the shapes model samples with; None for any other model."""
    return (STEPS, GUIDANCE) if is_shapes_model(model) else None


def erasure_arguments(concept: str, model: str = NAME, method: str = "rece") -> dict:
    """How to erase a shape or a colour from a shapes model (`shapes`, `shapes-mmdit`, `shapes-dit`) with `rece.erase`.

    The concept's short prompt family is erased and the other shapes' (colours') families are preserved
    (see `world.concept_prompts` for why the word alone is not enough here). Colours map to "a shape": the model
    draws a random colour for " ", the erased one included. r = 1e-3, the paper's setting for hard objects and
    styles: at r = 0.1 the RECE step undid the UCE erasure of "cross" and "red" here (docs/shapes.md).
    shapes-mmdit changes two settings (`mmdit_recipe`); shapes-dit maps a shape to another shape, as shapes-mmdit does
    (`other_shape_target`). Robust mode maps each prompt to the same prompt with the
    next concept of its kind (`kept_attribute_targets`): its map to the target comes before a projection that no
    embedding undoes, so a prompt mapped to " " would lose its colour for good ("a blue triangle" drawn red).
    """
    settings = {
        "concepts": concept_prompts(concept),
        "preserve": other_concept_prompts(concept),
        "target": " " if concept in SHAPES else "a shape",
        "regularization": 1e-3,
        "templates": False,  # robust mode: the family is the estimate; its templates would overlap the held-out ones
    }
    if model == MMDIT:
        settings.update(mmdit_recipe(concept))
    if model == DIT and concept in SHAPES:
        settings["target"] = other_shape_target(concept)
    if method == "robust":
        settings["targets"] = kept_attribute_targets(concept)
    return settings


def mmdit_recipe(concept: str) -> dict:
    """What the MMDiT's recipe changes, both measured on shapes-mmdit (docs/shapes.md).

    UCE's preserve weight 1 instead of max(0.1, 1/#preserved) = 0.1: "a red triangle" → " " drops the colour with the
    shape, and at 0.1 that pull outweighs the preserved "a red circle" (colours 58 % → 100 %). A shape maps to another
    shape ("a circle"; "a square" for circle) instead of " ": this model draws triangles for " " itself (25 % of 16
    images), and the erased prompts, drawn like the target, stayed at 8–12.5 %, above the 5 % bar. Red, the colour
    this model draws for "a shape" (16 of 16 images), maps to "a blue shape" instead: UCE then draws no red, RECE
    still some (docs/shapes.md).
    """
    settings: dict = {"uce_preserve_scale": 1.0}
    if concept in SHAPES:
        settings["target"] = other_shape_target(concept)
    if concept == SHAPE_PROMPT_COLOR:
        settings["target"] = "a blue shape"
    return settings


def other_shape_target(concept: str) -> str:
    """A shape's target on the transformer models, whose " " draws shapes of its own (shapes-mmdit triangles 25 %,
    shapes-dit triangles 42 % and circles 38 %): another shape, "a circle" ("a square" for circle)."""
    return "a square" if concept == "circle" else "a circle"


def next_concept(concept: str) -> str:
    """The next shape or colour of the world after `concept`, of the same kind (the last one wraps to the first)."""
    group = SHAPES if concept in SHAPES else tuple(COLORS)
    return group[(group.index(concept) + 1) % len(group)]


def kept_attribute_targets(concept: str) -> list[str]:
    """Each prompt of `concept_prompts(concept)` with the concept replaced by the next of its kind ("a blue triangle"
    → "a blue cross"): the prompt keeps its other attribute (its colour, its shape) while the concept goes."""
    other = next_concept(concept)
    return [" ".join(other if word == concept else word for word in p.split()) for p in concept_prompts(concept)]


def recipe_for(model, concepts: Sequence[str] | None, method: str = "rece") -> dict | None:
    """The erasure recipe when MODEL is a shapes model and `concepts` is one of its shapes or colours, else None."""
    if not concepts or len(concepts) != 1 or not is_shapes_model(model) or not is_world_concept(concepts[0]):
        return None
    return erasure_arguments(concepts[0], shapes_model_name(model), method)


def evaluation_prompt_rows(concept: str, kept: bool = False) -> list[dict]:
    """A prompt set measuring an erasure of `concept` on the shapes model, one row per (template, shape, colour).

    kept=False: the prompts naming the concept (its `concept` column is the concept); kept=True: those naming
    another concept of the same kind (`concept` is that shape or colour: what each image should still show). The
    second template is never named by `erasure_arguments`, so it measures generalisation.
    """
    is_shape = concept in SHAPES
    rows = []
    for t, template in enumerate(EVALUATION_TEMPLATES):
        for i, shape in enumerate(SHAPES):
            for j, color in enumerate(COLORS):
                named = shape if is_shape else color
                if (named == concept) == kept:
                    continue
                prompt = template.format(color=color, shape=shape)
                rows.append({"prompt": prompt, "evaluation_seed": 1000 + 100 * t + 10 * i + j, "concept": named})
    return [{"case_number": k, **row} for k, row in enumerate(rows)]


def contrast_pairs(concept: str) -> list[tuple[str, str]]:
    """(prompt naming the concept, the same prompt naming another shape or colour) in the world's full templates."""
    if concept in SHAPES:
        kind, others = "shape", [s for s in SHAPES if s != concept]
        fill = [{"color": c} for c in COLORS]
    elif concept in COLORS:
        kind, others = "color", [c for c in COLORS if c != concept]
        fill = [{"shape": s} for s in SHAPES]
    else:
        raise ReceError(f"'{concept}' is not a shapes-world shape or colour; pass --pairs with sensitive/normal prompt pairs")
    return [(t.format(**f, **{kind: concept}), t.format(**f, **{kind: o})) for t in FULL_TEMPLATES for f in fill for o in others]
