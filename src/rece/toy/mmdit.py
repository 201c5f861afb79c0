"""Architecture of shapes-mmdit: a standard diffusers Stable Diffusion 3 pipeline, small, on 8×8×4 latents.

Two CLIP text encoders with projection (widths 128 and 64, so the joint rows are 192 wide) and no T5: the SD3
pipeline then appends `max_sequence_length` (256) zero rows of the joint width, which the model is trained with.
An `SD3Transformer2DModel` reads the joint rows through `context_embedder` and both CLIPs' pooled embeddings
through `time_text_embed.text_embedder`; it predicts the flow-matching velocity (noise - latent). A convolutional
autoencoder maps the 32×32 image to the latent and back: it draws the edges, which a small transformer trained on
pixels for as long learns far more slowly (docs/shapes.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

T5_ROWS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zero rows without text_encoder_3
CLIP_ROWS = 24  # the tokenizers' model_max_length: every world prompt and the attacks' prefixes fit
WIDTHS = (128, 64)  # the two CLIPs' hidden sizes; their penultimate states join to 192-wide rows
LAYERS = (3, 2)
LATENT = 4  # latent channels: the image as an 8×8×4 latent


def make_text_encoders(tokenizer) -> list:
    """The two CLIPTextModelWithProjection encoders (projection = hidden size), sized for CLIP_ROWS tokens."""
    from transformers import CLIPTextModelWithProjection

    from ..tiny import clip_text_config

    encoders = []
    for width, layers in zip(WIDTHS, LAYERS):
        config = clip_text_config(tokenizer, width, layers=layers, heads=4)
        config.max_position_embeddings = CLIP_ROWS
        encoders.append(CLIPTextModelWithProjection(config))
    return encoders


def make_vae():
    """The autoencoder: 32×32×3 images to 8×8×4 latents and back, three levels of convolutions."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def train_vae(vae, images, steps: int, log, lr: Callable[[int], float] | None = None, clip: float | None = None) -> None:
    """A deterministic autoencoder: decode(latent + 0.1 noise) = image, with a small pull of the latents to 0.

    `images(n)` draws n training images in [-1, 1]. The noise keeps the decoder smooth around the latents the
    transformer will produce. `lr(step)`: the learning rate (shapes-mmdit's recipe: 1e-3 throughout); `clip`: the
    gradient norm clipped to, if any."""
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for step in range(steps):
        if lr is not None:
            opt.param_groups[0]["lr"] = lr(step)
        x = images(32)
        mean = vae.encoder(x)[:, :LATENT]
        reconstruction = vae.decoder(mean + 0.1 * torch.randn_like(mean))
        loss = (reconstruction - x).pow(2).mean() + 1e-3 * mean.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), clip)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")


@torch.no_grad()
def fit_latent_scale(vae, x: torch.Tensor) -> None:
    """Pin the log-variance very low (the latent is the mean) and set shift_factor / scaling_factor so that the
    latents of the images x have mean 0 and standard deviation 1, as the SD3 pipeline expects."""
    vae.encoder.conv_out.weight[LATENT:] = 0
    vae.encoder.conv_out.bias[LATENT:] = -30.0
    latents = vae.encoder(x)[:, :LATENT]
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


def latents_of(vae, x: torch.Tensor) -> torch.Tensor:
    """The normalised latents of images x, as the pipeline's denoising sees them (and un-does before decoding)."""
    return (vae.encoder(x)[:, :LATENT] - vae.config.shift_factor) * vae.config.scaling_factor


def make_transformer(layers: int = 4, heads: int = 4):
    """The MMDiT: `layers` joint blocks of `heads` heads of 32 on the 8×8 latent, one token per latent pixel."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=LATENT,
        out_channels=LATENT,
        num_layers=layers,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=sum(WIDTHS),
        caption_projection_dim=32 * heads,
        pooled_projection_dim=sum(WIDTHS),
        pos_embed_max_size=8,
    )


def make_scheduler():
    """Flow matching (rectified flow) with Euler sampling, no resolution shift: 32×32 needs none."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def prompt_embeds(tokenizer, encoders, texts: list[str], zero_rows: int = T5_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(joint rows, pooled) of texts exactly as StableDiffusion3Pipeline.encode_prompt builds them without T5
    (`zero_rows` = 1: the zero rows collapsed into one, for `collapsed_zero_rows`)."""
    ids = tokenizer(texts, padding="max_length", max_length=CLIP_ROWS, truncation=True, return_tensors="pt").input_ids
    outputs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
    clip = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    zeros = clip.new_zeros(clip.shape[0], zero_rows, clip.shape[-1])
    return torch.cat([clip, zeros], dim=1), torch.cat([out[0] for out in outputs], dim=-1)


class CollapsedRowsAttention:
    """Joint attention in which the last text row stands for `repeats` identical rows.

    The pipeline's T5 slot is `repeats` zero rows. Identical rows stay identical through every block (all but attention
    act row by row), and as keys with equal values they weigh exp(q·k + log repeats) together. So one row with its
    attention logit raised by log(repeats) computes exactly what the pipeline computes, with 255 fewer rows."""

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, image_rows = hidden_states.shape[:2]

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (split_heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        cq, ck, cv = (split_heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q, k = (norm(x) if norm is not None else x for norm, x in ((attn.norm_q, q), (attn.norm_k, k)))
        cq, ck = (norm(x) if norm is not None else x for norm, x in ((attn.norm_added_q, cq), (attn.norm_added_k, ck)))
        key = torch.cat([k, ck], dim=2)
        bias = key.new_zeros(1, key.shape[2])  # [query rows (broadcast), key rows], added to the logits
        bias[:, -1] = self.log_repeats
        out = torch.nn.functional.scaled_dot_product_attention(
            torch.cat([q, cq], dim=2), key, torch.cat([v, cv], dim=2), attn_mask=bias
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1])
        image, context = out[:, :image_rows], out[:, image_rows:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


@contextlib.contextmanager
def collapsed_zero_rows(transformer, repeats: int = T5_ROWS) -> Iterator[None]:
    """While inside, the transformer reads the T5 slot's `repeats` zero rows as one (`CollapsedRowsAttention`)."""
    before = transformer.attn_processors
    transformer.set_attn_processor(CollapsedRowsAttention(repeats))
    try:
        yield
    finally:
        transformer.set_attn_processor(before)


def flow_matching_loss(transformer, vae, tokenizer, encoders, images: torch.Tensor, texts: list[str], gen: torch.Generator):
    """The transformer predicts the velocity noise - x0 at x_t = (1 - σ) x0 + σ noise, x0 the images' latents,
    σ logit-normal as in SD3.

    The T5 slot's zero rows are read as one (`collapsed_zero_rows`): exactly the pipeline's function, much cheaper."""
    with torch.no_grad():
        x0 = latents_of(vae, images)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma[:, None, None, None]
    xt = (1 - s) * x0 + s * noise
    joint, pooled = prompt_embeds(tokenizer, encoders, texts, zero_rows=1)
    with collapsed_zero_rows(transformer):  # the same function as with the 256 rows, a quarter of the cost or less
        pred = transformer(xt, encoder_hidden_states=joint, pooled_projections=pooled, timestep=sigma * 1000).sample
    return (pred - (noise - x0)).pow(2).mean()


def export_pipeline(tmp, vae, encoders, tokenizer, transformer) -> None:
    """Save a StableDiffusion3Pipeline (text_encoder_3 / tokenizer_3 left empty) into the folder `tmp`."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=make_scheduler(),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(tmp)
