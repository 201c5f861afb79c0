"""Tiny single files with the key names and layouts of the published ones, for reading without diffusers.

Names as the loaders that read them spell them: diffusers' single-file key maps (`CHECKPOINT_KEY_NAMES`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`, `convert_sd3_t5_checkpoint_to_diffusers`), ComfyUI's
checkpoint and text-encoder loaders (`text_encoders.clip_l.` / `.clip_g.` / `.t5xxl.transformer.`, split files in
transformers' names) and Black Forest Labs' FLUX.1 file (`double_blocks.`, `txt_in`, `vector_in.in_layer`,
`guidance_in`). Widths are tiny but keep the published head width (64), which a single file does not record; the
denoisers hold the edited layers and a few of their neighbours under their published names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rece.tiny import DEFAULT_WORDS, clip_text_config, init_clip_like, save_clip_tokenizer
from rece.tiny_dit import save_t5_tokenizer

from .ldm_checkpoint import open_clip_from_transformers

UNET = "model.diffusion_model."


@dataclass
class Built:
    """A single file (and split text encoder files), the tokenizer root, and the transformers encoders it holds in the
    family's text-part order (the reference the rows are checked against)."""

    path: Path
    tokenizers: Path
    encoders: list = field(default_factory=list)
    split: dict[str, Path] = field(default_factory=dict)
    edited: dict[str, str] = field(default_factory=dict)  # diffusers module -> key in the file


