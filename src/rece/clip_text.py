"""CLIP's text encoder in plain torch, so that encoding prompts needs no transformers import (over a second).

`ClipText` computes what transformers' `CLIPTextModel` and `CLIPTextModelWithProjection` compute with their default
(sdpa) attention, operation for operation, in float32 on the tensors mapped from the folder's safetensors file:
half-precision weights are cast to float32 where they are used, as `text_encoders.mapped_text_encoder` does, so the
outputs equal transformers' bit for bit (tests/test_clip_text.py checks SD1's, SD2's and SDXL's configurations).
A folder this module does not recognise in every detail is left to transformers (`load_clip_text` returns None).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .errors import ReceError

CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# transformers' CLIPTextConfig defaults, for keys a config.json leaves out
CONFIG_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
# the activations of transformers' ACT2FN that CLIP text encoders use, as transformers computes them
ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}
LAYER_PARTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
)  # fmt: skip


@dataclass
class TextOutput:
    """A transformers model output as rece reads it: fields by name, or by position among those that are set."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    with_projection: bool = False

    def __getitem__(self, index: int) -> torch.Tensor:
        # the field order of transformers' BaseModelOutputWithPooling, or CLIPTextModelOutput with a projection
        if self.with_projection:
            values = (self.text_embeds, self.last_hidden_state, self.hidden_states)
        else:
            values = (self.last_hidden_state, self.pooler_output, self.hidden_states)
        return tuple(v for v in values if v is not None)[index]


def read_config(folder: Path, class_name: str) -> SimpleNamespace | None:
    """The text encoder's config (transformers' defaults filled in), or None when ClipText does not reproduce it."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("model_type", "clip_text_model") != "clip_text_model":
        return None  # e.g. a full CLIPConfig with a nested text_config
    if raw.get("architectures", [class_name]) != [class_name] or raw.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        return None
    if raw.get("_attn_implementation", "sdpa") not in (None, "sdpa") or raw.get("return_dict") is False:
        return None
    if any(raw.get(key) for key in ("tie_last_hidden_states", "output_hidden_states", "output_attentions")):
        return None  # settings that change what transformers returns
    config = SimpleNamespace(**{**CONFIG_DEFAULTS, **raw})
    if config.hidden_size % config.num_attention_heads:
        return None
    return config


def weight_names(config: SimpleNamespace, with_projection: bool) -> list[str]:
    """The tensors ClipText reads, by their names in CLIPTextModel's files (without the `text_model.` prefix)."""
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    for i in range(config.num_hidden_layers):
        for part in LAYER_PARTS:
            names += [f"encoder.layers.{i}.{part}.weight", f"encoder.layers.{i}.{part}.bias"]
    names += ["final_layer_norm.weight", "final_layer_norm.bias"]
    return names + (["text_projection.weight"] if with_projection else [])


def load_clip_text(folder: Path, class_name: str, files: list[str]) -> ClipText | None:
    """The CLIP text encoder of `folder` on its mapped safetensors `files`, or None when transformers must load it."""
    from safetensors import SafetensorError, safe_open

    config = read_config(folder, class_name) if class_name in CLASSES else None
    if config is None or not files:
        return None
    wanted = set(weight_names(config, class_name == "CLIPTextModelWithProjection"))
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = key.removeprefix("text_model.")
                    if name in wanted:
                        state[name] = f.get_tensor(key)
                    elif name != "embeddings.position_ids":
                        return None  # a tensor transformers would read and ClipText would not
    except (SafetensorError, OSError) as exc:
        raise ReceError(f"cannot read text encoder weights in '{folder}' ({exc}); the file is corrupt or incomplete") from None
    if set(state) != wanted:
        return None
    return ClipText(config, state, with_projection=class_name == "CLIPTextModelWithProjection")


def stored_precision(state: dict[str, torch.Tensor]) -> set[str]:
    """The Linear weights, kept in their stored precision and cast where used; every other tensor but the token table
    is made float32 once, as in `text_encoders.mapped_text_encoder`."""
    linear = ("_proj.weight", ".fc1.weight", ".fc2.weight", "text_projection.weight")
    return {name for name in state if name.endswith(linear)}


