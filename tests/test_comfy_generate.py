"""`rece generate` from ComfyUI's files: FLUX.1's split files (flux1-dev.safetensors, clip_l, t5xxl, ae.safetensors)
and its all-in-one file draw the images the equivalent diffusers folder draws; missing parts are one line each."""

import json
import re

import numpy as np
import pytest
import torch

import rece.generate as gen
from rece.cli import main
from rece.errors import ReceError
from rece.families.flux_names import diffusers_state
from rece.tiny_dit import build_tiny_flux

from .comfy_files import UNET, bfl_flux_shapes, bfl_flux_transformer, save, sd3_shapes, state, weights
from .ldm_checkpoint import vae_to_ldm
from .runs import pixels, write_csv

FAST = dict(steps=2, height=16, width=16, progress=False, device="cpu", limit=2)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny FLUX.1-dev folder whose transformer is what diffusers reads from the BFL-named file, and that file with
    ComfyUI's split text encoders and the VAE in LDM names (ae.safetensors), and the all-in-one file of them."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    root = tmp_path_factory.mktemp("flux-files")
    folder = build_tiny_flux(root / "folder")
    pipe = FluxPipeline.from_pretrained(folder)
    bfl = bfl_flux_transformer(pipe.transformer.config, seed=40)
    transformer = FluxTransformer2DModel.from_config(pipe.transformer.config)
    transformer.load_state_dict(diffusers_state(bfl), strict=True)
    transformer.save_pretrained(folder / "transformer")
    clip_l = {"text_model." + k.removeprefix("text_model."): v for k, v in state(pipe.text_encoder).items()}
    vae = vae_to_ldm(state(pipe.vae), len(pipe.vae.config.block_out_channels))
    files = {
        "denoiser": save(bfl, root / "flux1-dev.safetensors"),
        "clip_l": save(clip_l, root / "clip_l.safetensors"),
        "t5xxl": save(state(pipe.text_encoder_2), root / "t5xxl_fp16.safetensors"),
        "vae": save(vae, root / "ae.safetensors"),
    }
    whole = {UNET + k: v for k, v in bfl.items()}
    whole.update(state(pipe.text_encoder, "text_encoders.clip_l.transformer."))
    whole.update(state(pipe.text_encoder_2, "text_encoders.t5xxl.transformer."))
    whole.update({"vae." + k: v for k, v in vae.items()})
    files["all_in_one"] = save(whole, root / "flux1-dev-fp8.safetensors")
    prompts = write_csv(root / "set.csv", ["prompt", "evaluation_seed", "case_number"], [["a red circle", 3, 0], ["a cat", 4, 1]])
    return folder, files, prompts


