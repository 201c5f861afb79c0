"""Architecture of shapes-dit: a standard diffusers PixArt-Σ pipeline, small, on the 8×8×4 latents of shapes-mmdit.

PixArt-Σ rather than Sana, because it is the plainer case of what this model is for (a masked encoder read by
cross-attention in every block): its T5 encoder attends both ways with the padding masked, so a prompt's attended
rows do not depend on how far it is padded, and its transformer is softmax attention with the same
`AutoencoderKL` latents and DDPM sampler as the other shapes models. Sana adds a causal Gemma encoder, a system
prompt the pipeline prepends, linear self-attention and its own deep-compression autoencoder, none of which the
question of pairing masked rows needs.

A small `T5EncoderModel` (bidirectional, padding masked by the attention mask) feeds `PixArtTransformer2DModel`:
its `caption_projection` maps each row to the transformer's width, and every block reads the projected rows through
cross-attention (`attn2`), the padding masked by `encoder_attention_mask`. The transformer predicts v (Salimans &
Ho 2022) on the DDPM forward process with PixArt's linear β schedule and samples with PixArt's own
DPMSolverMultistepScheduler: v is the DDPM analogue of the velocity shapes-mmdit learns well at this size, and it is
accurate at the noisiest steps, where an ε-prediction's x0 is not. The autoencoder is shapes-mmdit's, trained with
the same objective, its learning rate cooling down; PixArt's pipeline divides latents by `scaling_factor` and
applies no shift, so the scale alone is fitted here.
"""

from __future__ import annotations

import os

import torch

from ..tiny_dit import save_t5_tokenizer
from . import mmdit
from .mmdit import LATENT

WIDTH = 128  # the T5 encoder's width (the transformer's caption_channels)
ENCODER_LAYERS = 3
HEADS, HEAD_DIM = 4, 32  # the transformer's width: 128
LAYERS = 6
TOKENS = 32  # the tokenizer's model_max_length (the pipeline pads to its own max_sequence_length, 300, masked)
NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}  # sample size 8: PixArt uses none


def make_tokenizer(path: str | os.PathLike, words):
    """The T5 tokenizer of the shapes words (one piece per word), written to `path` and returned."""
    return save_t5_tokenizer(path, words, max_length=TOKENS)


def make_text_encoder(tokenizer):
    """A T5 v1.1-style encoder (gated GELU, relative position buckets), no dropout: training is deterministic."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=WIDTH,
        d_kv=WIDTH // 4,
        d_ff=2 * WIDTH,
        num_layers=ENCODER_LAYERS,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def make_transformer(layers: int = LAYERS):
    """The PixArt transformer: `layers` blocks (self-attention, cross-attention, feed-forward) of 4 heads of 32 on the
    8×8 latent, one token per latent pixel, adaLN-single; no learned variance (out_channels = latent channels)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=LATENT,
        out_channels=LATENT,
        num_layers=layers,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=WIDTH,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def make_scheduler():
    """PixArt's sampler and β schedule (linear, 1e-4 to 0.02 over 1000 steps), for a v-predicting model."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="v_prediction"
    )


def vae_learning_rate(step: int, steps: int, peak: float = 1e-3, cooldown: float = 0.2) -> float:
    """The autoencoder's learning rate: `peak`, then linearly down to 0 over the last `cooldown` share of the steps."""
    start = int(steps * (1 - cooldown))
    return peak if step < start else peak * (steps - step) / max(1, steps - start)


def train_vae(vae, images, steps: int, log) -> None:
    """shapes-mmdit's autoencoder objective (`mmdit.train_vae`) with the learning rate cooling down to 0 and gradients
    clipped at norm 1: the last weights are the ones kept, and at a constant 1e-3 an Adam step can wreck them (a
    run of this recipe ended at a reconstruction error of 0.13 from 0.002 a hundred steps before)."""
    mmdit.train_vae(vae, images, steps, log, lr=lambda step: vae_learning_rate(step, steps), clip=1.0)


@torch.no_grad()
def fit_latent_scale(vae, x: torch.Tensor) -> None:
    """Pin the log-variance very low (the latent is the mean) and set `scaling_factor` so that the latents of the
    images x have a root mean square of 1; no shift, as the PixArt pipeline applies none."""
    vae.encoder.conv_out.weight[LATENT:] = 0
    vae.encoder.conv_out.bias[LATENT:] = -30.0
    latents = vae.encoder(x)[:, :LATENT]
    vae.register_to_config(shift_factor=None, scaling_factor=1.0 / latents.pow(2).mean().sqrt().item())


def latents_of(vae, x: torch.Tensor) -> torch.Tensor:
    """The scaled latents of images x, as the pipeline's denoising sees them (and divides by the scale to decode)."""
    return vae.encoder(x)[:, :LATENT] * vae.config.scaling_factor


def encode(tokenizer, encoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 rows, attention mask) of texts, padded to the longest: on its attended rows the same function as the
    pipeline's padding to max_sequence_length, since the padding is masked in the encoder and in the transformer."""
    inputs = tokenizer(texts, padding="longest", truncation=True, max_length=TOKENS, return_tensors="pt")
    return encoder(inputs.input_ids, attention_mask=inputs.attention_mask)[0], inputs.attention_mask


def predict(transformer, noisy: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The transformer's output at timesteps t given T5 rows and their mask, as the pipeline calls it."""
    out = transformer(noisy, encoder_hidden_states=rows, encoder_attention_mask=mask, timestep=t,
                      added_cond_kwargs=NO_MICRO_CONDITIONS)  # fmt: skip
    return out.sample


def noisy_and_v(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε and the target v = √ᾱ_t ε − √(1−ᾱ_t) x0 at integer timesteps t [n]."""
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return a * x0 + b * noise, a * noise - b * x0


def v_prediction_loss(transformer, vae, tokenizer, encoder, images, texts: list[str], gen: torch.Generator, scheduler):
    """‖v̂ − v‖² at t uniform over the training timesteps, x0 the images' latents, conditioned on the captions."""
    with torch.no_grad():
        x0 = latents_of(vae, images)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    noisy, v = noisy_and_v(scheduler, x0, torch.randn(x0.shape, generator=gen), t)
    rows, mask = encode(tokenizer, encoder, texts)
    return (predict(transformer, noisy, t, rows, mask) - v).pow(2).mean()


def export_pipeline(tmp, vae, encoder, tokenizer, transformer) -> None:
    """Save a PixArtSigmaPipeline into the folder `tmp`."""
    from diffusers import PixArtSigmaPipeline

    PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer, scheduler=make_scheduler()
    ).save_pretrained(tmp)
