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