def test_bfl_names_convert_as_diffusers_converts_them_at_flux1_width():
    """rece's conversion of Black Forest Labs' names equals diffusers' converter at FLUX.1-dev's widths (every tensor a
    row index plus its own offset, expanded: no memory), and at any width tests the tiny files."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, patch_size=1, in_channels=64,
                             out_channels=None, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                             num_layers=2, num_single_layers=2)  # fmt: skip
    tensors = {}
    for n, (key, shape) in enumerate(sorted(bfl_flux_shapes(config).items())):
        rows = torch.arange(shape[0], dtype=torch.float32) + 100_000 * n
        tensors[key] = rows.view(-1, *[1] * (len(shape) - 1)).expand(shape)
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(tensors))
    ours = diffusers_state({UNET + k: v for k, v in tensors.items()})
    assert sorted(ours) == sorted(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def reference(flux, tmp_path_factory):
    folder, _, prompts = flux
    return pixels(gen.generate_run(folder, prompts, tmp_path_factory.mktemp("runs") / "folder", **FAST))


def test_split_files_draw_the_folders_images(flux, reference, tmp_path):
    folder, files, prompts = flux
    out = gen.generate_run(files["denoiser"], prompts, tmp_path / "split", config=folder, vae=files["vae"],
                           text_encoders=[files["t5xxl"], files["clip_l"]], **FAST)  # fmt: skip
    images = pixels(out)
    assert sorted(images) == sorted(reference) == ["0_0.png", "1_0.png"]
    assert all(np.array_equal(images[n], reference[n]) for n in images)
    assert not np.array_equal(images["0_0.png"], images["1_0.png"])  # the prompts reach the image
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["pipeline"] == "FluxPipeline" and model["vae"] == str(files["vae"].resolve())
    assert sorted(model["text_encoders"]) == sorted(str(files[k].resolve()) for k in ("t5xxl", "clip_l"))


def test_all_in_one_file_draws_the_folders_images_from_the_command_line(flux, reference, tmp_path, capsys):
    folder, files, prompts = flux
    out = tmp_path / "whole"
    argv = [files["all_in_one"], "--prompts", prompts, "-o", out, "--config", folder, "--steps", "2", "--height", "16",
            "--width", "16", "--device", "cpu", "--limit", "2"]  # fmt: skip
    assert main(["generate", *map(str, argv)]) == 0
    images = pixels(out)
    assert sorted(images) == sorted(reference) and all(np.array_equal(images[n], reference[n]) for n in images)


def test_a_half_precision_file_is_read_upcast(flux, tmp_path):
    """A bfloat16 split denoiser draws what the folder holding the same rounded weights draws (fp8 reads the same
    way: upcast on reading)."""
    from rece.pipelines import load_pipeline

    folder, files, _ = flux
    path = save({k: v.to(torch.bfloat16) for k, v in state_of(files["denoiser"]).items()}, tmp_path / "bf16.safetensors")
    pipe = load_pipeline(path, str(folder), [files["clip_l"], files["t5xxl"]], str(files["vae"]))
    weight = pipe.transformer.context_embedder.weight
    assert weight.dtype == torch.float32
    expected = state_of(files["denoiser"])["txt_in.weight"].to(torch.bfloat16).float()
    assert torch.equal(weight, expected)


def state_of(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize(
    "problem, match",
    [
        ("no_vae", "holds no VAE.*--vae FILE"),
        ("no_t5", "has no T5-XXL.*--text-encoder FILE"),
        ("vae_not_a_vae", "holds no VAE"),
        ("vae_on_a_folder", "--vae goes with a single-file checkpoint"),
        ("offline_no_config", "needs the FLUX.1 configs.*not cached.*--config DIR"),
        ("config_without_vae", "has no vae/config.json.*--config DIR"),
        ("truncated", "truncated|corrupt|incomplete|damaged"),
    ],
)
def test_missing_or_bad_parts_are_one_line_and_nothing_is_written(flux, problem, match, tmp_path, capsys, monkeypatch):
    folder, files, prompts = flux
    model, extra = files["denoiser"], []
    encoders = ["--text-encoder", files["clip_l"], "--text-encoder", files["t5xxl"]]
    config = ["--config", folder]
    if problem == "no_vae":
        extra = [*encoders, *config]
    elif problem == "no_t5":
        extra = ["--text-encoder", files["clip_l"], "--vae", files["vae"], *config]
    elif problem == "vae_not_a_vae":
        extra = [*encoders, "--vae", files["clip_l"], *config]
    elif problem == "vae_on_a_folder":
        model, extra = folder, ["--vae", files["vae"]]
    elif problem == "offline_no_config":
        monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        extra = [*encoders, "--vae", files["vae"]]
    elif problem == "config_without_vae":
        partial = tmp_path / "partial"
        for sub in ("transformer", "scheduler", "tokenizer", "tokenizer_2"):
            (partial / sub).mkdir(parents=True)
            for f in (folder / sub).iterdir():
                if f.suffix in (".json", ".txt", ".model"):
                    (partial / sub / f.name).write_bytes(f.read_bytes())
        extra = [*encoders, "--vae", files["vae"], "--config", partial]
    elif problem == "truncated":
        model = tmp_path / "cut.safetensors"
        model.write_bytes(files["denoiser"].read_bytes()[:5000])
        extra = [*encoders, "--vae", files["vae"], *config]
    out = tmp_path / "out"
    code = main(["generate", str(model), "--prompts", str(prompts), "-o", str(out), *map(str, extra), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not out.exists()


def test_text_encoders_go_with_single_files_only(flux, tmp_path):
    from rece.pipelines import load_pipeline

    folder, files, _ = flux
    with pytest.raises(ReceError, match="--text-encoder goes with a single-file checkpoint"):
        load_pipeline(folder, None, [str(files["clip_l"])])


def test_an_edit_erased_from_the_split_files_draws_and_applies_as_from_the_folder(flux, reference, tmp_path, capsys):
    """The user's whole route: erase from ComfyUI's files, draw with the edit from them, write a folder from them."""
    from safetensors.torch import load_file

    folder, files, prompts = flux
    parts = ["--text-encoder", files["clip_l"], "--text-encoder", files["t5xxl"], "--config", folder]
    edit = tmp_path / "edit.safetensors"
    assert main(["erase", *map(str, [files["denoiser"], "-c", "a red circle", *parts, "-o", edit])]) == 0
    drawn = {}
    for name, model, extra in (("folder", folder, {}), ("split", files["denoiser"], {"config": folder, "vae": files["vae"],
                               "text_encoders": [files["clip_l"], files["t5xxl"]]})):  # fmt: skip
        drawn[name] = pixels(gen.generate_run(model, prompts, tmp_path / name, edits=[edit], **FAST, **extra))
    assert all(np.array_equal(drawn["split"][n], drawn["folder"][n]) for n in reference)
    assert not np.array_equal(drawn["split"]["0_0.png"], reference["0_0.png"])  # the edit changed the erased prompt
    outs = {"folder": tmp_path / "from-folder", "split": tmp_path / "from-split"}
    assert main(["apply", str(folder), str(edit), "-o", str(outs["folder"])]) == 0
    argv = [files["denoiser"], edit, "-o", outs["split"], *parts, "--vae", files["vae"]]
    assert main(["apply", *map(str, argv)]) == 0
    weights = [load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")) for out in outs.values()]
    assert sorted(weights[0]) == sorted(weights[1])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(
        weights[1]["context_embedder.weight"], diffusers_state(state_of(files["denoiser"]))["context_embedder.weight"]
    )


@pytest.mark.parametrize("t5_inside", [True, False])
def test_sd35_all_in_one_draws_the_folders_images(t5_inside, tmp_path):
    """Stability's SD3.5 file (three text encoders, CLIPs projected, the VAE under first_stage_model.), and the same
    without T5 plus ComfyUI's t5xxl file, draw what the folder draws."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from rece.tiny_dit import build_tiny_sd3

    folder = build_tiny_sd3(tmp_path / "folder")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    shapes = sorted(sd3_shapes(pipe.transformer.config).items())
    original = {k: weights(s, 60 + n) for n, (k, s) in enumerate(shapes)}
    transformer = SD3Transformer2DModel.from_single_file(dict(original), config=str(folder), subfolder="transformer")
    transformer.save_pretrained(folder / "transformer")
    whole = {UNET + k: v for k, v in original.items()}
    for slot, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2), ("t5xxl", pipe.text_encoder_3)):
        if slot != "t5xxl" or t5_inside:
            whole.update(state(encoder, f"text_encoders.{slot}.transformer."))
    vae = vae_to_ldm(state(pipe.vae), len(pipe.vae.config.block_out_channels))
    whole.update({"first_stage_model." + k: v for k, v in vae.items()})
    path = save(whole, tmp_path / "sd3.5_large.safetensors")
    extra = {} if t5_inside else {"text_encoders": [save(state(pipe.text_encoder_3), tmp_path / "t5xxl_fp16.safetensors")]}
    prompts = write_csv(tmp_path / "set.csv", ["prompt", "evaluation_seed", "case_number"], [["a red circle", 3, 0]])
    ref = pixels(gen.generate_run(folder, prompts, tmp_path / "ref", **FAST))
    images = pixels(gen.generate_run(path, prompts, tmp_path / "file", config=folder, **FAST, **extra))
    assert sorted(images) == sorted(ref) == ["0_0.png"] and np.array_equal(images["0_0.png"], ref["0_0.png"])
