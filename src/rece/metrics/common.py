"""What every metric shares: its result, image loading, progress bars, batching, and the run's prompts and concepts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..errors import ReceError
from ..runs import Run, read_manifest


@dataclass
class MetricResult:
    """What one metric found: the summary columns (as a paper table reads), its parameters, and one row per image."""

    summary: dict[str, float | int | None]
    params: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


def load_rgb(path: Path) -> Image.Image:
    """An image file as RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


def progress_bar(items: Iterable, desc: str, enabled: bool | None = None) -> tqdm:
    """A tqdm bar over `items` (shown on a terminal unless `enabled` is False)."""
    return tqdm(items, desc=desc, unit="img", disable=None if enabled is None else not enabled, dynamic_ncols=True)


def batches(items: Sequence, size: int) -> list[Sequence]:
    """`items` in consecutive chunks of at most `size`."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def need_prompts(run: Run, metric: str, column: str) -> dict[str, dict[str, str]]:
    """The run's prompts.csv rows, checked to have `column` for every image."""
    if run.prompts is None:
        raise ReceError(
            f"{metric} needs '{run.path / 'prompts.csv'}' (the `{column}` of each image); evaluate a `rece generate` run folder"
        )
    missing = [n for n in run.images if n not in run.prompts or column not in run.prompts[n]]
    if missing:
        raise ReceError(
            f"{metric}: {len(missing)} image(s) of '{run.path}' have no `{column}` in prompts.csv (first: {missing[0]}); "
            "evaluate a run whose prompt set has that column"
        )
    return run.prompts


def split_concepts(concept: str | Sequence[str] | None) -> list[str]:
    """--concept values (repeatable or comma-separated) as a list."""
    items = [concept] if isinstance(concept, str) else list(concept or [])
    return [c.strip() for item in items for c in item.split(",") if c.strip()]


def run_concepts(run: Run, concept: str | Sequence[str] | None = None) -> list[str]:
    """The concepts a run is scored on: --concept, else the attack's, else those of the edits it applied."""
    given = split_concepts(concept)
    if given:
        return given
    manifest = read_manifest(run.path)
    attack = manifest.get("attack") or {}
    if attack.get("concepts"):
        return list(attack["concepts"])
    return list(dict.fromkeys(c for e in manifest.get("edits") or [] for c in e.get("concepts") or []))
