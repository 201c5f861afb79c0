"""Prompt encoding is exactly what the pipelines feed to cross-attention."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from rece.models import load_model
from rece.text import TruncationWarning

PROMPTS = ["a photo of a cat", "nudity", "", " ", "van gogh starry night"]


def test_sd_encoding_matches_pipeline(sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    base = load_model(sd_path)
    ours = base.encoder.encode(PROMPTS)
    theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert ours.shape == (len(PROMPTS), 77, 64) and ours.dtype == torch.float64
    assert torch.allclose(ours, theirs.double(), atol=1e-5)


def test_sdxl_encoding_matches_pipeline(sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    base = load_model(sdxl_path)
    assert base.kind == "sdxl" and base.encoder.dim == 80
    ours = base.encoder.encode(PROMPTS)
    theirs = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    assert ours.shape == theirs.shape == (len(PROMPTS), 77, 80)
    assert torch.allclose(ours, theirs.double(), atol=1e-5)


def test_token_counts_and_truncation(base):
    assert base.encoder.token_counts(["nudity", " ", "", "a red car"]) == [3, 2, 2, 5]
    with pytest.warns(TruncationWarning, match="truncated to 77"):
        base.encoder.warn_if_truncated(["cat " * 90])
    assert base.encoder.token_counts(["cat " * 90]) == [77]


def test_half_precision_sdxl_encoders_encode_as_the_float32_pipeline(sdxl_path, tmp_path):
    """Both SDXL text encoders stored in fp16 (as the hub's fp16 variants are): rece computes on the stored
    tensors in float32 and gets exactly what the float32 pipeline (upcast at load) feeds to cross-attention."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "xl-fp16"
    shutil.copytree(sdxl_path, folder)
    for sub in ("text_encoder", "text_encoder_2"):
        file = folder / sub / "model.safetensors"
        save_file({k: v.half() for k, v in load_file(file).items()}, file)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    base = load_model(folder)
    assert all(e.get_input_embeddings().weight.dtype == torch.float16 for e in base.encoder.text_encoders)
    ours = base.encoder.encode(PROMPTS)
    theirs = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    assert torch.equal(ours, theirs.double())
