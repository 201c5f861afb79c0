"""The shapes-dit recipe (`python -m rece.toy.train --arch dit`): a PixArt-Σ pipeline with a masked T5 encoder,
`caption_projection` and cross-attention in every block, trained from a seed and resumable. Tiny step counts: these
check the architecture, the export and the training function, not a model that draws well."""

import json

import pytest
import torch

from rece.attacks.objective import noisy_and_target
from rece.models import load_model
from rece.toy import dit
from rece.toy.train import main, train
from rece.toy.world import WORDS

TRAIN = ["--arch", "dit", "--steps", "2", "--vae-steps", "2", "--batch-size", "2", "--save-every", "1"]


def folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of the recipe through its command line, the state saved after step 1."""
    out = tmp_path_factory.mktemp("dit") / "shapes-dit"
    assert main(["-o", str(out), *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(trained):
    from diffusers import PixArtSigmaPipeline

    return PixArtSigmaPipeline.from_pretrained(trained)


def test_the_architecture_has_a_masked_t5_a_caption_projection_and_cross_attention_in_every_block(tmp_path):
    tokenizer = dit.make_tokenizer(tmp_path / "tok", WORDS)
    torch.manual_seed(0)
    encoder, transformer = dit.make_text_encoder(tokenizer), dit.make_transformer()
    assert type(encoder).__name__ == "T5EncoderModel" and type(transformer).__name__ == "PixArtTransformer2DModel"
    assert len(transformer.transformer_blocks) == dit.LAYERS
    for block in transformer.transformer_blocks:
        assert block.attn2.to_k.in_features == dit.HEADS * dit.HEAD_DIM  # reads the projected caption rows
    assert transformer.caption_projection.linear_1.in_features == encoder.config.d_model == dit.WIDTH
    # one token per world word, then </s>
    assert all(len(tokenizer(w).input_ids) == 2 for w in WORDS)
    # padding is masked: the attended rows do not depend on how far the prompt is padded, nor on the padding's ids
    short = tokenizer(["a red triangle"], return_tensors="pt")
    long = tokenizer(["a red triangle"], padding="max_length", max_length=20, return_tensors="pt")
    n = short.input_ids.shape[1]
    with torch.no_grad():
        rows = encoder(short.input_ids, attention_mask=short.attention_mask)[0]
        padded = encoder(long.input_ids, attention_mask=long.attention_mask)[0]
        other_ids = long.input_ids.clone()
        other_ids[:, n:] = tokenizer("circle").input_ids[0]
        other = encoder(other_ids, attention_mask=long.attention_mask)[0]
    assert torch.allclose(rows, padded[:, :n], atol=1e-5) and torch.allclose(padded[:, :n], other[:, :n], atol=1e-5)
    assert (padded[:, n:] - other[:, n:]).abs().max() > 1e-2  # the padding rows themselves did change
    # and the transformer ignores masked rows: changing them changes nothing
    for p in transformer.parameters():  # adaLN-single starts near 0: give every path a non-trivial weight
        p.data.normal_(0, 0.1)
    x, t = torch.randn(1, dit.LATENT, 8, 8), torch.tensor([500])
    with torch.no_grad():
        a = dit.predict(transformer, x, t, padded, long.attention_mask)
        b = dit.predict(transformer, x, t, other, long.attention_mask)
        unmasked = dit.predict(transformer, x, t, other, torch.ones_like(long.attention_mask))
    assert torch.allclose(a, b, atol=1e-5) and (a - unmasked).abs().max() > 1e-3


def test_the_autoencoder_learning_rate_cools_down_to_zero_and_reaches_the_optimiser():
    """Regression: at mmdit's constant 1e-3 a run's last Adam steps took the kept autoencoder from a reconstruction
    error of 0.002 to 0.13; shapes-dit's stage 1 cools the learning rate down to 0 and clips the gradients."""
    steps = 1500
    rates = [dit.vae_learning_rate(s, steps) for s in range(steps)]
    assert rates[0] == rates[1199] == 1e-3 and rates[-1] <= 1e-3 / 300 + 1e-12
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    images = lambda n: torch.rand(n, 3, 32, 32) * 2 - 1  # noqa: E731
    torch.manual_seed(0)
    vae = dit.mmdit.make_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    dit.mmdit.train_vae(vae, images, 2, lambda m: None, lr=lambda step: 0.0, clip=1.0)  # the schedule is what Adam uses
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    dit.train_vae(vae, images, 2, lambda m: None)
    assert not all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


