"""Every attack's parameters, defined once with the paper's defaults and help (as `config.EraseConfig` for erasure).

Light on purpose: the command line makes `rece attack`'s flags from these dataclasses without importing torch. What a
parameter resolves to on a model (an edit's own r, a file's checksum) is the attack module's `resolved`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ReceError
from ..options import option

SELF, BASE = "self", "base"  # what the derived attack's c′ is derived against, besides another edit file


def require_counts(params: object, *names: str) -> None:
    """Refuse a count parameter below 1, naming its flag."""
    for name in names:
        if getattr(params, name) < 1:
            raise ReceError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(params, name)})")


@dataclass
class DerivedParams:
    """r of the derivation (default: the edit's own `regularization`) and the weights c′ is derived against."""

    regularization: float | None = option(None, "r of the derivation (default: the edit's own, 0.1 for RECE presets)")
    derive_from: str | None = option(None, "derive c′ against: self (the attacked model, default), base, or another edit file")

    def validate(self) -> None:
        if self.regularization is not None and not self.regularization > 0:
            raise ReceError(f"--regularization must be > 0 for the derived attack (got {self.regularization})")
        source = self.derive_from
        if source not in (None, SELF, BASE) and not Path(source).is_file():
            raise ReceError(f"--derive-from '{source}' is neither 'self', 'base' nor an edit file; pass an edit .safetensors")


@dataclass
class RingABellParams:
    """The paper's settings (InversePrompt notebook): η 3 (nudity; 5.5 for violence), K 16, population 200,
    3000 generations, mutation rate 0.25, crossover rate 0.5."""

    eta: float = option(3.0, "strength η of the concept vector (the paper uses 3 for nudity, 5.5 for violence)")
    length: int = option(16, "K, tokens of the hard prompt (the paper also uses 38 and 77)")
    population: int = option(200, "genetic algorithm population")
    generations: int = option(3000, "genetic algorithm generations")
    mutation_rate: float = option(0.25, "chance that a prompt gets one random token")
    crossover_rate: float = option(0.5, "chance that a parent has two children")
    pairs: str | None = option(None, "CSV of 'sensitive prompt','normal prompt' pairs for the concept vector (shapes: built in)")

    def validate(self) -> None:
        require_counts(self, "length", "population", "generations")
        if self.population < 2:
            raise ReceError(f"--population must be at least 2 (got {self.population})")
        for name in ("mutation_rate", "crossover_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ReceError(f"--{name.replace('_', '-')} must be between 0 and 1 (got {getattr(self, name)})")
        if self.pairs is not None and not Path(self.pairs).is_file():
            raise ReceError(
                f"--pairs '{self.pairs}' does not exist; pass a CSV with 'sensitive prompt' and 'normal prompt' columns"
            )


@dataclass
class UnlearnDiffParams:
    """UnlearnDiff's settings (OPTML-Group/Diffusion-MU-Attack, text_grad configs): 5 prefix tokens, 40 iterations per
    timestep, Adam lr 0.01 with weight decay 0.1, 50 evenly spaced timesteps, L2 loss. `target_run`: a `rece generate`
    run folder of the original model whose images/{case}_0.png are the targets (default: drawn here)."""

    iterations: int = option(40, "optimisation steps per sampled timestep")
    lr: float = option(0.01, "learning rate")
    weight_decay: float = option(0.1, "Adam weight decay")
    adv_tokens: int = option(5, "adversarial tokens prepended to each prompt")
    timesteps: int = option(50, "evenly spaced timesteps visited in turn")
    target_run: str | None = option(
        None, "a `rece generate` run of the original model whose images are the targets (default: drawn here)"
    )

    def validate(self) -> None:
        require_counts(self, "iterations", "adv_tokens", "timesteps")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ReceError(f"--lr must be > 0 and --weight-decay >= 0 (got {self.lr}, {self.weight_decay})")
        if self.target_run is not None and not (Path(self.target_run) / "images").is_dir():
            raise ReceError(
                f"--target-run '{self.target_run}' has no images/ folder; pass a `rece generate` run of the original model"
            )


@dataclass
class TextualInversionParams:
    """CCE's settings (NYU-DICE-Lab/circumventing-concept-erasure train.sh): 25 training images, batch 4, gradient
    accumulation 4, 5000 steps, lr 5e-3 scaled by batch × accumulation (--scale_lr), constant schedule."""

    train_steps: int = option(5000, "optimisation steps")
    lr: float = option(5e-3, "learning rate, scaled by batch × accumulation unless --no-scale-lr")
    train_batch_size: int = option(4, "images per step")
    gradient_accumulation: int = option(4, "batches per step")
    scale_lr: bool = option(True, "use --lr as is (default: lr × batch × accumulation, as CCE's --scale_lr)")
    train_images: int = option(25, "training images drawn by the original model from the prompt set")
    images: str | None = option(None, "folder of images of the concept to train on instead")
    initializer: str | None = option(None, "word the new embedding starts from (default: the concept)")
    placeholder: str | None = option(None, "the new word (default: <concept>)")

    def validate(self) -> None:
        require_counts(self, "train_steps", "train_batch_size", "gradient_accumulation", "train_images")
        if not self.lr > 0:
            raise ReceError(f"--lr must be > 0 (got {self.lr})")
        if self.images is not None and not Path(self.images).is_dir():
            raise ReceError(f"--images '{self.images}' is not a folder; pass a folder of images of the concept")

    @property
    def effective_lr(self) -> float:
        return self.lr * (self.train_batch_size * self.gradient_accumulation if self.scale_lr else 1)


@dataclass
class MMAParams:
    """MMA-Diffusion's text-modality settings (cure-lab/MMA-Diffusion, textual attack): 20 adversarial tokens, 500
    GCG steps, top-k 256 substitutions per position, 512 candidates per step."""

    length: int = option(20, "adversarial tokens of the prompt")
    iterations: int = option(500, "greedy coordinate-gradient steps")
    topk: int = option(256, "candidate substitutions per position (by the one-hot gradient)")
    candidates: int = option(512, "candidate prompts scored per step")
    banned_words: str | None = option(None, "comma-separated words no token may contain, besides the concept's own")

    def validate(self) -> None:
        require_counts(self, "length", "iterations", "topk", "candidates")


EMPTY, CONCEPT = "empty", "concept"  # where the inversion attack's rows start


@dataclass
class InversionParams:
    """Concept Inversion's settings (Pham et al., ICLR 2024: Textual Inversion's, via CCE's train.sh) applied to the
    conditioning rows themselves: 5000 steps, batch 4, 25 reference images, Adam lr 5e-3 (Textual Inversion's base
    rate, unscaled: every row is free, not one token), timesteps uniform in [0, T) at every step."""

    train_steps: int = option(5000, "optimisation steps (each a batch of reference images at random timesteps)")
    lr: float = option(5e-3, "Adam learning rate of the conditioning rows")
    train_batch_size: int = option(4, "reference images per step")
    reference_images: int = option(25, "reference images of the concept, drawn by the unedited model (or read from --images)")
    images: str | None = option(None, "folder of images of the concept to invert instead of the unedited model's")
    init: str = option(EMPTY, "rows to start from: empty (the empty prompt's) or concept (the concept prompt's own)")

    def validate(self) -> None:
        require_counts(self, "train_steps", "train_batch_size", "reference_images")
        if not self.lr > 0:
            raise ReceError(f"--lr must be > 0 (got {self.lr})")
        if self.init not in (EMPTY, CONCEPT):
            raise ReceError(f"--init must be '{EMPTY}' or '{CONCEPT}' (got '{self.init}')")
        if self.images is not None and not Path(self.images).is_dir():
            raise ReceError(f"--images '{self.images}' is not a folder; pass a folder of images of the concept")
