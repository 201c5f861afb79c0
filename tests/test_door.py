"""The one door to the shapes world: what generic code may ask about it."""

import pytest

from rece.errors import ReceError
from rece.toy import door
from rece.toy.world import COLORS, SHAPES


def test_the_shapes_model_is_known_by_name_folder_and_record(tmp_path):
    folder = door.shapes_model_path()
    assert door.is_shapes_model("shapes") and door.is_shapes_model(folder) and door.is_shapes_model(str(folder))
    assert door.is_shapes_model({"source": "x", "path": str(folder)}) and door.is_shapes_model({"source": "shapes"})
    assert not door.is_shapes_model("tiny") and not door.is_shapes_model(tmp_path) and not door.is_shapes_model({})
    assert not door.is_shapes_model(object())
    assert door.sampling_defaults("shapes") == (25, 4.0) and door.sampling_defaults("tiny") is None
    assert door.shapes_model_name(folder) == "shapes" and door.shapes_model_name("tiny") is None


def test_the_mmdit_shapes_model_is_known_by_name_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(door, "__file__", str(tmp_path / "door.py"))  # a package without the model folders
    with pytest.raises(ReceError, match="missing .* python -m rece.toy.train --arch mmdit$"):
        door.shapes_model_path(door.MMDIT)
    assert door.shapes_model_name(door.MMDIT) == door.MMDIT and door.is_shapes_model({"source": door.MMDIT})
    assert door.shapes_model_name(str(tmp_path / door.MMDIT)) is None
    (tmp_path / door.MMDIT).mkdir()
    (tmp_path / door.MMDIT / "model_index.json").write_text("{}")
    folder = door.shapes_model_path(door.MMDIT)
    assert door.shapes_model_name(str(folder)) == door.MMDIT and door.sampling_defaults(folder) == (25, 4.0)
    assert door.recipe_for(door.MMDIT, ["red"]) == door.erasure_arguments("red", door.MMDIT)
    with pytest.raises(ReceError, match="missing"):
        door.shapes_model_path("circles")


def test_concepts_and_recipes():
    assert all(door.is_world_concept(c) for c in SHAPES + tuple(COLORS)) and not door.is_world_concept("cat")
    recipe = door.recipe_for("shapes", ["triangle"])
    assert recipe == door.erasure_arguments("triangle") and "a red triangle" in recipe["concepts"]
    assert "a red circle" in recipe["preserve"] and recipe["target"] == " " and recipe["regularization"] == 1e-3
    assert door.erasure_arguments("red")["target"] == "a shape" and "uce_preserve_scale" not in recipe
    mmdit = door.recipe_for(door.MMDIT, ["triangle"])  # the MMDiT's: same prompts, two settings changed
    assert mmdit == {**recipe, "target": "a circle", "uce_preserve_scale": 1.0}
    assert door.erasure_arguments("circle", door.MMDIT)["target"] == "a square"
    assert door.erasure_arguments("red", door.MMDIT)["target"] == "a blue shape"  # it draws red for "a shape"
    assert door.erasure_arguments("blue", door.MMDIT)["target"] == "a shape"
    assert door.recipe_for("tiny", ["triangle"]) is None and door.recipe_for("shapes", ["cat"]) is None
    assert door.recipe_for("shapes", ["triangle", "red"]) is None
    # robust mode: each prompt maps to the same prompt with the next concept of its kind, keeping the other attribute
    robust = door.recipe_for("shapes", ["triangle"], "robust")
    assert robust == {**recipe, "targets": door.kept_attribute_targets("triangle")}
    assert dict(zip(robust["concepts"], robust["targets"]))["a blue triangle"] == "a blue cross"
    assert door.kept_attribute_targets("yellow")[2:] == ["a red circle", "a red square", "a red triangle", "a red cross"]
    assert door.next_concept("cross") == "circle" and door.next_concept("red") == "green"
    rows = door.evaluation_prompt_rows("triangle")
    assert len(rows) == 2 * len(COLORS) and all(r["concept"] == "triangle" for r in rows)
    kept = door.evaluation_prompt_rows("triangle", kept=True)
    assert len(kept) == 2 * len(COLORS) * (len(SHAPES) - 1) and "triangle" not in {r["concept"] for r in kept}


def test_concept_kind_names_the_attribute_a_concept_is():
    from rece.toy.door import concept_kind

    assert concept_kind("triangle") == "shape" and concept_kind("red") == "color"
    with pytest.raises(ReceError, match="not a shape or colour"):
        concept_kind("dog")
