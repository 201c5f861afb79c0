"""The settings of `rece robustness` (`robustness.py`), light on purpose: the command line makes its flags from
`RobustnessConfig` without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .attacks.registry import ATTACKS
from .errors import ReceError
from .options import option
from .toy import door

METHODS = ("uce", "rece", "robust")
FROM_UCE = "derived-from-uce"  # the derived attack with c′ derived against the UCE edit, as in the RECE paper
PRESERVATION = ("named", "others", "colours", "erased_colours", "erased_shapes")
PRESERVATION_GROUP = "preservation"
DERIVED_IMAGES = 4  # the derived attack has one case per concept: it draws this many times the images of a prompt

# The shapes models' attack settings: the papers' take hours on a CPU (bench/attack_asr.py reads these too)
SHAPES_ATTACKS = {
    "ring-a-bell": dict(population=100, generations=100, length=8, eta=3.0),
    "unlearndiff": dict(iterations=10, timesteps=10, adv_tokens=5, lr=0.01),
    "textual-inversion": dict(train_steps=300, train_batch_size=4, gradient_accumulation=1, train_images=16),
    "mma": dict(iterations=200, candidates=256),
    "inversion": dict(train_steps=300, lr=0.02, reference_images=16, train_batch_size=4),
}
QUICK_ATTACKS = {  # --quick, on every model
    "ring-a-bell": dict(population=20, generations=20, length=8),
    "unlearndiff": dict(iterations=3, timesteps=4),
    "textual-inversion": dict(train_steps=30, train_batch_size=4, gradient_accumulation=1, train_images=8),
    "mma": dict(iterations=20, candidates=64),
    "inversion": dict(train_steps=160, lr=0.02, reference_images=8, train_batch_size=4),
}
SHAPES_IMAGES, QUICK_IMAGES, OTHER_IMAGES = 4, 2, 1  # images per prompt: shapes models, --quick, other models


def attack_names() -> list[str]:
    """Every attack the matrix can run: the registered ones and derived-from-uce."""
    return [*ATTACKS, FROM_UCE]


@dataclass
class RobustnessConfig:
    """What `rece robustness` measures and how; the CLI flags are made from these fields."""

    concepts: list[str] = option(default_factory=list, help="concept to erase and attack (repeatable)", flag="--concept")
    methods: list[str] = option(default_factory=lambda: list(METHODS), help="erasure methods", cli=False)
    attacks: list[str] = option(
        default_factory=lambda: ["all"], help=f"attacks: all, or some of {', '.join(attack_names())}", cli=False
    )
    quick: bool = option(False, "reduced attack settings and images (docs/attacks.md: The robustness matrix)")
    images: int | None = option(None, f"images per prompt (shapes {SHAPES_IMAGES}, --quick {QUICK_IMAGES}, else 1)")
    prompts: str | None = option(
        None, "prompt set naming the concept, for the attacks that start from prompts (shapes: built in)"
    )
    attack_param: list[str] = option(
        default_factory=list, help="ATTACK:KEY=VALUE, an attack setting over the matrix's (repeatable)"
    )
    erase_option: list[str] = option(
        default_factory=list, help="KEY=VALUE, an erase setting over the recipe's for every method (repeatable), e.g. support=1"
    )
    steps: int | None = option(None, f"sampling steps (shapes {door.STEPS}, else the family's)")
    guidance: float | None = option(None, f"guidance scale (shapes {door.GUIDANCE:g}, else the family's)")
    seed: int = option(0, "seed of the attacks")
    batch_size: int = option(8, "images per pipeline call; does not change the images")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available)")
    overwrite: bool = option(False, "discard the finished measurements of other settings in -o")
    progress: bool = option(True, "progress bars", cli=False)


def chosen_attacks(names: list[str]) -> list[str]:
    """The attacks asked for, `all` expanded, in the registry's order; an unknown name is one line."""
    known = attack_names()
    for name in names:
        if name != "all" and name not in known:
            raise ReceError(f"unknown attack '{name}'; choose from: all, {', '.join(known)}")
    wanted = set(known) if "all" in names else set(names)
    return [n for n in known if n in wanted]


def attack_overrides(items: list[str]) -> dict[str, dict]:
    """--attack-param ATTACK:KEY=VALUE items as {attack: {key: value}} (numbers parsed)."""
    out: dict[str, dict] = {}
    for item in items:
        attack, colon, rest = item.partition(":")
        key, equals, text = rest.partition("=")
        if not colon or not equals or not key:
            raise ReceError(f"--attack-param takes ATTACK:KEY=VALUE (got '{item}'), e.g. ring-a-bell:population=20")
        out.setdefault(attack, {})[key.replace("-", "_")] = _number(text)
    return out


def erase_overrides(items: list[str]) -> dict:
    """--erase-option KEY=VALUE items as {key: value} (numbers and true/false parsed); KEY is an erase parameter."""
    from .config import EraseConfig  # torch-free, like this module

    known = {f.name for f in fields(EraseConfig)} - {"concepts", "method", "preset"}
    out: dict = {}
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in known:
            raise ReceError(
                f"--erase-option takes KEY=VALUE with KEY an erase parameter (got '{item}'), e.g. support=1 or tradeoff=3"
            )
        out[key] = {"true": True, "false": False}.get(text.lower(), _number(text))
    return out


def _number(text: str):
    """A setting's value: an int, else a float, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text
