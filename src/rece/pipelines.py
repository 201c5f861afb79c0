"""Pipelines in memory: loading a full diffusers pipeline for MODEL, its device and scheduler, and seeded sampling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .console import quiet_loading
from .errors import ReceError
from .families import FAMILIES, family_of_checkpoint, family_of_index, family_of_pipeline, is_refiner_checkpoint
from .hub import first_line, snapshot
from .sources import check_components, model_path_record, read_model_index, resolve_model
from .weights import kv_fingerprint

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",  # the RECE/UCE evaluation scripts' sampler; needs scipy
}
PIPELINES = tuple(name for family in FAMILIES for name in family.pipelines)


def load_single_file_pipeline(path: Path, config: str | None = None):
    """A float32 pipeline from an original-format (LDM/SGM) checkpoint, via diffusers' single-file loader.

    Offline, `config` must name a local diffusers folder of the same architecture for the component configs.
    """
    import diffusers

    refuse_refiner(path)
    try:
        family = family_of_checkpoint(path)
        kwargs = {"config": str(config)} if config else {}
        cls = getattr(diffusers, family.pipelines[0])
        with quiet_loading():
            return cls.from_single_file(str(path), dtype=torch.float32, **kwargs, **family.pipeline_kwargs)
    except ReceError:
        raise
    except Exception as exc:
        hint = (
            "check that it is a Stable Diffusion checkpoint of the same architecture as --config"
            if config
            else "offline, pass --config with a local diffusers folder of the same architecture"
        )
        raise ReceError(f"cannot load checkpoint '{path}' ({first_line(exc)}); {hint}") from None


def refuse_refiner(path: Path) -> None:
    """diffusers' StableDiffusionXLPipeline cannot be built from a refiner's single file (it has no CLIP-L)."""
    if is_refiner_checkpoint(path):
        raise ReceError(
            f"'{path}' is an SDXL refiner checkpoint, which rece does not build a pipeline from as one file; pass the "
            "refiner's diffusers folder (stabilityai/stable-diffusion-xl-refiner-1.0, or a local copy) as MODEL"
        )


def load_pipeline(model, config: str | None = None, text_encoders: Sequence[str] = (), vae: str | None = None):
    """A full pipeline of a family rece knows (float32, no safety checker) for MODEL; a pipeline object is used as is.
    A safetensors single file is built with its text encoders (inside it, or `text_encoders` files) and its VAE
    (inside it, or the `vae` file) by `file_pipeline`."""
    import diffusers

    source = resolve_model(model)
    if (text_encoders or vae) and source.kind != "single-file":
        flag = "--text-encoder" if text_encoders else "--vae"
        raise ReceError(f"{flag} goes with a single-file checkpoint; '{source.name}' brings its own parts")
    if source.kind == "pipeline":
        pipe = model
    elif source.kind == "single-file" and source.path.suffix in (".safetensors", ".gguf"):
        from .file_pipeline import load_file_pipeline
        from .single_file import read_checkpoint_header

        read_checkpoint_header(source.path)  # a damaged file: one line before anything reads it
        refuse_refiner(source.path)
        pipe = load_file_pipeline(source.path, config, text_encoders, vae)
    elif source.kind == "single-file":
        if text_encoders or vae:
            raise ReceError(f"--text-encoder and --vae go with .safetensors checkpoints; '{source.path}' is not one")
        pipe = load_single_file_pipeline(source.path, config)
    else:
        folder = snapshot(source.name) if source.kind == "hub" else source.path
        index = read_model_index(folder)
        if index.get("_class_name") not in PIPELINES:
            raise ReceError(f"'{model}' is a {index.get('_class_name')}; rece generate runs {' and '.join(PIPELINES)} folders")
        family = family_of_index(index, str(model))
        check_components(folder, index)
        # components the folder leaves out ([null, null]) are passed as None: diffusers requires some (SD3's T5)
        absent = {name: None for name, entry in index.items() if entry == [None, None]}
        try:
            with quiet_loading():
                pipe = diffusers.DiffusionPipeline.from_pretrained(
                    folder, dtype=torch.float32, **{**absent, **family.pipeline_kwargs}
                )
        except Exception as exc:  # missing components, damaged files
            raise ReceError(
                f"cannot load pipeline '{model}' ({first_line(exc)}); the pipeline folder is incomplete; re-download it"
            ) from None
    if type(pipe).__name__ not in PIPELINES:
        raise ReceError(f"'{type(pipe).__name__}' is not supported; rece generate runs {' and '.join(PIPELINES)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe) -> torch.nn.Module:
    """The component of a pipeline whose layers an erasure edits (the UNet of SD and SDXL)."""
    return getattr(pipe, family_of_pipeline(pipe).denoiser)


def image_size(pipe) -> int:
    """The side of the images a pipeline draws by default, in pixels."""
    size = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size  # FLUX's config has none
    return size * getattr(pipe, "vae_scale_factor", 8)


def pipeline_fingerprint(pipe) -> str:
    """kv_fingerprint of a pipeline's current edited-layer weights."""
    family = family_of_pipeline(pipe)
    return kv_fingerprint({n: m.weight for n, m in family.edited_modules(getattr(pipe, family.denoiser)).items()})


def model_record(model, pipe, text_encoders: Sequence[str] = (), vae: str | None = None) -> dict:
    """What a manifest records about the model: where it came from, its pipeline class, its fingerprint (before edits),
    and the split files a single-file model was built with."""
    source = resolve_model(model).name
    record = {
        "source": source,
        "path": model_path_record(model),
        "pipeline": type(pipe).__name__,
        "fingerprint": pipeline_fingerprint(pipe),
    }
    if text_encoders:
        record["text_encoders"] = [str(Path(t).expanduser().resolve()) for t in text_encoders]
    if vae:
        record["vae"] = str(Path(vae).expanduser().resolve())
    return record


def set_scheduler(pipe, name: str | None) -> None:
    """Replace the pipeline's scheduler by the named one, built from the model's scheduler config."""
    import diffusers

    if name is None:
        return
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def resolve_device(device: str | None, local_rank: int = 0) -> str:
    """The torch device of one process: `cuda` means cuda:LOCAL_RANK; None means cuda if available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ReceError(f"'{device}' is not a torch device; use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReceError(f"--device {device} but CUDA is not available on this machine; use --device cpu")
    if device == "cuda":
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def seeded_images(pipe, seeds: Sequence[int], **call):
    """One pipeline call whose image i comes from its own CPU generator seeded with seeds[i], so that every image
    can be reproduced alone, at any batch size and on any device; `call` holds the other pipeline arguments."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return pipe(generator=generators, **call).images
