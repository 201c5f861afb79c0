"""Text encoders that compute in float32 straight on their mapped safetensors files (no float32 copy is made)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .clip_text import load_clip_text
from .console import quiet_loading
from .errors import ReceError
from .weights import safetensors_files


def load_text_encoder(folder: Path, sub: str, class_name: str, classes: tuple[str, ...], device):
    """Text encoder `sub` of a pipeline folder in float32 (mapped when it is plain safetensors), on `device`: CLIP's in
    plain torch (`rece.clip_text`, no transformers import), others with transformers."""
    if class_name not in classes:
        raise ReceError(f"text encoder '{sub}' is a {class_name}; this pipeline's text encoders are read as {', '.join(classes)}")
    variant = None
    if not any((folder / sub).glob("model*.safetensors")) and any((folder / sub).glob("model.fp16*")):
        variant = "fp16"
    encoder = load_clip_text(folder / sub, class_name, safetensors_files(folder / sub, "model.fp16" if variant else "model"))
    if encoder is None:
        import transformers

        cls = getattr(transformers, class_name)
        encoder = mapped_text_encoder(folder / sub, cls, variant)
        if encoder is None:
            with quiet_loading():
                encoder = cls.from_pretrained(folder / sub, dtype=torch.float32, variant=variant, local_files_only=True)
    return encoder.to(device).eval()


class Float32Cast(torch.nn.Module):
    """Parametrization that reads a weight kept in half precision as float32 (exact: no rounding)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float()


class Float32Embedding(torch.nn.Embedding):
    """A token table kept in its stored precision whose looked-up rows come out in float32 (exact), times the table's
    `embed_scale` for models that scale their embeddings (Gemma)."""

    def __init__(self, *args, embed_scale: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = None if embed_scale is None else embed_scale.detach().to(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids).float()
        return rows if self.embed_scale is None else rows * self.embed_scale


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory) and their buffers as usual (rotary
    frequencies, position ids and embedding scales are computed, not stored)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def mapped_text_encoder(folder: Path, cls, variant: str | None):
    """Build a text encoder (CLIP, T5, Gemma-2) that computes in float32 straight on the tensors mapped from its safetensors
    file(s); None when the folder is not plain safetensors that fill the model (then from_pretrained runs).

    Nothing is copied: half-precision Linear weights stay as stored and are cast to float32 when used, and the
    token table is read row by row, so the float32 copy of the model (twice a half-precision file) is never made.
    The casts are exact, so the outputs equal those of the float32 model from_pretrained builds, bit for bit.
    """
    from safetensors import SafetensorError, safe_open

    files = safetensors_files(folder, "model.fp16" if variant else "model")
    if not files:
        return None
    config = cls.config_class.from_pretrained(folder, local_files_only=True)
    stored: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            with safe_open(file, framework="pt") as f:
                stored.update({key: f.get_tensor(key) for key in f.keys()})
    except (SafetensorError, OSError) as exc:
        raise ReceError(f"cannot read text encoder weights in '{folder}' ({exc}); the file is corrupt or incomplete") from None
    return mapped_model(cls, config, stored)


def mapped_model(cls, config, stored: dict[str, torch.Tensor]):
    """A transformers text encoder of `config` computing in float32 on the `stored` tensors (by checkpoint name) as
    they are, half-precision Linear weights cast where used; None when they do not fill the model."""
    from torch.nn.utils import parametrize

    with parameters_on_meta():
        model = cls(config)
        table = model.get_input_embeddings()
        # the token table may be tied to others (T5: `encoder.embed_tokens` is `shared`): one table at each path
        table_name = next(n for n, m in model.named_modules() if m is table)
        table_names = [table_name] + [
            t.removesuffix(".weight") for t, src in _ties(model).items() if src == f"{table_name}.weight"
        ]
        scale = getattr(table, "embed_scale", None)
        new_table = Float32Embedding(table.num_embeddings, table.embedding_dim, table.padding_idx, embed_scale=scale)
        for name in table_names:
            _replace_module(model, name, new_table)
    wanted = set(model.state_dict())
    kept = {f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, torch.nn.Linear)}
    kept |= {f"{n}.weight" for n in table_names}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in stored.items():
        name = _model_key(key, wanted)
        if name is not None:
            state[name] = tensor if name in kept or not tensor.is_floating_point() else tensor.float()
    buffers = {n for n, _ in model.named_buffers()}
    if wanted - buffers - set(state) - _tied_names(model, set(state)):
        return None
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype != torch.float32:
            parametrize.register_parametrization(module, "weight", Float32Cast(), unsafe=True)
    return model


def _ties(model: torch.nn.Module) -> dict[str, str]:
    """The model's tied weights, {tied name: the name it is stored under} (transformers' `_tied_weights_keys`)."""
    ties = getattr(model, "_tied_weights_keys", None)
    return dict(ties) if isinstance(ties, dict) else {}


def _tied_names(model: torch.nn.Module, loaded: set[str]) -> set[str]:
    """Weight names that are tied to a loaded one (a tied weight is stored once)."""
    return {tied for tied, source in _ties(model).items() if source in loaded}


def _replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _model_key(key: str, wanted: set[str]) -> str | None:
    """The model's name for a checkpoint key (checkpoints differ by a `text_model.` prefix); None if unused."""
    for name in (key, key.removeprefix("text_model."), "text_model." + key):
        if name in wanted:
            return name
    return None
