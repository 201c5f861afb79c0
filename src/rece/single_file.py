"""What an erasure reads from single files, without diffusers: the family, the edited layers' weights, the text
encoders (inside the checkpoint, or ComfyUI's split files given with --text-encoder) and their tokenizers.

A1111 / Forge / ComfyUI checkpoints (SD1.x, SD2.x, SDXL base and refiner), Black Forest Labs' and ComfyUI's FLUX.1
files and Stability's / ComfyUI's SD3 files hold every tensor an erasure needs but the tokenizers; widths and depths
are read from the file's shapes, the rest from the family's record of its published encoders (`families.encoders`).
The tokenizers come from `--config DIR` (its `tokenizer*/` folders; nothing else is needed there) or from the
family's reference hub repository (a few MB, cached once).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ReceError
from .families import Family, family_of_keys, titles_where
from .families.encoders import spec_named
from .file_encoders import (
    FoundEncoder,
    build_clip,
    build_t5,
    check_unscaled,
    clip_config,
    encoder_in_file,
    encoders_in_checkpoint,
)
from .gguf_file import gguf_tensors, gguf_weights
from .hub import fetch_for, is_hub_id, snapshot
from .safetensors_header import DTYPES, read_header
from .tokenizer_cache import load_tokenizer


def read_checkpoint_header(path: Path) -> dict:
    """A single file's tensor entries by name: its safetensors header, or a GGUF file's tensors (`gguf_file`)."""
    if path.suffix == ".gguf":
        return gguf_tensors(path)[0]
    return read_header(path)[0]


def checkpoint_family(path: Path, header: dict) -> Family:
    """The family of a single file, its variant told by what the file says of its denoiser (FLUX: schnell)."""
    family = family_of_keys(header)
    return family.variant(family.checkpoint_config(header))


def checkpoint_kv(path: Path, header: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The edited layers' weights of a single-file checkpoint, by diffusers module name, in float32 (float8 and half
    precision upcast exactly), and each one's key in the file; only those tensors are read."""
    from safetensors import SafetensorError, safe_open

    header = header if header is not None else read_checkpoint_header(path)
    family = family_of_keys(header)
    if not family.has_single_files():
        families = titles_where("has_single_files")
        raise ReceError(f"rece rewrites single-file checkpoints of {families} only; '{path}' is {family.title}")
    try:
        keys = family.original_keys(header)
    except ReceError as exc:  # the family's own reading of the layout names no file
        raise ReceError(f"'{path}': {exc}") from None
    if not keys:
        raise ReceError(f"'{path}' lacks the {family.edited_title} layers of a {family.title} checkpoint; it is not one")
    check_unscaled([k for n in keys.values() for k in header if k.startswith(n.removesuffix(".weight") + ".")], str(path))
    if path.suffix == ".gguf":
        return gguf_weights(path, header, keys), keys
    unknown = [k for k in keys.values() if header[k]["dtype"] not in DTYPES]
    if unknown:
        raise ReceError(f"'{path}' stores {unknown[0]} as {header[unknown[0]]['dtype']}, a dtype rece does not read")
    try:
        with safe_open(str(path), framework="pt") as f:
            kv = {n: f.get_tensor(k).to(torch.float32) for n, k in sorted(keys.items())}
    except (SafetensorError, OSError) as exc:
        raise ReceError(f"cannot read '{path}' ({exc}); the file is corrupt or incomplete, re-download it") from None
    return kv, keys


def model_encoders(path: Path, header: dict, files: Sequence[str]) -> list[FoundEncoder]:
    """The text encoders inside a checkpoint and in the --text-encoder files given with it."""
    inside = encoders_in_checkpoint(path, header)
    for encoder in inside:
        check_unscaled([k for k, _ in encoder.names.values()], str(path))
    return inside + given_encoders(files)


def given_encoders(files: Sequence[str]) -> list[FoundEncoder]:
    """The text encoders of --text-encoder files, each recognised from its keys and shapes."""
    found = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ReceError(f"--text-encoder '{name}' does not exist; pass a text encoder .safetensors file")
        if path.suffix != ".safetensors":
            raise ReceError(f"--text-encoder '{name}' is not a .safetensors file; rece reads text encoders as safetensors")
        encoder = encoder_in_file(path, read_header(path)[0])
        check_unscaled(encoder, str(path))
        found.append(encoder)
    return found


def _needs(family: Family, parts: Sequence[int]) -> str:
    """The encoders a family's text parts take, for messages ("CLIP-L (clip_l.safetensors) and T5-XXL (...)")."""
    return " and ".join(
        " or ".join(f"{spec_named(s).title} ({spec_named(s).file_name})" for s in family.file_encoders[i]) for i in parts
    )


