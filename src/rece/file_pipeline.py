"""A full pipeline from single files, for `rece generate`: an all-in-one checkpoint, or ComfyUI's split files (the
denoiser, its text encoders with --text-encoder, its VAE with --vae).

The text encoders are read by rece's own file readers (`file_encoders`, the same as erasure's) and built as
transformers models in float32; the denoiser and the VAE are converted by diffusers' single-file loaders. What the
files cannot say (the denoiser's, VAE's and scheduler's configs, the tokenizers) comes from `--config DIR` (a
diffusers folder of the same model) or from the reference hub repository diffusers names for the file (cached);
offline and not cached, one line names what is missing and the option.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .console import quiet_loading
from .errors import ReceError
from .families import Family
from .families.encoders import spec_named
from .file_encoders import FoundEncoder, check_unscaled, clip_config, read_tensors, t5_config
from .hub import fetch_for, first_line, is_hub_id
from .safetensors_header import DTYPES, read_header
from .single_file import (
    assign_encoders,
    checkpoint_family,
    folder_config,
    model_encoders,
    read_checkpoint_header,
    tokenizer_root,
)
from .text_encoders import mapped_model, parameters_on_meta

# key prefixes of the parts of an all-in-one file that are not its denoiser
OTHER_PARTS = ("cond_stage_model.", "conditioner.", "text_encoders.", "first_stage_model.", "vae.", "model_ema.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
DENOISER_PREFIX = "model.diffusion_model."


def load_file_pipeline(path: Path, config: str | None = None, text_encoders: Sequence[str] = (), vae: str | None = None):
    """A float32 pipeline of the family of the single file `path`, with the text encoders inside it or given, and the
    VAE inside it or given (`vae`)."""
    import diffusers

    if path.suffix == ".gguf":
        raise ReceError(
            f"rece generate does not build pipelines from GGUF files ('{path}'); generate from the fp16/bf16 file, or "
            "load the erasure's LoRA (rece lora) in ComfyUI-GGUF"
        )
    header = read_checkpoint_header(path)
    family = checkpoint_family(path, header)
    found = model_encoders(path, header, text_encoders)
    placed = assign_encoders(family, found, str(path))
    vae_file, vae_header = vae_source(path, header, vae)
    root = config_root(path, header, family, config)
    tokens = tokenizer_root(family, [e.slot for e in placed.values()], list(placed), config, str(path))
    cls = getattr(diffusers, family.pipelines[0])
    parts = {name: None for pair in family.text_parts for name in pair}
    with quiet_loading():
        for part, encoder in placed.items():
            tokenizer_name, encoder_name = family.text_parts[part]
            parts[tokenizer_name] = pipeline_tokenizer(tokens / tokenizer_name, family.tokenizer_class_of(part))
            parts[encoder_name] = pipeline_encoder(family, part, encoder, parts[tokenizer_name], tokens)
        denoiser_cls = cls._get_signature_types()[family.denoiser][0]
        denoiser = converted(denoiser_cls, path, denoiser_tensors(path, header), root, family.denoiser, family,
                             **family.checkpoint_config(header))  # fmt: skip
        decoder = converted(diffusers.AutoencoderKL, vae_file, vae_tensors(vae_file, vae_header), root, "vae", family)
        scheduler = read_scheduler(root)
    return cls(**parts, **{family.denoiser: denoiser, "vae": decoder, "scheduler": scheduler},
               **pipeline_settings(cls, root, family, parts))  # fmt: skip


def vae_source(path: Path, header: dict, vae: str | None) -> tuple[Path, dict]:
    """The file holding the VAE and its header: --vae's file, else the checkpoint when it holds one; one line when
    neither does."""
    if vae is None:
        if any(k.startswith(VAE_PREFIXES) for k in header):
            return path, header
        raise ReceError(
            f"'{path}' holds no VAE, which rece generate needs to decode images; pass the model's VAE file "
            "(ComfyUI's models/vae, e.g. ae.safetensors for FLUX.1) with --vae FILE"
        )
    file = Path(vae).expanduser()
    if not file.is_file() or file.suffix != ".safetensors":
        raise ReceError(f"--vae '{vae}' is not a .safetensors file; pass the model's VAE file")
    vae_header = read_header(file)[0]
    if not any(k.startswith(("encoder.", "decoder.", *VAE_PREFIXES)) for k in vae_header):
        raise ReceError(f"--vae '{vae}' holds no VAE (no encoder.* / decoder.* tensors); pass the model's VAE file")
    return file, vae_header


def config_root(path: Path, header: dict, family: Family, config: str | None) -> Path:
    """The folder with the denoiser's, VAE's and scheduler's configs: --config's, else the reference repository
    diffusers names for the file, fetched once (configs only)."""
    wanted = [f"{family.denoiser}/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    if config is not None and Path(config).expanduser().is_dir():
        root, repo = Path(config).expanduser(), None
    else:
        repo = str(config) if config is not None and is_hub_id(str(config)) else reference_repo(path, header)
        needs = f"the {family.title} configs ({', '.join(wanted)} of {repo})"
        root = fetch_for(
            path, repo, ["model_index.json", *wanted], needs, "pass a diffusers folder of the same model with --config DIR"
        )
    absent = [w for w in wanted if not (root / w).is_file()]
    if absent:
        where = f"{repo}'s snapshot" if repo else f"'{root}'"
        raise ReceError(
            f"{where} has no {absent[0]}, which rece generate needs for '{path}'; pass a diffusers folder of the same "
            "model with --config DIR"
        )
    return root


def reference_repo(path: Path, header: dict) -> str:
    """The hub repository whose configs diffusers reads a single file with (told by its keys and shapes)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    shapes = {k: torch.empty(v["shape"], device="meta") for k, v in header.items() if isinstance(v, dict) and "shape" in v}
    try:
        return fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    except Exception as exc:  # a layout diffusers does not recognise
        raise ReceError(
            f"diffusers does not recognise '{path}' ({first_line(exc)}); pass a diffusers folder of the same model "
            "with --config DIR"
        ) from None