def clip(tokenizer, width: int, layers: int, seed: int, projection: int | None = None, act: str = "quick_gelu"):
    """A CLIP text encoder of 64-wide heads (CLIPTextModelWithProjection when `projection`)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_text_config(tokenizer, width, layers, heads=width // 64, projection_dim=projection)
    config.hidden_act = act
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    init_clip_like(model, seed)
    return model.eval()


def t5(tokenizer, width: int, seed: int):
    """A gated-GELU T5 encoder (T5-XXL's kind) with 64-wide heads."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=64, d_ff=2 * width, num_layers=2,
                      num_heads=width // 64, feed_forward_proj="gated-gelu")  # fmt: skip
    return T5EncoderModel(config).eval()


def rounded(model, dtype: torch.dtype):
    """The model's floating weights rounded to `dtype` (kept in float32): what a file stored in `dtype` holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def state(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def weights(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def clip_tokenizers(root: Path, subs: dict[str, str]):
    """CLIP tokenizer folders under root ({folder: pad token}); returns them in order."""
    return [save_clip_tokenizer(root / sub, DEFAULT_WORDS, pad_token=pad) for sub, pad in subs.items()]


def save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def unet_layers(width: int, seed: int, per_block: int = 2) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An original UNet's cross-attention K/V (and neighbours) reading `width`-wide rows, layers_per_block 2."""
    from rece.families.ldm_names import diffusers_name

    tensors, edited = {}, {}
    blocks = ["input_blocks.1.1", "input_blocks.2.1", "input_blocks.4.1", "middle_block.1", "output_blocks.3.1"]
    for i, block in enumerate(blocks):
        for j, part in enumerate(("attn2.to_k", "attn2.to_v", "attn2.to_q", "attn1.to_k")):
            wide = width if part.startswith("attn2.to_") and part != "attn2.to_q" else 32
            key = f"{UNET}{block}.transformer_blocks.0.{part}.weight"
            tensors[key] = weights((32, wide), seed + 10 * i + j)
            if part in ("attn2.to_k", "attn2.to_v"):
                edited[diffusers_name(f"{block}.transformer_blocks.0.{part}", per_block)] = key
    tensors[f"{UNET}input_blocks.3.0.op.weight"] = weights((32, 32, 3, 3), seed + 99)  # the first downsampler
    tensors[f"{UNET}time_embed.0.weight"] = weights((128, 32), seed + 98)
    tensors["first_stage_model.decoder.conv_in.weight"] = weights((8, 4, 3, 3), seed + 97)
    return tensors, edited


def sd1(root: Path, ema: bool = False) -> Built:
    """SD1.5 as A1111 saves it: CLIP-L under cond_stage_model.transformer.text_model. (and model_ema.* when `ema`)."""
    (tok,) = clip_tokenizers(root / "tok", {"tokenizer": "<|endoftext|>"})
    encoder = rounded(clip(tok, 64, 2, seed=1), torch.float16)
    tensors, edited = unet_layers(64, seed=2)
    tensors.update(state(encoder, "cond_stage_model.transformer."))
    if ema:  # LDM's EMA copy: flattened names, no dots; diffusers reads the model.diffusion_model weights
        tensors.update(
            {"model_ema." + k[len("model.") :].replace(".", ""): v + 1 for k, v in tensors.items() if k.startswith(UNET)}
        )
        tensors["model_ema.decay"], tensors["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000, dtype=torch.int32)
    return Built(save(tensors, root / "sd15.safetensors", torch.float16), root / "tok", [encoder], edited=edited)


def sd2(root: Path) -> Built:
    """SD2.1-v: OpenCLIP-H's text tower under cond_stage_model.model., whose penultimate layer the UNet reads."""
    (tok,) = clip_tokenizers(root / "tok", {"tokenizer": "!"})
    full = clip(tok, 64, 3, seed=3, projection=64, act="gelu")
    tensors, edited = unet_layers(64, seed=4)
    tensors.update({"cond_stage_model.model." + k: v for k, v in open_clip_from_transformers(state(full)).items()})
    reference = clip(tok, 64, 2, seed=0, act="gelu")  # diffusers' SD2 text encoder: the first 23 of 24 layers
    layers = {k.removeprefix("text_model."): v for k, v in full.state_dict().items() if k != "text_projection.weight"}
    result = reference.load_state_dict(layers, strict=False)
    assert not result.missing_keys and {k.split(".")[2] for k in result.unexpected_keys} == {"2"}
    tensors["model.diffusion_model.out.2.weight"] = weights((4, 32, 3, 3), 5)
    return Built(save(tensors, root / "sd21v.safetensors"), root / "tok", [reference], edited=edited)


def sdxl(root: Path, refiner: bool = False) -> Built:
    """SDXL base (CLIP-L as conditioner.embedders.0.transformer., bigG as embedders.1.model.) or refiner (bigG alone,
    as embedders.0.model.)."""
    subs = {"tokenizer_2": "!"} if refiner else {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    toks = clip_tokenizers(root / "tok", subs)
    big_g = rounded(clip(toks[-1], 128, 2, seed=6, projection=64, act="gelu"), torch.float16)
    width = 128 if refiner else 64 + 128
    tensors, edited = unet_layers(width, seed=7)
    tensors[f"{UNET}label_emb.0.0.weight"] = weights((32, 64), 8)
    prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    tensors.update({prefix + k: v for k, v in open_clip_from_transformers(state(big_g)).items()})
    encoders = [big_g]
    if not refiner:
        clip_l = rounded(clip(toks[0], 64, 2, seed=9), torch.float16)
        tensors.update(state(clip_l, "conditioner.embedders.0.transformer."))
        encoders.insert(0, clip_l)
    name = "sd_xl_refiner_1.0.safetensors" if refiner else "sd_xl_base_1.0.safetensors"
    return Built(save(tensors, root / name, torch.float16), root / "tok", encoders, edited=edited)


def flux_transformer(clip_width: int, t5_width: int, seed: int, dev: bool = True) -> dict[str, torch.Tensor]:
    """Black Forest Labs' FLUX.1 names: txt_in reads T5's rows, vector_in.in_layer CLIP's pooled vector."""
    hidden = 128
    tensors = {
        "img_in.weight": weights((hidden, 64), seed),
        "time_in.in_layer.weight": weights((hidden, 256), seed + 1),
        "vector_in.in_layer.weight": weights((hidden, clip_width), seed + 2),
        "vector_in.in_layer.bias": weights((hidden,), seed + 3),
        "vector_in.out_layer.weight": weights((hidden, hidden), seed + 4),
        "txt_in.weight": weights((hidden, t5_width), seed + 5),
        "txt_in.bias": weights((hidden,), seed + 6),
        "double_blocks.0.img_attn.qkv.weight": weights((3 * hidden, hidden), seed + 7),
        "double_blocks.0.txt_attn.qkv.weight": weights((3 * hidden, hidden), seed + 8),
        "single_blocks.0.linear1.weight": weights((4 * hidden, hidden), seed + 9),
        "final_layer.linear.weight": weights((64, hidden), seed + 10),
    }
    if dev:
        tensors["guidance_in.in_layer.weight"] = weights((hidden, 256), seed + 11)
    return tensors


FLUX_EDITED = {"context_embedder": "txt_in.weight", "time_text_embed.text_embedder.linear_1": "vector_in.in_layer.weight"}


def flux_encoders(root: Path, clip_width: int = 64, t5_width: int = 128):
    tok = clip_tokenizers(root / "tok", {"tokenizer": "<|endoftext|>"})[0]
    t5_tok = save_t5_tokenizer(root / "tok" / "tokenizer_2", DEFAULT_WORDS)
    return clip(tok, clip_width, 2, seed=11), t5(t5_tok, t5_width, seed=12)


def flux_split(root: Path, dev: bool = True) -> Built:
    """flux1-dev.safetensors (the transformer alone) with ComfyUI's split clip_l.safetensors and t5xxl_fp16.safetensors."""
    clip_l, t5xxl = flux_encoders(root)
    path = save(flux_transformer(64, 128, seed=13, dev=dev), root / "flux1-dev.safetensors", torch.bfloat16)
    rounded(clip_l, torch.float16), rounded(t5xxl, torch.float16)
    clip_keys = {"text_model." + k.removeprefix("text_model."): v for k, v in state(clip_l).items()}  # ComfyUI's names
    split = {
        "clip_l": save(clip_keys, root / "clip_l.safetensors", torch.float16),
        "t5xxl": save(state(t5xxl), root / "t5xxl_fp16.safetensors", torch.float16),
    }
    return Built(path, root / "tok", [clip_l, t5xxl], split=split, edited=dict(FLUX_EDITED))


def flux_all_in_one(root: Path, dtype=torch.float8_e4m3fn) -> Built:
    """ComfyUI's flux1-dev-fp8.safetensors: model.diffusion_model.* in fp8, text_encoders.clip_l / .t5xxl, vae.*."""
    clip_l, t5xxl = flux_encoders(root)
    rounded(clip_l, torch.float16), rounded(t5xxl, dtype)
    tensors = {UNET + k: v.to(dtype) for k, v in flux_transformer(64, 128, seed=13).items()}
    tensors.update({k: v.half() for k, v in state(clip_l, "text_encoders.clip_l.transformer.").items()})
    tensors.update({k: v.to(dtype) for k, v in state(t5xxl, "text_encoders.t5xxl.transformer.").items()})
    tensors["vae.decoder.conv_in.weight"] = weights((8, 16, 3, 3), 14)
    edited = {n: UNET + k for n, k in FLUX_EDITED.items()}
    return Built(save(tensors, root / "flux1-dev-fp8.safetensors"), root / "tok", [clip_l, t5xxl], edited=edited)


def sd35(root: Path, t5_inside: bool = True) -> Built:
    """Stability's sd3.5_large.safetensors: the MMDiT under model.diffusion_model., CLIP-L, CLIP-G (with their
    projections) and T5 under text_encoders.*.transformer., the VAE under first_stage_model."""
    toks = clip_tokenizers(root / "tok", {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})
    t5_tok = save_t5_tokenizer(root / "tok" / "tokenizer_3", DEFAULT_WORDS)
    clip_l, clip_g = clip(toks[0], 64, 2, seed=21, projection=64), clip(toks[1], 128, 2, seed=22, projection=128, act="gelu")
    t5xxl = t5(t5_tok, 256, seed=23)
    for model in (clip_l, clip_g, t5xxl):
        rounded(model, torch.float16)
    hidden = 128
    tensors = {
        UNET + "x_embedder.proj.weight": weights((hidden, 16, 2, 2), 24),
        UNET + "context_embedder.weight": weights((hidden, 256), 25),
        UNET + "context_embedder.bias": weights((hidden,), 26),
        UNET + "y_embedder.mlp.0.weight": weights((hidden, 64 + 128), 27),
        UNET + "y_embedder.mlp.2.weight": weights((hidden, hidden), 28),
        UNET + "joint_blocks.0.x_block.attn.qkv.weight": weights((3 * hidden, hidden), 29),
        UNET + "joint_blocks.0.context_block.attn.qkv.weight": weights((3 * hidden, hidden), 30),
        "first_stage_model.decoder.conv_in.weight": weights((8, 16, 3, 3), 31),
    }
    tensors.update(state(clip_l, "text_encoders.clip_l.transformer."))
    tensors.update(state(clip_g, "text_encoders.clip_g.transformer."))
    if t5_inside:
        tensors.update(state(t5xxl, "text_encoders.t5xxl.transformer."))
    edited = {
        "context_embedder": UNET + "context_embedder.weight",
        "time_text_embed.text_embedder.linear_1": UNET + "y_embedder.mlp.0.weight",
    }
    split = {"t5xxl": save(state(t5xxl), root / "t5xxl_fp16.safetensors", torch.float16)}
    path = save(tensors, root / "sd3.5_large.safetensors", torch.float16)
    return Built(path, root / "tok", [clip_l, clip_g, t5xxl], split=split, edited=edited)


def k_quant_rows(rows: int, cols: int, qtype, seed: int):
    """Raw K-quant blocks (256 values each): random scales and quants under a small fp16 d and dmin, as a converter
    would write them (gguf's Python package quantises no K types)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    data[..., :4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # d, dmin
    return data.reshape(rows, -1)


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], qtypes: dict[str, str], arch: str = "flux") -> Path:
    """A GGUF file as ComfyUI-GGUF's converter writes one: `general.architecture`, the denoiser's own names, each
    tensor in its type (F32 by default; Q8_0 / BF16 quantised by gguf, K types as raw blocks)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for name, tensor in tensors.items():
        qtype = gguf.GGMLQuantizationType[qtypes.get(name, "F32")]
        values = tensor.float().numpy()
        if qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K):
            writer.add_tensor(name, k_quant_rows(*values.shape, qtype, seed=len(name)), raw_dtype=qtype)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def flux_gguf(root: Path, qtypes: dict[str, str]) -> Built:
    """ComfyUI-GGUF's flux1-dev-Q*.gguf (the transformer alone, BFL's names) with split clip_l / t5xxl files."""
    clip_l, t5xxl = flux_encoders(root, 256, 256)
    rounded(clip_l, torch.float16), rounded(t5xxl, torch.float16)
    clip_keys = {"text_model." + k.removeprefix("text_model."): v for k, v in state(clip_l).items()}
    split = {
        "clip_l": save(clip_keys, root / "clip_l.safetensors", torch.float16),
        "t5xxl": save(state(t5xxl), root / "t5xxl_fp16.safetensors", torch.float16),
    }
    path = write_gguf(root / "flux1-dev-Q.gguf", flux_transformer(256, 256, seed=40), qtypes)
    return Built(path, root / "tok", [clip_l, t5xxl], split=split, edited=dict(FLUX_EDITED))


def bfl_flux_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a FLUX.1 transformer of diffusers `config` under Black Forest Labs' names
    (flux1-dev.safetensors, as diffusers' `convert_flux_transformer_checkpoint_to_diffusers` reads them)."""
    hidden = config.num_attention_heads * config.attention_head_dim
    head, mlp, patch = config.attention_head_dim, 4 * hidden, config.patch_size**2
    shapes = {
        "img_in": (hidden, config.in_channels * patch), "txt_in": (hidden, config.joint_attention_dim),
        "time_in.in_layer": (hidden, 256), "time_in.out_layer": (hidden, hidden),
        "vector_in.in_layer": (hidden, config.pooled_projection_dim), "vector_in.out_layer": (hidden, hidden),
        "final_layer.adaLN_modulation.1": (2 * hidden, hidden),
        "final_layer.linear": ((config.out_channels or config.in_channels) * patch, hidden),
    }  # fmt: skip
    if config.guidance_embeds:
        shapes.update({"guidance_in.in_layer": (hidden, 256), "guidance_in.out_layer": (hidden, hidden)})
    for i in range(config.num_layers):
        for side in ("img", "txt"):
            block = f"double_blocks.{i}.{side}"
            shapes.update({f"{block}_mod.lin": (6 * hidden, hidden), f"{block}_attn.qkv": (3 * hidden, hidden),
                           f"{block}_attn.proj": (hidden, hidden), f"{block}_mlp.0": (mlp, hidden),
                           f"{block}_mlp.2": (hidden, mlp)})  # fmt: skip
    for i in range(config.num_single_layers):
        block = f"single_blocks.{i}"
        shapes.update({f"{block}.linear1": (3 * hidden + mlp, hidden), f"{block}.linear2": (hidden, hidden + mlp),
                       f"{block}.modulation.lin": (3 * hidden, hidden)})  # fmt: skip
    out = {f"{name}.weight": shape for name, shape in shapes.items()}
    out.update({f"{name}.bias": shape[:1] for name, shape in shapes.items()})
    norms = [f"double_blocks.{i}.{side}_attn.norm" for i in range(config.num_layers) for side in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(config.num_single_layers)]
    out.update({f"{norm}.{which}.scale": (head,) for norm in norms for which in ("query_norm", "key_norm")})
    return out


def bfl_flux_transformer(config, seed: int) -> dict[str, torch.Tensor]:
    """A FLUX.1 transformer's tensors under Black Forest Labs' names, random (RMSNorm scales near 1)."""
    shapes = sorted(bfl_flux_shapes(config).items())
    return {k: (1 + weights(s, seed + n) if k.endswith(".scale") else weights(s, seed + n)) for n, (k, s) in enumerate(shapes)}


def sd3_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of an SD3 MMDiT of diffusers `config` (no qk norm, no dual attention) under Stability's
    names (sd3.5_large.safetensors, as diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` reads them)."""
    hidden = config.num_attention_heads * config.attention_head_dim
    patch, mlp = config.patch_size, 4 * hidden
    shapes = {
        "x_embedder.proj": (hidden, config.in_channels, patch, patch), "t_embedder.mlp.0": (hidden, 256),
        "t_embedder.mlp.2": (hidden, hidden), "y_embedder.mlp.0": (hidden, config.pooled_projection_dim),
        "y_embedder.mlp.2": (hidden, hidden), "context_embedder": (config.caption_projection_dim, config.joint_attention_dim),
        "final_layer.linear": (patch * patch * config.out_channels, hidden),
        "final_layer.adaLN_modulation.1": (2 * hidden, hidden),
    }  # fmt: skip
    for i in range(config.num_layers):
        last = i == config.num_layers - 1  # the last context block only modulates (pre_only)
        for side in ("x_block", "context_block"):
            block = f"joint_blocks.{i}.{side}"
            shapes[f"{block}.attn.qkv"] = (3 * hidden, hidden)
            shapes[f"{block}.adaLN_modulation.1"] = (2 * hidden if last and side == "context_block" else 6 * hidden, hidden)
            if not (last and side == "context_block"):
                shapes.update({f"{block}.attn.proj": (hidden, hidden), f"{block}.mlp.fc1": (mlp, hidden),
                               f"{block}.mlp.fc2": (hidden, mlp)})  # fmt: skip
    out = {f"{name}.weight": shape for name, shape in shapes.items()}
    out.update({f"{name}.bias": shape[:1] for name, shape in shapes.items()})
    out["pos_embed"] = (1, config.pos_embed_max_size**2, hidden)
    return out


def sd35_medium_split(root: Path) -> Built:
    """SD3.5 Medium as ComfyUI users keep it: the MMDiT-X alone (bare names, its dual attention attn2.* and qk norms
    ln_q / ln_k) in models/diffusion_models, and ComfyUI's clip_l, clip_g (with their projections) and t5xxl files."""
    whole = sd35(root, t5_inside=False)
    tensors = {k.removeprefix(UNET): v for k, v in load_file(whole.path).items() if k.startswith(UNET)}
    hidden = 128
    block = "joint_blocks.0.x_block."
    tensors.update({
        block + "attn2.qkv.weight": weights((3 * hidden, hidden), 32), block + "attn2.proj.weight": weights((hidden, hidden), 33),
        block + "attn.ln_q.weight": weights((64,), 34), block + "attn.ln_k.weight": weights((64,), 35),
        block + "attn2.ln_q.weight": weights((64,), 36), block + "attn2.ln_k.weight": weights((64,), 37),
    })  # fmt: skip
    clip_l, clip_g, t5xxl = whole.encoders
    split = {
        "clip_l": save(state(clip_l), root / "clip_l.safetensors", torch.float16),
        "clip_g": save(state(clip_g), root / "clip_g.safetensors", torch.float16),
        "t5xxl": whole.split["t5xxl"],
    }
    edited = {"context_embedder": "context_embedder.weight", "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0.weight"}
    path = save(tensors, root / "sd3.5_medium.safetensors", torch.float16)
    return Built(path, whole.tokenizers, whole.encoders, split=split, edited=edited)