class ClipText(torch.nn.Module):
    """CLIPTextModel's (or CLIPTextModelWithProjection's) forward on float32 computations over stored weights."""

    def __init__(self, config: SimpleNamespace, state: dict[str, torch.Tensor], with_projection: bool):
        super().__init__()
        self.config = config
        self.with_projection = with_projection
        kept = stored_precision(state)
        table = state["embeddings.token_embedding.weight"]  # kept as stored and read row by row, as in transformers'
        self.token_embedding = torch.nn.Embedding(*table.shape, _weight=table, _freeze=True)
        for name, tensor in state.items():
            if tensor is table:
                continue
            value = tensor if name in kept or not tensor.is_floating_point() else tensor.float()
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(value, requires_grad=False))
        positions = torch.arange(config.max_position_embeddings).expand((1, -1))
        self.register_buffer("position_ids", positions, persistent=False)
        self.activation = ACTIVATIONS[config.hidden_act]

    @property
    def device(self) -> torch.device:
        return self.position_ids.device

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The token table (in its stored precision), as transformers models answer it."""
        return self.token_embedding

    def weight(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def linear(self, name: str, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """nn.Linear with its weight read as float32 (the exact cast of a half-precision weight)."""
        return F.linear(x, self.weight(f"{name}.weight").float(), self.weight(f"{name}.bias") if bias else None)

    def layer_norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        d = self.config.hidden_size
        return F.layer_norm(x, (d,), self.weight(f"{name}.weight"), self.weight(f"{name}.bias"), self.config.layer_norm_eps)

    def attention(self, i: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """CLIPAttention with transformers' sdpa_attention_forward (causal through `is_causal` when nothing is padded)."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        input_shape = x.shape[:-1]
        hidden_shape = (*input_shape, -1, head_dim)
        prefix = f"encoder.layers.{i}.self_attn"
        q = self.linear(f"{prefix}.q_proj", x).view(hidden_shape).transpose(1, 2)
        k = self.linear(f"{prefix}.k_proj", x).view(hidden_shape).transpose(1, 2)
        v = self.linear(f"{prefix}.v_proj", x).view(hidden_shape).transpose(1, 2)
        q_length = q.shape[2]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, scale=head_dim**-0.5, is_causal=q_length > 1 and mask is None
        )
        out = out.reshape(out.shape[0], -1, q_length, v.shape[-1]).transpose(1, 2).contiguous()
        return self.linear(f"{prefix}.out_proj", out.reshape(*input_shape, -1).contiguous())

    def layer(self, i: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """CLIPEncoderLayer: pre-norm attention and MLP, each added to its input."""
        prefix = f"encoder.layers.{i}"
        x = x + self.attention(i, self.layer_norm(f"{prefix}.layer_norm1", x), mask)
        h = self.linear(f"{prefix}.mlp.fc1", self.layer_norm(f"{prefix}.layer_norm2", x))
        return x + self.linear(f"{prefix}.mlp.fc2", self.activation(h))

    def causal_mask(self, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """transformers' create_causal_mask for sdpa: None when nothing is padded, else a [n, 1, L, L] boolean mask."""
        if attention_mask is None:
            return None
        padding = attention_mask.to(device=self.device, dtype=torch.bool)
        if padding.sum() == padding.numel():
            return None
        index = torch.arange(length, device=self.device)
        causal = index[None, None, None, :] <= index[None, None, :, None]
        return torch.ones((), dtype=torch.bool, device=self.device) & causal & padding[:, None, None, :]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False
    ) -> TextOutput:
        ids = input_ids.view(-1, input_ids.shape[-1])
        length = ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"{length} tokens; the text encoder reads at most {self.config.max_position_embeddings}")
        tokens = self.token_embedding(ids).float()
        x = tokens + F.embedding(self.position_ids[:, :length], self.weight("embeddings.position_embedding.weight"))
        mask = self.causal_mask(attention_mask, length)
        hidden = [x]
        for i in range(self.config.num_hidden_layers):
            x = self.layer(i, x, mask)
            hidden.append(x)
        last = self.layer_norm("final_layer_norm", x)
        rows = torch.arange(last.shape[0], device=last.device)
        if self.config.eos_token_id == 2:  # transformers' rule for configs from before the EOS id was fixed
            pooled = last[rows, ids.to(dtype=torch.int, device=last.device).argmax(dim=-1)]
        else:
            pooled = last[rows, (ids.to(dtype=torch.int, device=last.device) == self.config.eos_token_id).int().argmax(dim=-1)]
        states = tuple(hidden) if output_hidden_states else None
        if self.with_projection:
            embeds = self.linear("text_projection", pooled, bias=False)
            return TextOutput(last, text_embeds=embeds, hidden_states=states, with_projection=True)
        return TextOutput(last, pooler_output=pooled, hidden_states=states)
