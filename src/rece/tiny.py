"""Small diffusers pipelines built locally with random weights, for tests, benchmarks and offline demos.

Nothing here downloads anything: the tokenizer is a real CLIP BPE tokenizer (vocab.json + merges.txt)
with a small vocabulary built from a word list, and every model is initialised from a seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .io import atomic_dir

DEFAULT_WORDS = (
    "a an the of in on with and by photo picture painting image drawing style art artist "
    "red green blue yellow black white purple orange circle square triangle cross star "
    "cat dog car tree house person man woman nude nudity naked sexual hate harassment violence "
    "suffering humiliation harm suicide bodily fluids blood church parachute truck fish "
    "van gogh picasso monet starry night portrait landscape"
).split()

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Apply BPE merges to a symbol tuple exactly as CLIP's tokenizer does."""
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


def build_clip_tokenizer_files(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) of a CLIP BPE tokenizer in which every word in `words` is one token.

    Any other text still tokenizes, character by character, as with the real CLIP vocabulary.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
        pieces = _bpe(symbols, ranks)
        while len(pieces) > 1:  # join what the existing merges leave, left to right
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            pieces = (pair[0] + pair[1],) + pieces[2:]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in merges]


def save_clip_tokenizer(path: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS, pad_token: str = EOS):
    """Write a loadable CLIPTokenizer folder and return the tokenizer."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_tokenizer_files(words)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(path, pad_token=pad_token, model_max_length=77)
    tokenizer.save_pretrained(path)
    return tokenizer


def keep_bpe_files(src: Path, dst: Path, remove: bool = True) -> None:
    """Keep vocab.json + merges.txt beside tokenizer.json so any CLIPTokenizer version loads the folder."""
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, dst / name)
    if remove:
        shutil.rmtree(src)


def clip_text_config(tokenizer, hidden_size: int, layers: int, heads: int, projection_dim: int | None = None):
    """A small CLIPTextConfig matching `tokenizer` (its vocabulary size and BOS, EOS and pad ids)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.pad_token_id,
    )


def init_clip_like(model: torch.nn.Module, seed: int) -> None:
    """Deterministic init with CLIP-like scales (token embeddings ~ N(0, 0.02))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "embedding" in name else p.shape[-1] ** -0.5))


def build_tiny_sd(
    path: str | os.PathLike,
    text_dim: int = 128,
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    overwrite: bool = False,
) -> Path:
    """Write a tiny SD1.x-style pipeline folder (random weights, 8 cross-attention K/V layers)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        tokenizer = save_clip_tokenizer(tmp / "_tok", words)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, text_dim, layers=2, heads=4))
        init_clip_like(text_encoder, seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(16,),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=8,
        )
        scheduler = DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        keep_bpe_files(tmp / "_tok", tmp / "tokenizer")
    return path


def build_tiny_sdxl(path: str | os.PathLike, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """Write a tiny SDXL-style pipeline folder with two text encoders (random weights)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    path = Path(path)
    with atomic_dir(path) as tmp:
        tokenizer = save_clip_tokenizer(tmp / "_tok1", words)
        tokenizer_2 = save_clip_tokenizer(tmp / "_tok2", words, pad_token="!")
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, 32, layers=2, heads=4))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, 48, layers=2, heads=4, projection_dim=32))
        init_clip_like(text_encoder, seed)
        init_clip_like(text_encoder_2, seed + 1)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 48,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            use_linear_projection=True,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(16,),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=8,
        )
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
        pipe.save_pretrained(tmp)
        keep_bpe_files(tmp / "_tok1", tmp / "tokenizer")
        keep_bpe_files(tmp / "_tok2", tmp / "tokenizer_2")
    return path


def build_random_sd14(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a full-size SD1.4-architecture pipeline (CLIP ViT-L/14 text encoder, SD1.x UNet) with random weights.

    Used by benchmarks: real sizes and layer counts, no download. The tokenizer keeps the small vocabulary,
    while the text encoder's embedding table has CLIP's full 49,408 rows, so memory is measured at real size.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    path = Path(path)
    with atomic_dir(path) as tmp:
        tokenizer = save_clip_tokenizer(tmp / "_tok")
        config = clip_text_config(tokenizer, 768, layers=12, heads=12)
        config.intermediate_size = 3072
        config.vocab_size = 49408  # CLIP's: the embedding table has its real size (token ids stay small)
        text_encoder = CLIPTextModel(config)
        init_clip_like(text_encoder, seed)
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.to(dtype=dtype)
        pipe.save_pretrained(tmp)
        keep_bpe_files(tmp / "_tok", tmp / "tokenizer")
    return path


def build_tiny_clip(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised CLIPModel (32×32 images) saved as a complete local folder: a stand-in for the CLIP of
    clip-score / CLIP-feature FID in tests and offline dry runs."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    path = Path(path)
    tok = save_clip_tokenizer(path)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text.update(
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def tiny_model_path() -> Path:
    """The cached tiny SD pipeline behind the model name `tiny` (built on first use)."""
    root = Path(os.environ.get("RECE_CACHE", Path.home() / ".cache" / "rece"))
    path = root / "tiny-sd"
    if not (path / "model_index.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        build_tiny_sd(path, overwrite=True)
    return path
