"""Model access: find a model, read its prompt encoder and its cross-attention key/value weights.

The fast path reads only the text encoder(s) and the `attn2.to_k` / `attn2.to_v` tensors from the
UNet's safetensors file(s); no UNet is built. The text encoders compute in float32 on their mapped files,
with half-precision weights cast when used, so no float32 copy is made. A pipeline object already in memory
works too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ReceError
from .text import PromptEncoder

KV_WEIGHT = re.compile(r"(^|\.)attn2\.to_[kv]\.weight$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class BaseModel:
    """What an erasure needs from a model: its prompt encoder and its original cross-attention K/V weights.

    `kv` maps UNet module names (e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`)
    to their weights (out × d), sorted by name.
    """

    encoder: PromptEncoder
    kv: dict[str, torch.Tensor]
    source: str
    kind: str = "sd"
    folder: Path | None = None
    pipeline: object | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    _gram: torch.Tensor | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return next(iter(self.kv.values())).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.kv.values())).dtype

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = kv_fingerprint(self.kv)
        return self._fingerprint

    def original_gram(self) -> torch.Tensor:
        """G₀ = Σ W⁰ᵀW⁰ over the K/V layers (float64, on the encoder's device), computed once per base model.

        It is kept in the gram cache ($RECE_CACHE/grams; RECE_GRAM_CACHE=0 turns it off), so the next erasure from
        the same base reads it instead of multiplying out every layer; a cached gram is used only after it passes a
        random-probe check against these weights.
        """
        from .closed_form import weight_gram

        if self._gram is None:
            device = self.encoder.device
            self._gram = read_cached_gram(self, device)
            if self._gram is None:
                self._gram = weight_gram(w.to(device) for w in self.kv.values())
                write_cached_gram(self, self._gram)
        return self._gram


def kv_fingerprint(kv: dict[str, torch.Tensor]) -> str:
    """sha256 of the K/V weights' names, shapes and float16-rounded values.

    Rounding to float16 makes the fp32 and fp16 releases of one base model share a fingerprint.
    """
    h = hashlib.sha256()
    for name in sorted(kv):
        w = kv[name].detach().to("cpu", torch.float16).contiguous()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy())
    return h.hexdigest()[:16]


GRAM_CACHE_ENV = "RECE_GRAM_CACHE"


def gram_cache_file(base: BaseModel) -> Path | None:
    """Where the gram of `base` is cached: $RECE_CACHE/grams/FINGERPRINT-DTYPE-LAYERS.safetensors (None: cache off)."""
    if os.environ.get(GRAM_CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = Path(os.environ.get("RECE_CACHE") or Path.home() / ".cache" / "rece").expanduser()
    dtype = str(base.dtype).removeprefix("torch.")
    return root / "grams" / f"{base.fingerprint()}-{dtype}-{len(base.kv)}.safetensors"


def gram_matches(gram: torch.Tensor, kv: dict[str, torch.Tensor], tolerance: float = 1e-9) -> bool:
    """Whether `gram` is Σ WᵀW of these weights, by Freivalds' check: G·v against Σ Wᵀ(W·v) for a random v."""
    v = torch.randn(gram.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(gram.device)
    probe = torch.zeros_like(v)
    for w in kv.values():
        w = w.to(gram.device, torch.float64)
        probe += w.T @ (w @ v)
    return bool(torch.linalg.vector_norm(gram @ v - probe) <= tolerance * torch.linalg.vector_norm(probe))


def read_cached_gram(base: BaseModel, device: str | torch.device) -> torch.Tensor | None:
    """The cached gram of `base`, or None when there is none, it is unreadable, or it does not match the weights."""
    from safetensors.torch import load_file

    path = gram_cache_file(base)
    if path is None or not path.is_file():
        return None
    try:
        gram = load_file(str(path), device=str(device))["gram"]
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    if gram.dtype != torch.float64 or gram.shape != (base.dim, base.dim) or not gram_matches(gram, base.kv):
        return None
    return gram


def write_cached_gram(base: BaseModel, gram: torch.Tensor) -> None:
    """Keep `gram` for the next erasure from this base (atomically; a cache that cannot be written is skipped)."""
    from safetensors.torch import save_file

    from .io import atomic_file

    path = gram_cache_file(base)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"gram": gram.detach().to("cpu").contiguous()}, str(tmp), metadata={"source": base.source})
    except OSError:
        pass


def kv_names(module_names) -> list[str]:
    """Module names of the cross-attention K/V projections among `module_names` (parameter names allowed)."""
    return [n[: -len(".weight")] for n in module_names if KV_WEIGHT.search(n)]


def check_finite(kv: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf weights. A float64 sum of half or single precision values cannot overflow, so it is finite
    exactly when every value is (and needs no mask as large as the weights)."""
    for name, w in kv.items():
        if not torch.isfinite(w.sum(dtype=torch.float64)):
            raise ReceError(f"model '{source}' has NaN/Inf in weight {name}; the checkpoint is corrupt, re-download it")


def load_model(model, device: str | torch.device = "cpu", config: str | None = None) -> BaseModel:
    """Resolve MODEL (pipeline object, diffusers folder, hub id, single-file checkpoint, or `tiny`)."""
    if hasattr(model, "unet"):
        return from_pipeline(model, source=type(model).__name__)
    if not isinstance(model, (str, os.PathLike)):
        raise ReceError(f"cannot read a model from {type(model).__name__}; pass a pipeline, a folder or a hub id")
    name = str(model)
    if name in NAMED_MODELS:
        return from_folder(named_model_path(name), device, source=name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return from_single_file(path, device, config=config)
    if path.is_dir():
        return from_folder(path, device)
    if path.exists():
        raise ReceError(f"'{name}' is not a diffusers folder or a .safetensors checkpoint; pass one of those or a hub id")
    if HUB_ID.match(name) and not name.startswith((".", "/")):
        return from_folder(download(name), device, source=name)
    raise ReceError(f"model path '{name}' does not exist; pass a diffusers folder, a hub id or a .safetensors checkpoint")


NAMED_MODELS = ("shapes", "tiny")


def named_model_path(name: str) -> Path:
    """Folder of a model rece knows by name: `shapes` (trained, shipped in the package) or `tiny` (built locally)."""
    if name == "tiny":
        from .tiny import tiny_model_path

        return tiny_model_path()
    path = Path(__file__).parent / "toy" / "shapes"
    if not (path / "model_index.json").is_file():
        raise ReceError(f"the shapes model is missing from '{path}'; reinstall rece or train it with python -m rece.toy.train")
    return path


def download(repo_id: str) -> Path:
    """Fetch the parts of a hub pipeline that erasure reads (text encoders, tokenizers, UNet)."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "text_encoder*/*", "tokenizer*/*", "unet/*", "scheduler/*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=["*.bin", "*.ckpt", "*.msgpack"]))
    except Exception as exc:  # the hub client raises many types: offline, not found, gated, network
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReceError(
            f"cannot fetch '{repo_id}' from the hub ({reason}); check the id and your connection, "
            "or download it once and pass the local folder"
        ) from None


def _read_model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ReceError(f"'{folder}' is not a diffusers pipeline (no model_index.json); pass the pipeline's root folder")
    try:
        return json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReceError(f"cannot read '{index}' ({exc}); the pipeline folder is damaged") from None


def unet_weight_files(unet_dir: Path) -> list[Path]:
    """The UNet's weight file(s): plain, fp16 variant or sharded safetensors, else a .bin file."""
    for stem in ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16"):
        files = safetensors_files(unet_dir, stem)
        if files:
            return files
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
        if (unet_dir / name).is_file():
            return [unet_dir / name]
    raise ReceError(f"no UNet weights in '{unet_dir}' (expected diffusion_pytorch_model.safetensors); the folder is incomplete")


def read_kv_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """Read only the cross-attention K/V tensors of a UNet folder."""
    from safetensors import SafetensorError, safe_open

    kv: dict[str, torch.Tensor] = {}
    for file in unet_weight_files(unet_dir):
        if file.suffix == ".bin":
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            kv.update({n[: -len(".weight")]: state[n].clone() for n in state if KV_WEIGHT.search(n)})
            continue
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if KV_WEIGHT.search(key):
                        kv[key[: -len(".weight")]] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ReceError(f"cannot read UNet weights '{file}' ({exc}); the file is corrupt or incomplete") from None
    return dict(sorted(kv.items()))


def _load_text_encoder(folder: Path, sub: str, class_name: str, device):
    import transformers

    if class_name not in TEXT_ENCODER_CLASSES:
        raise ReceError(
            f"text encoder '{sub}' is a {class_name}; rece supports CLIP text encoders ({', '.join(TEXT_ENCODER_CLASSES)})"
        )
    cls = getattr(transformers, class_name)
    variant = None
    if not any((folder / sub).glob("model*.safetensors")) and any((folder / sub).glob("model.fp16*")):
        variant = "fp16"
    encoder = _mapped_text_encoder(folder / sub, cls, variant)
    if encoder is None:
        encoder = cls.from_pretrained(folder / sub, torch_dtype=torch.float32, variant=variant, local_files_only=True)
    return encoder.to(device).eval()


def safetensors_files(folder: Path, stem: str) -> list[Path]:
    """`stem`.safetensors, or the shards its index lists; [] when neither is there."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


class Float32Cast(torch.nn.Module):
    """Parametrization that reads a weight kept in half precision as float32 (exact: no rounding)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float()


class Float32Embedding(torch.nn.Embedding):
    """A token table kept in its stored precision whose looked-up rows come out in float32 (exact)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def _mapped_text_encoder(folder: Path, cls, variant: str | None):
    """Build a CLIP text encoder that computes in float32 straight on the tensors mapped from its safetensors
    file(s); None when the folder is not plain safetensors that fill the model (then from_pretrained runs).

    Nothing is copied: half-precision Linear weights stay as stored and are cast to float32 when used, and the
    token table is read row by row, so the float32 copy of the model (twice a half-precision file) is never made.
    The casts are exact, so the outputs equal those of the float32 model from_pretrained builds, bit for bit.
    """
    from safetensors import SafetensorError, safe_open
    from torch.nn.utils import parametrize

    files = safetensors_files(folder, "model.fp16" if variant else "model")
    if not files:
        return None
    config = cls.config_class.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = cls(config)
        table = model.get_input_embeddings()
        table_name = next(n for n, m in model.named_modules() if m is table)
        _replace_module(model, table_name, Float32Embedding(table.num_embeddings, table.embedding_dim, table.padding_idx))
    wanted = set(model.state_dict())
    kept = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} | {f"{table_name}.weight"}
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = _model_key(key, wanted)
                    if name is not None:
                        tensor = f.get_tensor(key)
                        state[name] = tensor if name in kept or not tensor.is_floating_point() else tensor.float()
    except (SafetensorError, OSError) as exc:
        raise ReceError(f"cannot read text encoder weights in '{folder}' ({exc}); the file is corrupt or incomplete") from None
    buffers = {n for n, _ in model.named_buffers()}
    if wanted - buffers - set(state):
        return None
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype != torch.float32:
            parametrize.register_parametrization(module, "weight", Float32Cast(), unsafe=True)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                return None
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return model


def _replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _model_key(key: str, wanted: set[str]) -> str | None:
    """The model's name for a checkpoint key (checkpoints differ by a `text_model.` prefix); None if unused."""
    for name in (key, key.removeprefix("text_model."), "text_model." + key):
        if name in wanted:
            return name
    return None


def from_folder(folder: Path, device: str | torch.device = "cpu", source: str | None = None) -> BaseModel:
    """Read a diffusers pipeline folder: tokenizer(s), text encoder(s) and the UNet's K/V weights."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    index = _read_model_index(folder)
    source = source or str(folder)
    if "unet" not in index or not (folder / "unet").is_dir():
        raise ReceError(f"'{folder}' has no UNet; rece edits Stable Diffusion UNets (SD1.x, SD2.x, SDXL)")
    unet_config = json.loads((folder / "unet" / "config.json").read_text()) if (folder / "unet" / "config.json").is_file() else {}
    kv = read_kv_weights(folder / "unet")
    if not kv or not unet_config.get("cross_attention_dim", 1):
        raise ReceError(f"the UNet of '{source}' has no cross-attention (attn2.to_k/to_v); it cannot be conditioned on text")
    check_finite(kv, source)
    kind = "sdxl" if "text_encoder_2" in index else "sd"
    tokenizers, encoders = [], []
    for sub_tok, sub_enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        entry = index.get(sub_enc)
        if not entry or entry[1] is None:
            continue
        tokenizers.append(CLIPTokenizer.from_pretrained(folder / sub_tok, local_files_only=True))
        encoders.append(_load_text_encoder(folder, sub_enc, entry[1], device))
    if not encoders:
        raise ReceError(f"'{source}' has no text encoder; rece needs the pipeline's CLIP text encoder(s)")
    encoder = PromptEncoder(tokenizers, encoders, kind=kind, device=device)
    _check_dims(encoder, kv, source)
    return BaseModel(encoder=encoder, kv=kv, source=source, kind=kind, folder=folder)


def _check_dims(encoder: PromptEncoder, kv: dict[str, torch.Tensor], source: str) -> None:
    d = next(iter(kv.values())).shape[1]
    if encoder.dim != d:
        raise ReceError(
            f"'{source}': text embeddings are {encoder.dim}-wide but cross-attention reads {d}; the pipeline's parts do not match"
        )


def from_pipeline(pipe, source: str = "pipeline") -> BaseModel:
    """Use a diffusers pipeline already in memory (its current UNet weights count as the originals)."""
    kv = {n: m.weight.detach().clone() for n, m in sorted(pipe.unet.named_modules()) if KV_WEIGHT.search(n + ".weight")}
    if not kv:
        raise ReceError(f"the UNet of '{source}' has no cross-attention (attn2.to_k/to_v); it cannot be conditioned on text")
    check_finite(kv, source)
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]
    kind = "sdxl" if hasattr(pipe, "text_encoder_2") else "sd"
    device = encoders[0].device
    encoder = PromptEncoder(tokenizers, encoders, kind=kind, device=device)
    _check_dims(encoder, kv, source)
    return BaseModel(encoder=encoder, kv=kv, source=source, kind=kind, pipeline=pipe)


def _is_sdxl_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())


def load_single_file_pipeline(path: Path, config: str | None = None):
    """A float32 SD / SDXL pipeline from an original-format (LDM) checkpoint, via diffusers' single-file loader.

    Offline, `config` must name a local diffusers folder of the same architecture for the component configs.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        sdxl = _is_sdxl_checkpoint(path)
        cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        kwargs = {"config": str(config)} if config else {}
        if not sdxl:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        return cls.from_single_file(str(path), dtype=torch.float32, **kwargs)
    except ReceError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "check that it is a Stable Diffusion checkpoint of the same architecture as --config"
            if config
            else "offline, pass --config with a local diffusers folder of the same architecture"
        )
        raise ReceError(f"cannot load checkpoint '{path}' ({reason}); {hint}") from None


def from_single_file(path: Path, device="cpu", config: str | None = None) -> BaseModel:
    """Read a single-file checkpoint (see `load_single_file_pipeline`)."""
    pipe = load_single_file_pipeline(path, config).to(device)
    return from_pipeline(pipe, source=str(path))
