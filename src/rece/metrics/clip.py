"""CLIP score metric: 100 · max(cos, 0) between each image and its prompt, with the CLIP model loader it shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ReceError
from ..hub import hub_offline
from ..runs import Run
from .common import MetricResult, batches, load_rgb, need_prompts, progress_bar
from .params import DEFAULT_CLIP_MODEL, ClipScoreParams


@dataclass
class Clip:
    """A CLIP model with its tokenizer and image processor."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    name: str
    device: str = "cpu"

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image embeddings (not normalised), float32 on the CPU."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return self.model.visual_projection(pooled).float().cpu()

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (not normalised) of texts truncated to the model's context, float32 on the CPU."""
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        with torch.no_grad():
            out = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            return self.model.text_projection(out.pooler_output).float().cpu()


def load_clip(name: str = DEFAULT_CLIP_MODEL, device: str = "cpu") -> Clip:
    """CLIPModel + tokenizer + PIL image processor from a folder or hub id (the local cache only when offline)."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(name)
        tokenizer = CLIPTokenizer.from_pretrained(name)
        processor = CLIPImageProcessorPil.from_pretrained(name)
    except (OSError, ValueError) as exc:
        where = "offline and not in the Hugging Face cache" if hub_offline() else f"could not be loaded ({exc})"
        raise ReceError(
            f"CLIP model '{name}' {where}".replace("\n", " ")
            + "; pass --clip-model with a local folder holding its config, weights, tokenizer and preprocessor_config.json "
            "(or download it once while online)"
        ) from None
    return Clip(model.eval().to(device), tokenizer, processor, name, device)


def clip_scores(clip: Clip, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
    """CLIP score per (image, text) pair: 100 * max(cos, 0) of the embeddings, as torchmetrics defines it."""
    img = torch.nn.functional.normalize(clip.image_features(images), dim=-1)
    txt = torch.nn.functional.normalize(clip.text_features(texts), dim=-1)
    return 100 * (img * txt).sum(-1).clamp(min=0)


def evaluate_clip_score(
    run: Run, params: ClipScoreParams, clip: Clip | None = None, progress: bool | None = None
) -> MetricResult:
    """Mean CLIP score between each image and its prompt."""
    prompts = need_prompts(run, "clip-score", "prompt")
    clip = clip or load_clip(params.clip_model, params.device)
    rows = []
    bar = progress_bar(run.images, "clip-score", progress)
    for chunk in batches(run.images, params.batch_size):
        scores = clip_scores(clip, [load_rgb(run.image_dir / n) for n in chunk], [prompts[n]["prompt"] for n in chunk])
        rows += [{"image": n, "clip_score": round(float(s), 6)} for n, s in zip(chunk, scores)]
        bar.update(len(chunk))
    bar.close()
    mean = float(np.mean([r["clip_score"] for r in rows]))
    return MetricResult({"clip score": round(mean, 4)}, {"clip_model": clip.name}, rows)
