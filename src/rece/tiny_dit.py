"""Small diffusion-transformer pipelines (FLUX.1, SD3, PixArt-Σ, Sana) built locally with random weights.

As in `rece.tiny`, nothing is downloaded: the T5 and Gemma tokenizers are made here from a word list (one token per
word, characters for anything else), the CLIP ones by `rece.tiny.save_clip_tokenizer`, and every model is seeded.
The configurations follow diffusers' own fast tests, at sizes that build and sample in a second on a CPU.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path

import torch

from .io import atomic_dir
from .tiny import DEFAULT_WORDS, clip_text_config, init_clip_like, keep_bpe_files, save_clip_tokenizer

CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation


def save_t5_tokenizer(path: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS, max_length: int = 32):
    """Write a loadable T5 tokenizer folder (a unigram vocabulary: <pad>, </s>, <unk>, one piece per word) and return it."""
    from transformers import T5Tokenizer

    pieces = [("▁" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, ("▁", -2.0)] + [(c, -5.0) for c in CHARACTERS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(path)
    return tokenizer


def save_gemma_tokenizer(path: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS, max_length: int = 32):
    """Write a loadable Gemma tokenizer folder (BPE over characters with one merge chain per word) and return it."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tokens = specials + ["▁"] + list(CHARACTERS)
    merges = []
    for word in dict.fromkeys(w.lower() for w in words):
        current = "▁"
        for ch in word:
            merges.append((current, ch))
            current += ch
            tokens.append(current)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    merges = list(dict.fromkeys(merges))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, add_bos_token=True)
    tokenizer.save_pretrained(path)
    return tokenizer


def _t5_encoder(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval()


def _clip(tokenizer, hidden: int, seed: int, projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls(clip_text_config(tokenizer, hidden, layers=2, heads=4))
    init_clip_like(model, seed)
    return model.eval()


def _vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, **extra,
    )  # fmt: skip


def build_tiny_flux(
    path: str | os.PathLike, seed: int = 0, words=DEFAULT_WORDS, overwrite: bool = False, schnell: bool = False
) -> Path:
    """A tiny FluxPipeline folder: CLIP (pooled) + T5 text encoders, one double and one single transformer block;
    like FLUX.1-dev with guidance embeddings, like FLUX.1-schnell (`schnell`) without."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        clip_tok = save_clip_tokenizer(tmp / "_tok", words)
        t5_tok = save_t5_tokenizer(tmp / "_t5", words)
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=not schnell,
        )  # fmt: skip
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(1, shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=_clip(clip_tok, 32, seed),
            tokenizer=clip_tok,
            text_encoder_2=_t5_encoder(t5_tok, 32, seed + 1),
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
        pipe.save_pretrained(tmp)
        keep_bpe_files(tmp / "_tok", tmp / "tokenizer")
        _rmtree(tmp / "_t5")
    return path


def build_tiny_sd3(path: str | os.PathLike, seed: int = 0, words=DEFAULT_WORDS, overwrite: bool = False, t5: bool = True) -> Path:
    """A tiny StableDiffusion3Pipeline folder: two CLIP text encoders with projection and a T5 (left out, as the
    pipeline allows, when not `t5`), one joint block."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        clip_tok = save_clip_tokenizer(tmp / "_tok", words)
        t5_tok = save_t5_tokenizer(tmp / "_t5", words)
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        )  # fmt: skip
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=_clip(clip_tok, 32, seed, projection=True),
            tokenizer=clip_tok,
            text_encoder_2=_clip(clip_tok, 32, seed + 1, projection=True),
            tokenizer_2=clip_tok,
            text_encoder_3=_t5_encoder(t5_tok, 64, seed + 2) if t5 else None,
            tokenizer_3=t5_tok if t5 else None,
            transformer=transformer,
        )
        pipe.save_pretrained(tmp)
        for sub in ("tokenizer", "tokenizer_2"):
            keep_bpe_files(tmp / "_tok", tmp / sub, remove=False)
        _rmtree(tmp / "_tok")
        _rmtree(tmp / "_t5")
    return path


def build_tiny_pixart(path: str | os.PathLike, seed: int = 0, words=DEFAULT_WORDS, overwrite: bool = False) -> Path:
    """A tiny PixArtSigmaPipeline folder: a T5 text encoder and a two-block PixArt transformer with cross-attention."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        t5_tok = save_t5_tokenizer(tmp / "_t5", words)
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
            in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        )  # fmt: skip
        pipe = PixArtSigmaPipeline(
            tokenizer=t5_tok,
            text_encoder=_t5_encoder(t5_tok, 32, seed + 1),
            vae=_vae(4),
            transformer=transformer,
            scheduler=DPMSolverMultistepScheduler(),
        )
        pipe.save_pretrained(tmp)
        _rmtree(tmp / "_t5")
    return path


def build_tiny_sana(path: str | os.PathLike, seed: int = 0, words=DEFAULT_WORDS, overwrite: bool = False) -> Path:
    """A tiny SanaPipeline folder: a Gemma-2 text encoder, a one-block Sana transformer and a deep-compression VAE."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        tokenizer = save_gemma_tokenizer(tmp / "_gemma", words)
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
            sample_size=32,
        )  # fmt: skip
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
        )  # fmt: skip
        text_config = Gemma2Config(
            head_dim=16, hidden_size=8, intermediate_size=64, max_position_embeddings=8192, num_attention_heads=2,
            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer), attn_implementation="eager",
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        pipe = SanaPipeline(
            tokenizer=tokenizer,
            text_encoder=Gemma2Model(text_config).eval(),
            vae=vae,
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        )
        pipe.save_pretrained(tmp)
        _rmtree(tmp / "_gemma")
    return path


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
