"""Shared fixtures: tiny diffusers pipelines built locally once per test session (no download)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd_path(tmp_path_factory):
    from rece.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", text_dim=64)


@pytest.fixture(scope="session")
def sdxl_path(tmp_path_factory):
    from rece.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (32×32 images) saved as a complete local folder."""
    from rece.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def base(sd_path):
    from rece.models import load_model

    return load_model(sd_path)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """`tiny` resolves into a per-session cache, never the user's home."""
    monkeypatch.setenv("RECE_CACHE", str(tmp_path_factory.getbasetemp() / "rece-cache"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Two shapes-model prompts naming a triangle, as a prompt-set CSV (the attack tests' set)."""
    from .runs import write_csv

    return write_csv(
        tmp_path_factory.mktemp("sets") / "triangles.csv",
        ["case_number", "prompt", "evaluation_seed"],
        [[0, "a red triangle", 11], [1, "a photo of a blue triangle", 12]],
    )
