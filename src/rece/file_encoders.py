"""Text encoders inside single-file checkpoints and ComfyUI's split text-encoder files: found by their keys and shapes,
renamed to transformers' names, and built in float32 on the tensors as stored (`clip_text.ClipText` for CLIP,
transformers' `T5EncoderModel` for T5), with their widths and depths read from the file.

Where they sit (diffusers' single-file key maps, ComfyUI's checkpoint and text-encoder loaders):

| prefix | encoder | names |
|---|---|---|
| `cond_stage_model.transformer.` | SD1's CLIP-L | transformers' (`text_model.` may be left out) |
| `cond_stage_model.model.` | SD2's OpenCLIP-H | OpenCLIP's (`transformer.resblocks.N.attn.in_proj_weight`, ...) |
| `conditioner.embedders.0.transformer.` / `.1.model.` | SDXL base's CLIP-L / CLIP-G | transformers' / OpenCLIP's |
| `conditioner.embedders.0.model.` | SDXL refiner's CLIP-G | OpenCLIP's |
| `text_encoders.clip_l.transformer.`, `.clip_g.`, `.t5xxl.` | all-in-one FLUX / SD3 files | transformers' |
| (none) | split files: `clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors` | transformers' |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .clip_text import ACTIVATIONS, CONFIG_DEFAULTS, ClipText, weight_names
from .errors import ReceError
from .families.encoders import EncoderSpec, clip_slot, spec_named
from .safetensors_header import DTYPES

# (prefix in a single file, the encoder it holds, OpenCLIP's names or transformers')
PREFIXES = (
    ("cond_stage_model.transformer.", "clip_l", False),
    ("cond_stage_model.model.", "clip_h", True),
    ("conditioner.embedders.0.transformer.", "clip_l", False),
    ("conditioner.embedders.1.model.", "clip_g", True),
    ("conditioner.embedders.0.model.", "clip_g", True),
    ("text_encoders.clip_l.transformer.", "clip_l", False),
    ("text_encoders.clip_g.transformer.", "clip_g", False),
    ("text_encoders.t5xxl.transformer.", "t5xxl", False),
)
OPEN_CLIP_NAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # [width, projection] in OpenCLIP: transposed
}
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}  # fmt: skip
RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
CLIP_MARK = "embeddings.token_embedding.weight"
T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
SCALED = (".scale_weight", ".scale_input", "scaled_fp8")  # ComfyUI's scaled fp8 files


@dataclass
class FoundEncoder:
    """A text encoder in a file: `names` maps each transformers name to (its key in the file, how it is stored:
    '' as is, 'T' transposed, 'q'/'k'/'v' a third of OpenCLIP's joined projection)."""

    slot: str | None  # clip_l, clip_h, clip_g, t5xxl; None: a CLIP whose slot its width decides (a small split file)
    kind: str  # 'clip' or 't5'
    path: Path
    header: dict = field(repr=False)
    names: dict[str, tuple[str, str]] = field(repr=False)
    given: bool = False  # passed with --text-encoder (else found inside the checkpoint)

    def shape(self, name: str) -> list[int]:
        key, how = self.names[name]
        shape = list(self.header[key]["shape"])
        return shape[::-1] if how == "T" else [shape[0] // 3, *shape[1:]] if how in ("q", "k", "v") else shape

    @property
    def width(self) -> int:
        return self.shape(CLIP_MARK if self.kind == "clip" else "shared.weight")[1]

    @property
    def layers(self) -> int:
        pattern = r"^(?:text_model\.)?encoder\.layers\.(\d+)\." if self.kind == "clip" else r"^encoder\.block\.(\d+)\."
        return 1 + max((int(m[1]) for n in self.names if (m := re.match(pattern, n))), default=-1)

    @property
    def title(self) -> str:
        return spec_named(self.slot).title if self.slot else "a CLIP"

    def describe(self) -> str:
        """How messages name it: its kind and width, and the file it came from."""
        return f"{self.title} ({self.width} wide) in '{self.path}'"


def _transformers_names(header: dict, prefix: str) -> dict[str, tuple[str, str]]:
    """transformers' names of the tensors under `prefix` (`text_model.` dropped: ClipText reads names without it; a T5
    token table stored only as `encoder.embed_tokens`, which transformers ties to `shared`, read as `shared` too)."""
    keys = [k for k in header if k.startswith(prefix) and k != "__metadata__"]
    names = {k[len(prefix) :].removeprefix("text_model."): (k, "") for k in keys}
    if "shared.weight" not in names and "encoder.embed_tokens.weight" in names:
        names["shared.weight"] = names["encoder.embed_tokens.weight"]
    return names


def _open_clip_names(header: dict, prefix: str) -> dict[str, tuple[str, str]]:
    """transformers' CLIP names of an OpenCLIP text tower's tensors (the inverse of SGM's layout)."""
    names = {}
    for key in header:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest in OPEN_CLIP_NAMES:
            names[OPEN_CLIP_NAMES[rest]] = (key, "T" if rest == "text_projection" else "")
        elif m := IN_PROJ.match(rest):
            for part in "qkv":
                names[f"encoder.layers.{m[1]}.self_attn.{part}_proj.{m[2]}"] = (key, part)
        elif (m := RESBLOCK.match(rest)) and m[2] in OPEN_CLIP_LAYER:
            names[f"encoder.layers.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = (key, "")
    return names


def encoders_in_checkpoint(path: Path, header: dict) -> list[FoundEncoder]:
    """The text encoders a single-file checkpoint holds, by the prefixes its family's files put them under."""
    found = []
    for prefix, slot, open_clip in PREFIXES:
        if any(k.startswith(prefix) for k in header):
            names = (_open_clip_names if open_clip else _transformers_names)(header, prefix)
            kind = "t5" if slot == "t5xxl" else "clip"
            if names:
                found.append(FoundEncoder(slot, kind, path, header, names))
    return found


def encoder_in_file(path: Path, header: dict) -> FoundEncoder:
    """The one text encoder of a split file (ComfyUI's models/text_encoders), recognised by its keys and shapes."""
    names = _transformers_names(header, "")
    if T5_MARK in names:
        return FoundEncoder("t5xxl", "t5", path, header, names, given=True)
    if CLIP_MARK in names:
        encoder = FoundEncoder(None, "clip", path, header, names, given=True)
        encoder.slot = clip_slot(encoder.layers) or ("clip_l" if encoder.width == spec_named("clip_l").width else None)
        return encoder
    inside = encoders_in_checkpoint(path, header)
    if len(inside) == 1:  # a single-file checkpoint's prefix around one encoder
        inside[0].given = True
        return inside[0]
    raise ReceError(
        f"'{path}' is not a text encoder file rece knows (no CLIP {CLIP_MARK} nor T5 {T5_MARK}); pass ComfyUI's "
        "clip_l / clip_g / t5xxl .safetensors files"
    )


def check_unscaled(encoder_or_keys, source: str) -> None:
    """Refuse ComfyUI's scaled fp8 files (weights stored divided by a `*.scale_weight`), which rece does not rescale."""
    keys = encoder_or_keys.header if isinstance(encoder_or_keys, FoundEncoder) else encoder_or_keys
    scaled = next((k for k in keys if k.endswith(SCALED)), None)
    if scaled is not None:
        raise ReceError(
            f"'{source}' is a scaled fp8 file ({scaled}), whose weights rece cannot read without ComfyUI's scaling; "
            "use the plain fp16/bf16 or unscaled fp8 file"
        )


def read_tensors(encoder: FoundEncoder, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The encoder's tensors by transformers' name (those in `wanted`, else all), as stored; float8 upcast to bfloat16
    (which the encoders compute from in float32, as they do from half-precision files)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(encoder.path), framework="pt") as f:
            joined: dict[str, torch.Tensor] = {}
            for name, (key, how) in encoder.names.items():
                if wanted is not None and name not in wanted:
                    continue
                if how in ("q", "k", "v"):
                    whole = joined.setdefault(key, f.get_tensor(key))
                    third = whole.shape[0] // 3
                    tensor = whole[third * "qkv".index(how) : third * ("qkv".index(how) + 1)]
                else:
                    tensor = f.get_tensor(key)
                    tensor = tensor.T if how == "T" else tensor
                if tensor.dtype in (DTYPES["F8_E4M3"], DTYPES["F8_E5M2"]):
                    tensor = tensor.to(torch.bfloat16)  # exact (bfloat16 holds every float8 value), half float32's memory
                out[name] = tensor.contiguous()
    except (SafetensorError, OSError) as exc:
        raise ReceError(f"cannot read the text encoder in '{encoder.path}' ({exc}); the file is corrupt or incomplete") from None
    return out


def clip_config(encoder: FoundEncoder, spec: EncoderSpec, eos_token_id: int, folder_config=None) -> SimpleNamespace:
    """ClipText's config from the file's shapes and the published encoder's record (a `folder_config`, the config.json
    of a --config folder, when given: it says the heads and layers of a model of other widths)."""
    if folder_config is not None:
        return folder_config
    width = encoder.width
    projection = encoder.shape("text_projection.weight")[0] if "text_projection.weight" in encoder.names else width
    return SimpleNamespace(**{
        **CONFIG_DEFAULTS,
        "vocab_size": encoder.shape(CLIP_MARK)[0], "hidden_size": width, "projection_dim": projection,
        "intermediate_size": encoder.shape("encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": encoder.layers - spec.dropped_layers, "num_attention_heads": max(width // spec.head_width, 1),
        "max_position_embeddings": encoder.shape("embeddings.position_embedding.weight")[0],
        "hidden_act": spec.activation, "eos_token_id": eos_token_id,
    })  # fmt: skip


def build_clip(encoder: FoundEncoder, config: SimpleNamespace, projected: bool, source: str) -> ClipText:
    """ClipText on the encoder's tensors (its first `num_hidden_layers` layers)."""
    if config.hidden_act not in ACTIVATIONS or config.hidden_size % config.num_attention_heads:
        raise ReceError(f"{encoder.describe()}: its configuration is not one rece computes; pass the published file")
    if projected and "text_projection.weight" not in encoder.names:
        raise ReceError(
            f"{encoder.describe()} has no text_projection, which {source} reads; pass the {encoder.title} file made "
            "for this model (ComfyUI's SD3 text encoders carry it)"
        )
    wanted = set(weight_names(config, projected))
    missing = sorted(wanted - set(encoder.names))
    if missing:
        raise ReceError(f"{encoder.describe()} lacks {missing[0]}; the file is incomplete or not a CLIP text encoder")
    return ClipText(config, read_tensors(encoder, wanted), with_projection=projected)


def t5_config(encoder: FoundEncoder):
    """transformers' T5Config of a T5 file, read from its shapes (heads: the relative attention bias's columns; gated
    GELU when the feed-forward has wi_0 and wi_1, as T5 v1.1 and T5-XXL have)."""
    from transformers import T5Config

    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    for needed in (bias, "shared.weight"):
        if needed not in encoder.names:
            raise ReceError(f"{encoder.describe()} lacks {needed}; the file is incomplete")
    buckets, heads = encoder.shape(bias)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in encoder.names
    ff = encoder.shape(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
    return T5Config(
        vocab_size=encoder.shape("shared.weight")[0], d_model=encoder.width, num_layers=encoder.layers, num_heads=heads,
        d_kv=encoder.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads, d_ff=ff,
        relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated else "relu",
    )  # fmt: skip


def build_t5(encoder: FoundEncoder):
    """transformers' T5EncoderModel on the file's tensors as stored, its configuration read from the file's shapes."""
    from transformers import T5EncoderModel

    from .text_encoders import mapped_model

    model = mapped_model(T5EncoderModel, t5_config(encoder), read_tensors(encoder))
    if model is None:
        raise ReceError(f"{encoder.describe()}: its tensors do not fill a T5 encoder; the file is incomplete")
    return model.eval()
