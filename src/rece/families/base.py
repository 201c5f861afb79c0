"""The model-family interface: everything rece must know about one kind of text-to-image pipeline.

A family says which text encoders a pipeline has and how a prompt becomes the embedding rows exactly as the
pipeline builds them, which linear layers of which component read those rows (the layers an erasure edits),
how its single-file checkpoints and kohya LoRAs name those layers, its title, and how its pipelines are run by
default (steps, guidance, sequence length). Adding a family is one module here plus tests; see docs/families.md.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import ReceError
from .ldm_names import kohya_name

MAX_SEQUENCE_LENGTH = 512  # the most T5 rows FluxPipeline and StableDiffusion3Pipeline take


def tokenize(tokenizer, texts: Sequence[str], max_length: int | None = None):
    """Token ids and attention mask of texts as the pipelines tokenize them: padded to the context (the tokenizer's,
    or the pipeline's `max_sequence_length`), truncated."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")


@dataclass(frozen=True)
class Family:
    """One kind of pipeline. Subclasses implement `encode_batch` (and `dim` when the rows join several encoders)."""

    name: str  # recorded in edit files and manifests
    title: str  # what messages and docs call it ("FLUX.1")
    pipelines: tuple[str, ...]  # diffusers pipeline class names
    text_parts: tuple[tuple[str, str], ...]  # (tokenizer, text encoder) component names, in the pipeline's order
    text_encoder_classes: tuple[str, ...]  # transformers classes rece can read for those text encoders
    tokenizer_class: str | tuple[str, ...] = "CLIPTokenizer"  # transformers class of the tokenizers (one, or one per part)
    denoiser: str = "unet"  # the component whose linear layers read the embedding
    edited: re.Pattern = re.compile(r"(^|\.)attn2\.to_[kv]\.weight$")  # weight names of those layers
    edited_title: str = "cross-attention (attn2.to_k/to_v)"  # those layers, as messages name them
    steps: int = 50  # sampling steps rece draws with unless told (generate, attacks, sweeps)
    guidance: float = 7.5  # guidance scale rece draws with unless told
    # T5 rows per prompt (the pipeline's `max_sequence_length`) the family is run with, the one rece draws with first;
    # T5 masks no padding, so its rows differ with the length, and an erasure covers each (empty: rows of one length)
    sequence_lengths: tuple[int, ...] = ()
    checkpoint_marker: str | None = None  # a key part only this family's original single-file checkpoints have
    original_names: tuple[tuple[str, str], ...] = ()  # (edited module, its name in the family's published single files)
    kohya_comfyui_only: bool = False  # its kohya LoRAs are read by ComfyUI, not by diffusers' load_lora_weights
    lora_hint: str = "load it with pipe.load_lora_weights"  # how a diffusers-format LoRA of this family is loaded
    pipeline_kwargs: dict = field(default_factory=dict)  # what rece passes when it builds the pipeline
    call_kwargs: dict = field(default_factory=dict)  # what rece passes to every pipeline call (fixed preprocessing)
    max_length: int | None = None  # rows the pipeline pads a prompt to (None: the tokenizer's context)
    masks_padding: bool = False  # the denoiser masks padding rows: only each text's attended rows count
    text_modules: tuple[str, ...] = ()  # denoiser modules the encoder's rows pass through before the edited layers
    end_rows: int = 1  # attended rows after a text's last word token (CLIP and T5: EOS; Gemma: none)
    whole_rows: bool = False  # UCE pairs every row (a pooled vector), not the rows from the last word on
    spaces: tuple[Family, ...] = ()  # several spaces read the prompt (MMDiT: token rows, pooled vector), one each
    by_components: bool = True  # also recognised by its components (SD/SDXL); transformer families by class only
    variant_of: str | None = None  # the family whose pipeline class it shares, told apart by `variant` (FLUX.1 schnell)
    # the text parts (indices into `text_parts`) whose vocabulary the gradient attacks' tokens and learned words live
    # in: their embedding lookups carry the attack's vectors, the other parts read the text as written (docs/attacks.md)
    attack_parts: tuple[int, ...] = (0,)
    # -- reading its single files without diffusers (`single_file`, `file_encoders`; encoders in `encoders.py`)
    file_encoders: tuple[tuple[str, ...], ...] = ()  # per text part, the published encoders (slots) that fill it
    optional_encoders: tuple[int, ...] = ()  # text parts a model may lack (SD3's T5, the SDXL refiner's CLIP-L)
    projected_parts: tuple[int, ...] = ()  # text parts read through CLIP's projection (CLIPTextModelWithProjection)
    tokenizer_repos: tuple[tuple[str, str], ...] = ()  # (first encoder's slot, hub repository with its tokenizers)

    def tokenizer_class_of(self, part: int) -> str:
        """The transformers tokenizer class of text part `part`."""
        return self.tokenizer_class if isinstance(self.tokenizer_class, str) else self.tokenizer_class[part]

    def tokenizer_repo(self, slots: Sequence[str]) -> str:
        """The reference hub repository whose tokenizer folders a single file of this family is read with, told by
        the encoders it holds (SD1's CLIP-L or SD2's OpenCLIP-H; the SDXL refiner's CLIP-G alone)."""
        repos = dict(self.tokenizer_repos)
        return next((repos[s] for s in slots if s in repos), self.tokenizer_repos[0][1])

    def denoiser_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The denoiser's diffusers state dict from its single file's tensors, where rece converts them itself; None:
        diffusers' single-file converter does."""
        return None

    def checkpoint_config(self, header: dict) -> dict:
        """What a single file says of its denoiser's config that rece reads (UNets: layers_per_block)."""
        return {}

    # -- the layers an erasure edits ----------------------------------------------------------
    def is_edited_weight(self, key: str) -> bool:
        """Whether a denoiser parameter name (`...attn2.to_k.weight`) is the weight of an edited layer."""
        return bool(self.edited.search(key))

    def edited_modules(self, denoiser: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The edited linear layers of a denoiser in memory, by module name, sorted."""
        return {n: m for n, m in sorted(denoiser.named_modules()) if self.is_edited_weight(n + ".weight")}

    def bind(self, kv: dict[str, torch.Tensor]) -> Family:
        """This family for one model, given the weights of its edited layers (SD3 without T5 reads their width)."""
        return self

    def variant(self, denoiser_config: dict) -> Family:
        """The family a model of this pipeline class really is, from its denoiser's config (FLUX: dev or schnell)."""
        return self

    def among(self, families: Sequence[Family]) -> bool:
        """Whether this family is one of `families` (a variant counts as the family it is a variant of)."""
        return any(f.name in (self.name, self.variant_of) for f in families)

    # -- how its pipelines are run -------------------------------------------------------------
    def takes_sequence_length(self) -> bool:
        """Whether its rows depend on the pipeline's `max_sequence_length` (unmasked T5 rows)."""
        return bool(self.sequence_lengths)

    def erase_lengths(self, requested: int | None = None) -> tuple[int, ...]:
        """The sequence lengths an erasure covers: `requested` alone, else every one the family is run with; () when
        its rows do not depend on one."""
        if not self.sequence_lengths:
            return ()
        if requested is not None and requested > MAX_SEQUENCE_LENGTH:
            raise ReceError(f"--max-sequence-length {requested}: the {self.title} pipeline takes at most {MAX_SEQUENCE_LENGTH}")
        return (requested,) if requested is not None else self.sequence_lengths

    def at_length(self, length: int | None) -> Family:
        """This family encoding and drawing at `length` T5 rows per prompt (itself when None or length-free)."""
        if length is None or not self.sequence_lengths:
            return self
        rows = length if self.max_length is not None else None
        spaces = tuple(s.at_length(length) for s in self.spaces)
        return replace(self, max_length=rows, sequence_lengths=(length,), spaces=spaces)

    def call_options(self, length: int | None = None) -> dict:
        """What rece passes to every pipeline call: the fixed options, and the sequence length it draws with (`length`,
        else the family's first)."""
        if not self.sequence_lengths:
            return dict(self.call_kwargs)
        return {**self.call_kwargs, "max_sequence_length": length or self.sequence_lengths[0]}

    # -- its layers in other tools' files ------------------------------------------------------
    def has_single_files(self) -> bool:
        """Whether the family has original single-file checkpoints rece can rewrite."""
        return bool(self.original_names)

    def original_keys(self, header: dict) -> dict[str, str]:
        """The key of each edited layer's weight in one of the family's single files (its table of names, bare or under
        a prefix such as ComfyUI's model.diffusion_model.), by diffusers module name; {} when the file lacks one."""
        keys = {}
        for name, original in self.original_names:
            found = [k for k in header if k == f"{original}.weight" or k.endswith(f".{original}.weight")]
            if len(found) != 1:
                return {}
            keys[name] = found[0]
        return keys

    def has_kohya_names(self) -> bool:
        """Whether kohya LoRAs of this family exist, so rece can name its layers in one."""
        return bool(self.original_names)

    def kohya_modules(self, layers: Sequence[str], denoiser_config: dict) -> dict[str, str]:
        """The kohya name (`lora_unet_…`) of each edited layer: here its single files' name, which is how ComfyUI
        addresses an MMDiT's modules (call only when `has_kohya_names`)."""
        table = dict(self.original_names)
        return {n: kohya_name(table[n]) for n in layers}

    # -- recognising a pipeline ----------------------------------------------------------------
    def matches_index(self, index: dict) -> bool:
        """Whether a model_index.json describes this family (its class, or its components)."""
        if index.get("_class_name") in self.pipelines:
            return True
        return self.by_components and self.denoiser in index and self.text_parts[-1][1] in index

    def matches_pipeline(self, pipe) -> bool:
        """Whether a pipeline object in memory is of this family."""
        if type(pipe).__name__ in self.pipelines:
            return True
        return self.by_components and hasattr(pipe, self.denoiser) and hasattr(pipe, self.text_parts[-1][1])

    # -- prompt encoding -----------------------------------------------------------------------
    def preprocess(self, text: str) -> str:
        """A prompt as the pipeline passes it to its tokenizer (PixArt and Sana lower-case and strip it)."""
        return text

    def attention_counts(self, tokenizers: Sequence, texts: Sequence[str]) -> list[int]:
        """Rows each text attends among its encoded rows (for masked families; all rows' mask ones otherwise)."""
        return tokenize(tokenizers[0], texts, self.max_length).attention_mask.sum(dim=1).tolist()

    def attended_ids(self, tokenizers: Sequence, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of the rows each text attends, in row order (its first tokenizer's; masked families)."""
        inputs = tokenize(tokenizers[0], texts, self.max_length)
        return [ids[mask.bool()].tolist() for ids, mask in zip(inputs.input_ids, inputs.attention_mask)]

    def text_projection(self, denoiser_config: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module | None:
        """The `text_modules` as one float32 module, from the denoiser's config and those modules' tensors."""
        return None

    def dim(self, encoders: Sequence) -> int:
        """Width of the embedding rows the edited layers read."""
        return encoders[0].config.hidden_size

    def encode_batch(self, tokenizers: Sequence, encoders: Sequence, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """Embedding rows [len(texts), L, dim] of texts exactly as the pipeline feeds them to the edited layers."""
        raise NotImplementedError

    # -- drawing from rows instead of prompts (the derived attack) -----------------------------
    def embeds_call(self, pipe, rows: list[torch.Tensor], attended: list[int], texts: list[str]) -> dict:
        """Pipeline arguments that draw from rows (one [n, L, d] tensor per space, as `encode_batch` gives them)
        instead of prompts; `attended` holds each row set's attended rows, `texts` the prompts they stand for."""
        denoiser = getattr(pipe, self.denoiser)
        return {"prompt_embeds": rows[0].to(denoiser.device, denoiser.dtype)}

    @contextlib.contextmanager
    def rows_as_input(self, pipe) -> Iterator[None]:
        """While drawing from rows, bypass the denoiser modules between the text encoder and the edited layers."""
        yield

    def extra_rows(self, pipe, texts: list[str]) -> list[torch.Tensor]:
        """Conditioning the denoiser reads besides the spaces rece edits, as [n, 1, d] float32 rows after them (SDXL's
        pooled vector; [] for most families): `extra_batch` by the pipeline's own tokenizers and encoders."""
        tokenizers = [getattr(pipe, t) for t, _ in self.text_parts]
        encoders = [getattr(pipe, e) for _, e in self.text_parts]
        with torch.no_grad():
            return [r.float() for r in self.extra_batch(tokenizers, encoders, texts, getattr(pipe, self.denoiser).device)]

    def extra_batch(self, tokenizers: Sequence, encoders: Sequence, texts: Sequence[str], device) -> list[torch.Tensor]:
        """`extra_rows` computed by the given tokenizers and encoders, as `encode_batch` computes rows (gradients flow
        when enabled): what the gradient attacks read with their own token vectors put in."""
        return []

    # -- the denoiser's training objective (the gradient attacks) ------------------------------
    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [n, c, h, w] as the denoiser takes them and `output_type="latent"` returns them (FLUX packs them)."""
        return latents

    def predict(self, pipe, noisy: torch.Tensor, timestep: torch.Tensor, rows: list[torch.Tensor], attended: list[int],
                guidance: float) -> torch.Tensor:  # fmt: skip
        """The denoiser's output at `noisy` and `timestep` (the scheduler's scale, [0, T)) conditioned on `rows` (as
        `embeds_call` takes them, `extra_rows` after them), as the pipeline's sampler reads it; gradients flow to rows."""
        unet = getattr(pipe, self.denoiser)
        return unet(noisy, timestep, encoder_hidden_states=rows[0].to(unet.dtype)).sample