def _place_unknown(family: Family, found: list[FoundEncoder]) -> None:
    """Give the CLIPs whose depth does not tell which they are the family's CLIP slots left free, narrowest first
    (CLIP-L is narrower than CLIP-G)."""
    taken = {e.slot for e in found if e.slot}
    free = [s[0] for s in family.file_encoders if spec_named(s[0]).kind == "clip" and not taken & set(s)]
    unknown = sorted((e for e in found if e.slot is None), key=lambda e: e.width)
    clip_parts = [s[0] for s in family.file_encoders if spec_named(s[0]).kind == "clip"]
    for i, encoder in enumerate(unknown):  # one CLIP more than the family reads: the last one's twin, refused as such
        encoder.slot = free[i] if i < len(free) else (free or clip_parts or [None])[-1]


def assign_encoders(family: Family, found: list[FoundEncoder], source: str) -> dict[int, FoundEncoder]:
    """Which encoder fills which of the family's text parts; one line for an encoder of another family, one given
    twice, or a part the family needs left empty."""
    _place_unknown(family, found)
    placed: dict[int, FoundEncoder] = {}
    for encoder in found:
        parts = [i for i, slots in enumerate(family.file_encoders) if encoder.slot in slots]
        if not parts:
            needs = _needs(family, range(len(family.file_encoders)))
            raise ReceError(f"{encoder.describe()} is not a text encoder of {family.title}, which reads {needs}")
        if parts[0] in placed:
            other = placed[parts[0]]
            raise ReceError(
                f"two {encoder.title} text encoders: {other.describe()} and {encoder.describe()}; pass each encoder once"
            )
        placed[parts[0]] = encoder
    missing = [i for i in range(len(family.file_encoders)) if i not in placed and i not in family.optional_encoders]
    if missing:
        raise ReceError(
            f"'{source}' has no {_needs(family, missing)} text encoder, which {family.title} needs; pass the file with "
            "--text-encoder FILE"
        )
    return dict(sorted(placed.items()))


def tokenizer_root(family: Family, slots: Sequence[str], parts: Sequence[int], config: str | None, source: str) -> Path:
    """The folder holding the tokenizer folders of `parts`: --config's, else the family's reference repository's
    (fetched once, a few MB); offline and not cached, one line naming what is missing and the option."""
    subs = [family.text_parts[i][0] for i in parts]
    if config is not None and Path(config).expanduser().is_dir():
        root = Path(config).expanduser()
    elif config is not None and is_hub_id(str(config)):
        root = snapshot(str(config), [f"{s}/*" for s in subs])
    else:
        repo = family.tokenizer_repo(slots)
        needs = f"the {family.title} tokenizers ({', '.join(s + '/' for s in subs)} of {repo})"
        root = fetch_for(source, repo, [f"{s}/*" for s in subs], needs, "pass a folder holding them with --config DIR")
    absent = [s for s in subs if not (root / s).is_dir()]
    if absent:
        raise ReceError(
            f"'{root}' has no {absent[0]}/ folder, which the {family.title} text encoders need; add it or pass another --config"
        )
    return root


def folder_config(root: Path, family: Family, part: int, projected: bool):
    """A --config folder's text encoder config.json for a text part, when it has one (ClipText's reading of it)."""
    from .clip_text import read_config

    folder = root / family.text_parts[part][1]
    if not (folder / "config.json").is_file():
        return None
    return read_config(folder, "CLIPTextModelWithProjection" if projected else "CLIPTextModel")


def eos_id(tokenizer) -> int:
    """The id of CLIP's end-of-text token in a tokenizer (transformers' or rece's cached one)."""
    backend = getattr(tokenizer, "backend", None) or tokenizer.backend_tokenizer
    return backend.token_to_id("<|endoftext|>")


def text_parts(family: Family, found: list[FoundEncoder], config: str | None, source: str, device) -> tuple[list, list]:
    """The tokenizers and float32 text encoders of the family's parts the files fill, in the family's order."""
    placed = assign_encoders(family, found, source)
    root = tokenizer_root(family, [e.slot for e in placed.values()], list(placed), config, source)
    tokenizers, encoders = [], []
    for part, encoder in placed.items():
        tokenizer = load_tokenizer(root / family.text_parts[part][0], family.tokenizer_class_of(part))
        if encoder.kind == "t5":
            model = build_t5(encoder)
        else:
            projected = part in family.projected_parts
            spec = spec_named(encoder.slot)
            settings = clip_config(encoder, spec, eos_id(tokenizer), folder_config(root, family, part, projected))
            model = build_clip(encoder, settings, projected, family.title)
        tokenizers.append(tokenizer)
        encoders.append(model.to(device).eval())
    return tokenizers, encoders


def missing_parts(family: Family, found: list[FoundEncoder]) -> str:
    """The optional encoders a model was read without, for the message when its widths then do not match."""
    slots = {e.slot for e in found}
    absent = [i for i in family.optional_encoders if not slots & set(family.file_encoders[i])]
    return _needs(family, absent) if absent else ""
