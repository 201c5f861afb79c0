"""The model-family seam: each pipeline is recognised as its family, whose layers and encodings rece uses."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import rece
from rece.errors import ReceError
from rece.families import FAMILIES, family_named, family_of_checkpoint, family_of_index, family_of_pipeline
from rece.families.sd import SD
from rece.families.sdxl import SDXL
from rece.models import load_model

from .ldm_checkpoint import save_ldm_checkpoint


def test_folders_and_pipelines_are_recognised(sd_path, sdxl_path):
    for path, family, cls in ((sd_path, SD, StableDiffusionPipeline), (sdxl_path, SDXL, StableDiffusionXLPipeline)):
        index = json.loads((path / "model_index.json").read_text())
        assert family_of_index(index, str(path)) is family
        assert family_of_pipeline(cls.from_pretrained(path)) is family
        assert family_named(family.name) is family and load_model(path).family is family
    # an index without the class name is recognised by its components (an SDXL refiner-like folder too)
    assert family_of_index({"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder_2": [None, None]}, "x") is SDXL
    assert family_of_index({"unet": [], "text_encoder": []}, "x") is SD
    # a transformer family is known by its pipeline class only: FLUX has PixArt's components too
    assert family_of_index({"_class_name": "FluxPipeline", "transformer": [], "text_encoder": []}, "x").name == "flux"
    assert family_of_index({"_class_name": "PixArtSigmaPipeline"}, "x").name == "pixart-sigma"
    assert family_of_index({"_class_name": "PixArtAlphaPipeline"}, "x").max_length == 120


def test_unknown_families_are_one_line_errors(tmp_path, sd_path):
    with pytest.raises(ReceError, match="HunyuanDiTPipeline rece does not know; it supports Stable Diffusion") as info:
        family_of_index({"_class_name": "HunyuanDiTPipeline", "transformer": [], "text_encoder": []}, "hunyuan")
    assert "\n" not in str(info.value)
    with pytest.raises(ReceError, match="unknown model family 'hunyuan'"):
        family_named("hunyuan")
    folder = tmp_path / "hunyuan"
    shutil.copytree(sd_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "HunyuanDiTPipeline"
    index["transformer"] = index.pop("unet")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ReceError, match="rece does not know"):
        load_model(folder)


def test_edited_layers_are_the_cross_attention_key_values(base):
    assert SD.is_edited_weight("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    assert not SD.is_edited_weight("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight")
    assert not SD.is_edited_weight("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight")
    assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in base.kv)


def test_checkpoint_family_from_its_keys(sd_path, sdxl_path, tmp_path):
    assert family_of_checkpoint(save_ldm_checkpoint(sd_path, tmp_path / "sd.safetensors")) is SD
    from safetensors.torch import save_file

    xl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}, xl)
    assert family_of_checkpoint(xl) is SDXL


def test_every_family_encodes_as_its_pipeline(sd_path, sdxl_path):
    """The family's own rows equal what its pipeline feeds to the edited layers (bit for bit on CPU)."""
    prompts = ["a photo of a cat", "", "van gogh starry night"]
    for path, cls in ((sd_path, StableDiffusionPipeline), (sdxl_path, StableDiffusionXLPipeline)):
        pipe = cls.from_pretrained(path)
        family = family_of_pipeline(pipe)
        parts = [(getattr(pipe, t), getattr(pipe, e)) for t, e in family.text_parts]
        with torch.no_grad():
            ours = family.encode_batch([t for t, _ in parts], [e for _, e in parts], prompts, torch.device("cpu"))
        theirs = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
        assert torch.equal(ours, theirs) and ours.shape[-1] == family.dim([e for _, e in parts])
    assert {f.name for f in FAMILIES} == {"sd", "sdxl", "pixart-sigma", "pixart-alpha", "sana", "flux", "sd3"}


def family_name_literals(root: Path) -> list[str]:
    """Every string literal in the modules under `root` outside families/ that is a family's name (or its stem, as in
    `startswith("flux")`): what a test of a family's name outside its module would be written with."""
    from rece.families import VARIANTS

    names = set()
    for family in FAMILIES + VARIANTS:
        for name in [family.name, *(s.name for s in family.spaces)]:
            names |= {name, name.split(":")[0], name.split("-")[0]}
    found = []
    for path in sorted(root.rglob("*.py")):
        if "families" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip().lower() in names:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    return found


def test_nothing_outside_the_families_tests_a_family_name(tmp_path):
    """Each family answers for itself: no module outside families/ compares a family's name (the check is live: a
    module that does is caught)."""
    src = Path(rece.__file__).parent
    assert family_name_literals(src) == []
    (tmp_path / "lora.py").write_text('def note(edit):\n    return edit.kind in ("flux", "sd3")\n')
    (tmp_path / "demo.py").write_text('def mmdit(family):\n    return family.name.startswith("pixart")\n')
    assert family_name_literals(tmp_path) == ["demo.py:2 'pixart'", "lora.py:2 'flux'", "lora.py:2 'sd3'"]


def test_titles_and_lists_come_from_the_families():
    from rece.families import SHOWN, supported, titles, titles_where

    assert supported().startswith("Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline)")
    assert all(f.title in supported() and f.pipelines[0] in supported() for f in SHOWN)
    assert titles_where("has_kohya_names") == "Stable Diffusion 1.x/2.x, SDXL, FLUX.1 and SD3/SD3.5"
    assert titles_where("takes_sequence_length") == "FLUX.1 and SD3/SD3.5"
    assert titles([SDXL]) == "SDXL"
    docs = (Path(__file__).parents[1] / "docs" / "families.md").read_text(encoding="utf-8")
    assert all(f.title in docs for f in SHOWN)
