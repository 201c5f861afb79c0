"""Checks shared by the tests of the transformer families (test_masked_families, test_mmdit)."""

import pytest
import torch

from rece.tiny_dit import build_tiny_flux, build_tiny_pixart, build_tiny_sana, build_tiny_sd3

# tiny pipelines of the transformer families, by name (the UNet families are conftest's sd_path / sdxl_path)
DIT_BUILDERS = {"pixart": build_tiny_pixart, "sana": build_tiny_sana, "flux": build_tiny_flux, "sd3": build_tiny_sd3}
WITH_SCHNELL = {**DIT_BUILDERS, "flux-schnell": lambda path: build_tiny_flux(path, schnell=True)}


def built_case(cases: dict):
    """A module-scoped fixture, one parameter per case: (case, the tiny model folder its `build` writes)."""

    @pytest.fixture(scope="module", params=list(cases))
    def case(request, tmp_path_factory):
        c = cases[request.param]
        return c, c.build(tmp_path_factory.mktemp("models") / request.param)

    return case


def assert_only_edited_layers_change(edit, pipe, layers) -> None:
    """Applying `edit` changes exactly the weights of `layers` in the transformer; reverting restores every byte."""
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    edit.apply(pipe)
    after = pipe.transformer.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {n + ".weight" for n in layers}
    edit.revert(pipe)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())


def fused_lora_weights(pipe, path, state: dict, layers) -> dict:
    """The weights of `layers` after loading the LoRA file `path` (its tensors `state`) into `pipe` and fusing it: with
    the pipeline's own `load_lora_weights`, or with peft where diffusers gives it none (PixArt, docs/families.md)."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        modules = dict(pipe.transformer.named_modules())
        return {n: modules[n].base_layer.weight if hasattr(modules[n], "base_layer") else modules[n].weight for n in layers}
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    ranks = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"): v.shape[0] for k, v in state.items() if "lora_A" in k}
    config = LoraConfig(r=max(ranks.values()), target_modules=list(ranks), rank_pattern=ranks, alpha_pattern=ranks)
    inject_adapter_in_model(config, pipe.transformer)  # each layer its own rank (exact layers: full), at scale 1
    set_peft_model_state_dict(pipe.transformer, {k.removeprefix("transformer."): v for k, v in state.items()})
    modules = dict(pipe.transformer.named_modules())
    for name in layers:
        modules[name].merge()
    return {n: modules[n].base_layer.weight for n in layers}


def cli(capsys):
    """A runner of `rece` commands: run(*argv, code=0) asserts the exit status and returns stdout + stderr."""
    from rece.cli import main

    def run(*argv, code=0):
        result = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert result == code, err
        return out + err

    return run


def assert_cli_erase_info_apply(run, path, family_name: str, tmp_path):
    """`rece erase --preset nudity`, `rece info` naming the family, and `rece apply` writing the edit's weights; the
    edit file's path."""
    import rece
    from rece.models import load_model

    edit = tmp_path / "nudity.safetensors"
    run("erase", path, "--preset", "nudity", "-o", edit)
    assert family_name in run("info", edit)
    run("apply", path, edit, "-o", tmp_path / "applied")
    applied, expected = load_model(tmp_path / "applied").kv, rece.load_edit(edit).edited_kv(load_model(path).kv)
    assert all(torch.equal(applied[n], w) for n, w in expected.items())
    return edit