def test_two_steps_export_a_pixart_sigma_pipeline_rece_reads_as_pixart(trained, pipe):
    meta = json.loads((trained / "training.json").read_text())
    assert meta["arch"] == "dit" and meta["steps"] == 2 and meta["seed"] == 0
    assert folder_bytes(trained) <= 20 * 2**20
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel" and type(pipe.text_encoder).__name__ == "T5EncoderModel"
    assert pipe.vae.config.shift_factor is None  # the PixArt pipeline applies no shift: the latents were fitted without
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    base = load_model(str(trained))
    assert base.family.name == "pixart-sigma"
    kv = list((base.spaces or [base])[0].kv)
    assert kv == [f"transformer_blocks.{i}.attn2.to_{p}" for i in range(dit.LAYERS) for p in "kv"]
    image = pipe("a red triangle", num_inference_steps=2, use_resolution_binning=False, clean_caption=False, output_type="np")
    assert image.images.shape == (1, 32, 32, 3)


def test_training_reads_the_prompt_as_the_pipeline_does(pipe):
    """The rows and mask training uses (padded to the longest caption) give the transformer output the pipeline's
    rows (padded to its max_sequence_length, 300) give, and the forward process and v target are those the
    gradient attacks assume for this scheduler."""
    texts = ["a red triangle", "", "a photo of a blue cross"]
    with torch.no_grad():
        options = {"do_classifier_free_guidance": False, "clean_caption": False, "max_sequence_length": 300}
        rows, mask, _, _ = pipe.encode_prompt(texts, **options)
        ours, our_mask = dit.encode(pipe.tokenizer, pipe.text_encoder, texts)
        assert rows.shape[1] == 300 and ours.shape[1] == our_mask.shape[1] == 7
        assert torch.equal(mask[:, :7], our_mask) and not mask[:, 7:].any()
        torch.manual_seed(0)
        x, t = torch.randn(3, dit.LATENT, 8, 8), torch.tensor([10, 500, 990])
        full = dit.predict(pipe.transformer, x, t, rows, mask)
        short = dit.predict(pipe.transformer, x, t, ours, our_mask)
    assert (full - short).abs().max() <= 1e-4 * full.abs().max()
    x0, noise = torch.randn(3, dit.LATENT, 8, 8), torch.randn(3, dit.LATENT, 8, 8)
    for got, want in zip(dit.noisy_and_v(pipe.scheduler, x0, noise, t), noisy_and_target(pipe.scheduler, x0, noise, t)):
        assert torch.allclose(got, want, atol=1e-6)


def test_the_recipe_is_reproducible_from_its_seed_and_resumes_from_the_saved_step(trained, tmp_path):
    from safetensors.torch import load_file

    again = tmp_path / "again"
    assert main(["-o", str(again), *TRAIN]) == 0
    for part in ("transformer/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model"):
        first, second = load_file(trained / f"{part}.safetensors"), load_file(again / f"{part}.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = tmp_path / "other"
    assert main(["-o", str(other), *TRAIN, "--seed", "1"]) == 0
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert not all(torch.equal(a, b) for a, b in zip(load_file(again / name).values(), load_file(other / name).values()))
    lines = []
    train(again, steps=3, vae_steps=2, batch_size=2, arch="dit", log=lines.append)
    assert "resuming at step 1" in lines and not any(line.startswith("vae step") for line in lines)  # stage 1 read back
    assert json.loads((again / "training.json").read_text())["steps"] == 3


def test_a_second_run_on_a_folder_another_live_run_holds_is_refused_in_one_line(tmp_path, capsys):
    import os
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".busy.work.rece-lock").write_text(str(holder.pid))
        assert main(["-o", str(tmp_path / "busy"), *TRAIN]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pid {holder.pid}" in err and "busy.work" in err
        assert not (tmp_path / "busy.work").exists()  # nothing of the refused run written
    finally:
        holder.kill()
        holder.wait()
    assert main(["-o", str(tmp_path / "busy"), *TRAIN]) == 0  # a lock whose process is gone is taken over
    assert not (tmp_path / ".busy.work.rece-lock").exists() and os.path.isdir(tmp_path / "busy")
