"""Tiny diffusion-transformer pipelines built locally (FLUX.1, SD3, PixArt-Σ, Sana): they load as their pipeline,
encode prompts and draw images, with tokenizers made here."""

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from transformers import GemmaTokenizer, T5Tokenizer

from rece.tiny_dit import (
    build_tiny_flux,
    build_tiny_pixart,
    build_tiny_sana,
    build_tiny_sd3,
    save_gemma_tokenizer,
    save_t5_tokenizer,
)

BUILDERS = {
    "FluxPipeline": (build_tiny_flux, {"max_sequence_length": 32}),
    "StableDiffusion3Pipeline": (build_tiny_sd3, {"max_sequence_length": 32}),
    "PixArtSigmaPipeline": (
        build_tiny_pixart,
        {"max_sequence_length": 32, "use_resolution_binning": False, "clean_caption": False},
    ),
    "SanaPipeline": (
        build_tiny_sana,
        {"max_sequence_length": 32, "use_resolution_binning": False, "complex_human_instruction": None},
    ),
}


def test_local_t5_and_gemma_tokenizers(tmp_path):
    save_t5_tokenizer(tmp_path / "t5", ["red", "cat"])
    t5 = T5Tokenizer.from_pretrained(tmp_path / "t5")
    assert t5.convert_ids_to_tokens(t5("a red cat").input_ids) == ["▁", "a", "▁red", "▁cat", "</s>"]
    assert t5(["red"], padding="max_length", max_length=4).input_ids == [[t5.convert_tokens_to_ids("▁red"), 1, 0, 0]]
    save_gemma_tokenizer(tmp_path / "gemma", ["red", "cat"])
    gemma = GemmaTokenizer.from_pretrained(tmp_path / "gemma")
    assert gemma.convert_ids_to_tokens(gemma("a red cat").input_ids) == ["<bos>", "a", "▁red", "▁cat"]


@pytest.mark.parametrize("pipeline", list(BUILDERS))
def test_tiny_pipeline_loads_encodes_and_draws(tmp_path, pipeline):
    build, call = BUILDERS[pipeline]
    folder = build(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == pipeline
    images = pipe(
        prompt=["a red cat", "a blue square"], num_inference_steps=2, height=32, width=32, output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **call,
    ).images  # fmt: skip
    assert images.shape == (2, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()
    again = build(tmp_path / "again")  # seeded: the same weights every time
    name = "diffusion_pytorch_model.safetensors"
    first, second = load_file(folder / "transformer" / name), load_file(again / "transformer" / name)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 4 * 2**20


@pytest.mark.parametrize("build, folder_name", [(build_tiny_pixart, "text_encoder"), (build_tiny_sana, "text_encoder")])
def test_t5_and_gemma_encoders_compute_on_their_mapped_files(tmp_path, build, folder_name):
    """T5's token table is stored once (`shared`, tied to `encoder.embed_tokens`) and Gemma-2 scales its embeddings and
    computes rotary frequencies: rece maps both like CLIP, with no float32 copy (bf16 tensors cast on use) and the
    outputs of the float32 model bit for bit."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma2Model, T5EncoderModel

    from rece.text_encoders import Float32Embedding, mapped_text_encoder

    folder = build(tmp_path / "pipe") / folder_name
    file = folder / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file)
    cls = T5EncoderModel if build is build_tiny_pixart else Gemma2Model
    mapped = mapped_text_encoder(folder, cls, None).eval()
    reference = cls.from_pretrained(folder, dtype=torch.float32).eval()
    table = mapped.get_input_embeddings()
    assert isinstance(table, Float32Embedding) and table.weight.dtype == torch.bfloat16
    if cls is T5EncoderModel:
        assert mapped.encoder.embed_tokens is mapped.shared
    ids, mask = torch.tensor([[3, 4, 5, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(mapped(ids, attention_mask=mask)[0], reference(ids, attention_mask=mask)[0])