def read_tensors_float32(path: Path, header: dict, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a safetensors file in float32 (float8 and half precision upcast exactly)."""
    from safetensors import SafetensorError, safe_open

    check_unscaled(keys, str(path))
    unknown = [k for k in keys if header[k]["dtype"] not in DTYPES]
    if unknown:
        raise ReceError(f"'{path}' stores {unknown[0]} as {header[unknown[0]]['dtype']}, a dtype rece does not read")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).to(torch.float32) for k in keys}
    except (SafetensorError, OSError) as exc:
        raise ReceError(f"cannot read '{path}' ({exc}); the file is corrupt or incomplete, re-download it") from None


def denoiser_tensors(path: Path, header: dict) -> dict[str, torch.Tensor]:
    """The denoiser's tensors of a single file under their names there: those under model.diffusion_model. (an
    all-in-one file), else every tensor that is not another part's (a denoiser-only file)."""
    keys = [k for k in header if k != "__metadata__"]
    inside = [k for k in keys if k.startswith(DENOISER_PREFIX)]
    return read_tensors_float32(path, header, inside or [k for k in keys if not k.startswith(OTHER_PARTS)])


def vae_tensors(path: Path, header: dict) -> dict[str, torch.Tensor]:
    """The VAE's tensors of a file, under their prefix when it is an all-in-one one (diffusers reads both)."""
    keys = [k for k in header if k != "__metadata__"]
    inside = [k for k in keys if k.startswith(VAE_PREFIXES)]
    return read_tensors_float32(path, header, inside or keys)


def converted(cls, path: Path, tensors: dict[str, torch.Tensor], root: Path, sub: str, family: Family, **settings):
    """A diffusers model of `cls` from original-layout tensors, its config `root/sub` (with `settings` the file says):
    converted by the family (`Family.denoiser_state`) or by diffusers' single-file loader."""
    try:
        own = family.denoiser_state(tensors) if sub == family.denoiser else None
        if own is None:
            model = cls.from_single_file(tensors, config=str(root), subfolder=sub, torch_dtype=torch.float32, **settings)
        else:  # built without weights (a FLUX.1 transformer's float32 copy is 48 GB), then given the file's
            with parameters_on_meta():
                model = cls.from_config({**cls.load_config(root, subfolder=sub), **settings})
            model.load_state_dict(own, strict=True, assign=True)
    except Exception as exc:  # shapes of another model, missing tensors
        raise ReceError(
            f"cannot build the {family.title} {sub} from '{path}' ({first_line(exc)}); the file is not the model whose "
            f"configs are in '{root}': pass a diffusers folder of the same model with --config DIR"
        ) from None
    return model.eval()


def read_scheduler(root: Path):
    """The scheduler of a config folder (its scheduler_config.json's class)."""
    import diffusers

    name = json.loads((root / "scheduler" / "scheduler_config.json").read_text()).get("_class_name", "")
    if not hasattr(diffusers, name):
        raise ReceError(f"'{root}/scheduler' names scheduler '{name}', which diffusers does not have")
    return getattr(diffusers, name).from_pretrained(root, subfolder="scheduler")


def pipeline_tokenizer(folder: Path, class_name: str):
    """transformers' tokenizer of a tokenizer folder (a pipeline calls it with every option transformers takes)."""
    import transformers

    try:
        return getattr(transformers, class_name).from_pretrained(folder)
    except Exception as exc:
        raise ReceError(f"cannot read the tokenizer in '{folder}' ({first_line(exc)}); pass complete tokenizer folders") from None


def pipeline_encoder(family: Family, part: int, encoder: FoundEncoder, tokenizer, root: Path):
    """A transformers text encoder in float32 on a file's encoder tensors, its config read from the file's shapes (or
    from `root`'s config.json of that part, when there is one)."""
    import transformers

    folder = root / family.text_parts[part][1]
    if encoder.kind == "t5":
        cls = transformers.T5EncoderModel
        config = cls.config_class.from_pretrained(folder) if (folder / "config.json").is_file() else t5_config(encoder)
    else:
        projected = part in family.projected_parts
        cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        settings = clip_config(encoder, spec_named(encoder.slot), eos, folder_config(root, family, part, projected))
        config = transformers.CLIPTextConfig(**vars(settings))
        if projected and "text_projection.weight" not in encoder.names:
            raise ReceError(f"{encoder.describe()} has no text_projection, which {family.title} reads; pass the file made for it")
    model = mapped_model(cls, config, {n: t.float() for n, t in read_tensors(encoder).items()})
    if model is None:
        raise ReceError(f"{encoder.describe()}: its tensors do not fill the {family.title} text encoder; the file is incomplete")
    return model.eval()


def pipeline_settings(cls, root: Path, family: Family, parts: dict) -> dict:
    """The pipeline's other arguments: its optional components left out, the reference folder's settings
    (model_index.json's, e.g. SDXL's force_zeros_for_empty_prompt) and the family's own."""
    expected, optional = cls._get_signature_keys(cls)
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    settings = {k: v for k, v in index.items() if k in optional and not isinstance(v, list)}
    taken = {*parts, family.denoiser, "vae", "scheduler"}
    return {**{k: None for k in expected if k not in taken}, **settings, **family.pipeline_kwargs}
