"""PixArt-α / Σ: a T5 text encoder whose rows, through the transformer's `caption_projection`, every cross-attention
`attn2.to_k` / `attn2.to_v` reads; the padding rows are masked (the transformer's `encoder_attention_mask`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .base import Family, tokenize


class CaptionProjection(torch.nn.Module):
    """PixArt's `caption_projection` (diffusers' PixArtAlphaTextProjection): linear, tanh-GELU, linear, row by row."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_features, hidden_size)
        self.act_1 = torch.nn.GELU(approximate="tanh")
        self.linear_2 = torch.nn.Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


def submodule_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The float32 state dict of the denoiser submodule `prefix` among `tensors` (read from the denoiser's files)."""
    return {k.removeprefix(prefix + "."): v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}


def attended_mask(length: int, attended: list[int]) -> torch.Tensor:
    """The transformer's `encoder_attention_mask` [n, length]: 1 on each row set's first `attended[i]` rows."""
    return (torch.arange(length)[None] < torch.tensor(attended)[:, None]).long()


class PixArt(Family):
    def preprocess(self, text: str) -> str:
        return text.lower().strip()  # the pipeline's _text_preprocessing with clean_caption=False

    def text_projection(self, denoiser_config: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The transformer's caption projection, built from its config and its `caption_projection.*` tensors."""
        inner = denoiser_config["num_attention_heads"] * denoiser_config["attention_head_dim"]
        module = CaptionProjection(denoiser_config["caption_channels"], inner)
        module.load_state_dict(submodule_state(tensors, "caption_projection"))
        return module.eval()

    def negative_rows(self, pipe, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected rows and mask of the pipeline's own negative prompt "" (what its __call__ uses)."""
        with torch.no_grad():
            out = pipe.encode_prompt([""] * n, do_classifier_free_guidance=True, negative_prompt="", **self.prompt_options())
            rows = out[2]
            for name in self.text_modules:
                rows = getattr(pipe.transformer, name)(rows)
        return rows, out[3]

    def prompt_options(self) -> dict:
        """What the pipeline's __call__ passes to encode_prompt besides the prompts."""
        return {"clean_caption": False, "max_sequence_length": self.max_length}

    def embeds_call(self, pipe, rows, attended, texts) -> dict:
        n, length = rows[0].shape[:2]
        mask = attended_mask(length, attended).to(pipe.transformer.device)
        negative, negative_mask = self.negative_rows(pipe, n)
        call = {
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask,
            "negative_prompt": None,  # the pipeline's default "" would be encoded again beside the rows given
        }
        return {**super().embeds_call(pipe, rows, attended, texts), **call}

    @contextlib.contextmanager
    def rows_as_input(self, pipe) -> Iterator[None]:
        saved = {name: getattr(pipe.transformer, name) for name in self.text_modules}
        for name in saved:  # the rows already are what these modules output
            setattr(pipe.transformer, name, torch.nn.Identity())
        try:
            yield
        finally:
            for name, module in saved.items():
                setattr(pipe.transformer, name, module)

    def denoiser_options(self, pipe, noisy: torch.Tensor) -> dict:
        """PixArt's micro-conditions: the image's size and aspect ratio for the 1024-pixel α models (sample size 128),
        none otherwise (as the pipelines pass them)."""
        if not getattr(pipe.transformer, "use_additional_conditions", False):
            return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        n, size = noisy.shape[0], noisy.shape[-1] * pipe.vae_scale_factor
        resolution = torch.tensor([[size, size]], dtype=noisy.dtype, device=noisy.device).expand(n, -1)
        return {"added_cond_kwargs": {"resolution": resolution, "aspect_ratio": torch.ones(n, 1, device=noisy.device)}}

    def predict(self, pipe, noisy, timestep, rows, attended, guidance) -> torch.Tensor:
        """The transformer on rows past its caption modules, padding masked; of a learned-sigma output (2c channels)
        the first c, the noise prediction the sampler reads."""
        transformer = pipe.transformer
        length = rows[0].shape[1]
        mask = attended_mask(length, attended).to(noisy.device)
        scale = getattr(transformer.config, "timestep_scale", None) or 1.0
        with self.rows_as_input(pipe):
            out = transformer(noisy, encoder_hidden_states=rows[0].to(transformer.dtype), encoder_attention_mask=mask,
                              timestep=timestep * scale, **self.denoiser_options(pipe, noisy)).sample  # fmt: skip
        channels = noisy.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def encoder_inputs(self, tokenizers: Sequence, texts: Sequence[str]):
        """Token ids and attention mask of (preprocessed) texts as the pipeline gives them to its text encoder."""
        return tokenize(tokenizers[0], texts, self.max_length)

    def encode_batch(self, tokenizers, encoders, texts: Sequence[str], device) -> torch.Tensor:
        inputs = self.encoder_inputs(tokenizers, texts)
        mask = inputs.attention_mask.to(device)
        return encoders[0](inputs.input_ids.to(device), attention_mask=mask)[0]


_PIXART = dict(
    text_parts=(("tokenizer", "text_encoder"),),
    text_encoder_classes=("T5EncoderModel",),
    tokenizer_class="T5Tokenizer",
    denoiser="transformer",
    by_components=False,  # its components (transformer, T5) are FLUX's too
    steps=20,
    guidance=4.5,
    masks_padding=True,
    text_modules=("caption_projection",),
    call_kwargs={"clean_caption": False, "use_resolution_binning": False},
    lora_hint="PixArt pipelines have no load_lora_weights: load it with peft (inject_adapter_in_model, docs/families.md)",
)
PIXART_SIGMA = PixArt(name="pixart-sigma", title="PixArt-Σ", pipelines=("PixArtSigmaPipeline",), max_length=300, **_PIXART)
PIXART_ALPHA = PixArt(name="pixart-alpha", title="PixArt-α", pipelines=("PixArtAlphaPipeline",), max_length=120, **_PIXART)
