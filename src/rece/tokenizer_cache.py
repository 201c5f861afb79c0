"""CLIP tokenizers without importing transformers (over a second): the tokenizer cache.

The first time a tokenizer folder is read, transformers loads it as the pipelines do and its `tokenizers` backend
(normaliser, pre-tokeniser, vocabulary, merges, special and added tokens, post-processor) is written as JSON to
$RECE_CACHE/tokenizers/KEY.json, with the settings transformers pads and truncates with. KEY is a checksum of the
folder's files and of the transformers and tokenizers versions, so a changed folder or library makes a new entry.
Later reads build the backend with the `tokenizers` library alone. `CachedTokenizer` answers the calls rece makes
(`tokenizer(texts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")`, `tokenizer(text)`)
exactly as transformers' tokenizer does (tests/test_clip_text.py). A cache that cannot be read is rebuilt; one that
cannot be written is skipped. The cache holds JSON only: reading it runs no code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ReceError
from .hub import cache_root
from .io import atomic_file

CACHED_CLASSES = ("CLIPTokenizer",)  # the tokenizers of the text encoders rece computes in plain torch (clip_text)
FORMAT = 1
SETTINGS = ("model_max_length", "pad_token", "pad_token_id", "pad_token_type_id", "padding_side", "truncation_side")


@dataclass
class Encoding:
    """Token ids and attention mask of a text (lists) or of texts (lists of lists, or tensors)."""

    input_ids: Any
    attention_mask: Any


class CachedTokenizer:
    """A transformers tokenizer's `tokenizers` backend and the settings its __call__ pads and truncates with."""

    def __init__(self, state: dict):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(state["backend"])
        self.backend.encode_special_tokens = state["split_special_tokens"]
        for name in SETTINGS:
            setattr(self, name, state[name])

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = None,
    ) -> Encoding:
        """transformers' `tokenizer(...)` for these arguments: ids with BOS and EOS, truncated to `max_length` (else
        the model's) with `truncation`, padded to it with padding="max_length"."""
        if padding not in (False, "max_length") or truncation not in (False, True) or return_tensors not in (None, "pt"):
            raise ValueError(f"CachedTokenizer pads to max_length only, got padding={padding!r}, truncation={truncation!r}")
        length = max_length or self.model_max_length
        if truncation:
            self.backend.enable_truncation(length, stride=0, strategy="longest_first", direction=self.truncation_side)
        else:
            self.backend.no_truncation()
        if padding:
            self.backend.enable_padding(
                direction=self.padding_side, pad_id=self.pad_token_id, pad_type_id=self.pad_token_type_id,
                pad_token=self.pad_token, length=length,
            )  # fmt: skip
        else:
            self.backend.no_padding()
        batched = not isinstance(text, str)
        encodings = self.backend.encode_batch(list(text) if batched else [text], add_special_tokens=True)
        ids, mask = [e.ids for e in encodings], [e.attention_mask for e in encodings]
        if return_tensors == "pt":
            import torch

            return Encoding(torch.tensor(ids), torch.tensor(mask))
        return Encoding(ids, mask) if batched else Encoding(ids[0], mask[0])


def cache_key(folder: Path, class_name: str) -> str:
    """Checksum of everything the loaded tokenizer depends on: its files, its class and the libraries' versions."""
    from importlib.metadata import version

    h = hashlib.sha256(f"{FORMAT} {class_name} {version('transformers')} {version('tokenizers')}".encode())
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:32]


def backend_state(tokenizer) -> dict:
    """What a CachedTokenizer is built from, taken from a transformers tokenizer."""
    state = {name: getattr(tokenizer, name) for name in SETTINGS}
    state.update(backend=tokenizer.backend_tokenizer.to_str(), split_special_tokens=bool(tokenizer.split_special_tokens))
    return state


def read_state(path: Path) -> dict | None:
    """A cached state, or None when it is missing or damaged."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    needed = (*SETTINGS, "backend", "split_special_tokens")
    return state if isinstance(state, dict) and all(k in state for k in needed) else None


def load_tokenizer(folder: str | os.PathLike, class_name: str):
    """The tokenizer of a pipeline's tokenizer folder: a CachedTokenizer for the CLIP tokenizers, else transformers'."""
    folder = Path(folder)
    if class_name not in CACHED_CLASSES or not folder.is_dir():
        return transformers_tokenizer(folder, class_name)
    path = cache_root() / "tokenizers" / f"{cache_key(folder, class_name)}.json"
    state = read_state(path)
    if state is not None:
        try:
            return CachedTokenizer(state)
        except Exception:  # tokenizers raises a bare Exception on a backend it cannot read: rebuilt below
            pass
    state = backend_state(transformers_tokenizer(folder, class_name))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(state), encoding="utf-8")
    except (OSError, ReceError):
        pass
    return CachedTokenizer(state)


def transformers_tokenizer(folder: Path, class_name: str):
    """The tokenizer as the pipelines load it (imports transformers)."""
    import transformers

    return getattr(transformers, class_name).from_pretrained(folder, local_files_only=True)
