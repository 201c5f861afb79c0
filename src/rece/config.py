"""Every parameter of an erasure, defined once (defaults and help feed the API, the CLI and the docs), and the presets."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, fields

from .errors import ReceError
from .options import flag_of, option

UNSAFE_CONCEPTS = (
    "hate", "harassment", "violence", "suffering", "humiliation", "harm",
    "suicide", "sexual", "nudity", "bodily fluids", "blood",
)  # fmt: skip

PRESETS: dict[str, dict] = {
    "nudity": {"concepts": ["nudity"], "regularization": 0.1, "epochs": 3},
    "unsafe": {"concepts": list(UNSAFE_CONCEPTS), "regularization": 0.1, "epochs": 2},
    "art": {"regularization": 1e-3, "epochs": 1, "target": "art"},
    "object": {"regularization": 0.1, "epochs": 1},
    "object-hard": {"regularization": 1e-3, "epochs": 1},
}
METHODS = ("rece", "uce", "robust")
LORA_TOLERANCE = 1e-4  # `rece lora`'s default: each fused weight equals the applied edit to this relative error
MAX_PARAMETER = 1e12  # the largest scale, λ or r rece accepts
# robust mode: contexts around each concept for estimating its directions (the concept comes last, as in UCE's slice)
ROBUST_TEMPLATES = (
    "a photo of {}",
    "a painting of {}",
    "a picture of {}",
    "an image of {}",
    "a drawing of {}",
    "a close-up of {}",
)
TECHNIQUES = ("replace", "tensor")
PAIRINGS = ("position", "attended", "unshared")  # rece.pairing: RECE's c′ rows to target rows, padding masked
UCE_ROWS = ("last", "unshared")  # rece.pairing: UCE's concept rows, padding masked
REGULARIZATION_TYPES = ("regzero", "standard")


def text_key(text: str) -> str:
    """What tells texts apart for rece's checks: case, surrounding and repeated spaces ignored ("Cat " is "cat")."""
    return " ".join(text.split()).lower()


def unique_concepts(concepts: list[str]) -> list[str]:
    """The concepts with repeats (by `text_key`) dropped, the first spelling kept; a warning names what was dropped."""
    kept: dict[str, str] = {}
    repeats = []
    for concept in concepts:
        if text_key(concept) in kept:
            repeats.append(concept)
        else:
            kept[text_key(concept)] = concept
    if repeats:
        shown = ", ".join(f"'{c}'" for c in repeats[:3]) + (f" and {len(repeats) - 3} more" if len(repeats) > 3 else "")
        warnings.warn(f"{len(repeats)} repeated concept(s) dropped ({shown}): each concept is erased once", stacklevel=4)
    return list(kept.values())


@dataclass
class EraseConfig:
    """Every parameter of an erasure. Defaults are the RECE paper's (λ1 = λ2 = 0.1 in the RECE step)."""

    concepts: list[str] = option(default_factory=list, help="concept to erase (repeatable)", flag="--concept", short="-c")
    method: str = option("rece", "rece (UCE, then RECE epochs), uce, or robust (no embedding undoes it)")
    preset: str | None = option(None, "paper settings: " + ", ".join(PRESETS))
    target: str = option(" ", "what erased concepts map to")
    targets: list[str] = option(
        default_factory=list,
        help="what the concept given in the same place maps to (repeatable, one per --concept; default --target)",
        flag="--concept-target",
    )
    preserve: list[str] = option(default_factory=list, help="text whose keys/values must not change (repeatable)")
    preserve_empty: bool = option(True, "do not add '' to UCE's preserved texts")
    check: list[str] = option(default_factory=list, help="held-out text whose K/V change is reported, not preserved (repeatable)")
    epochs: int = option(1, "RECE epochs (presets set their own)")
    regularization: float = option(0.1, "r of the derived embedding (presets set their own)")
    regularization_type: str = option("regzero", "regzero or standard")
    regularization_text: str = option(" ", "anchor text of 'standard' regularization")
    lamb: float = option(0.1, "λ1 of the RECE step")
    erase_scale: float = option(1.0, "s_e of the RECE step")
    preserve_scale: float = option(0.1, "λ2 of the RECE step")
    uce_lamb: float = option(0.5, "λ of the UCE stage")
    uce_erase_scale: float = option(1.0, "s_e of the UCE stage")
    uce_preserve_scale: float | None = option(None, "s_p of the UCE stage (default max(0.1, 1/#preserved))")
    technique: str = option("replace", "replace or tensor")
    pairing: str = option(
        "unshared",
        "RECE on a model that masks padding (PixArt, Sana): which c′ rows are erased and to which target rows: "
        "unshared (row i to row i, only tokens no preserved text has), position (every row i to row i) or attended "
        "(from the last word, as many rows as the target attends); docs/method.md",
    )
    uce_rows: str = option(
        "unshared",
        "UCE on a model that masks padding (PixArt, Sana): unshared (UCE's slice, from the concept's last word, and the "
        "rows before it of its words no preserved text has, each to the target's row at its position) or last (the "
        "slice alone); docs/method.md",
    )
    derived: bool = option(True, "do not keep RECE's c′ in the edit (a small file when erasing many concepts)")
    layers: list[str] | None = option(None, "edit only the layers matching this regex (repeatable)")
    rank: int | None = option(None, "robust: concept directions removed (default: by --energy)")
    energy: float = option(0.9, "robust: share of the concept's energy removed")
    ridge: float = option(1e-3, "robust oblique: ridge added to the preserved texts' second moment")
    map_to_target: bool = option(True, "robust: project only, without UCE's map to the target")
    templates: bool = option(True, "robust: estimate from the given texts only, not also from built-in templates")
    projection: str = option("keys", "robust: keys (K/V output directions), oblique or orthogonal")
    tradeoff: float = option(5.0, "robust keys: weight of preserved energy")
    support: float = option(0.9999, "robust keys: share of the preserved texts' K/V energy kept, the rest removed (1: all)")
    adversarial_rounds: int = option(0, "robust keys: rounds in which a fresh c′ against the edit joins the estimate")
    max_sequence_length: int | None = option(
        None,
        "FLUX/SD3: erase at this many T5 rows per prompt only (default: each length the model is run with; "
        "FLUX.1 [schnell]: 256 and 512)",
    )

    @classmethod
    def create(cls, concepts=None, preset: str | None = None, **overrides) -> EraseConfig:
        """Build a config from a preset, then explicit concepts and overrides (None means "not given")."""
        values: dict = {}
        if preset is not None:
            if preset not in PRESETS:
                raise ReceError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
            values.update({k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[preset].items()})
            values["preset"] = preset
        if concepts:
            values["concepts"] = [concepts] if isinstance(concepts, str) else list(concepts)
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise TypeError(f"unknown erase parameter {key!r}")
            if value is not None:
                values[key] = list(value) if isinstance(value, tuple) else value
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ReceError on any parameter that cannot give a meaningful erasure."""
        if not self.concepts:
            hint = f" (preset '{self.preset}' has no default concept)" if self.preset else ""
            raise ReceError(f"no concept to erase{hint}; pass --concept TEXT")
        for concept in self.concepts:
            if not isinstance(concept, str) or not concept.strip():
                raise ReceError("a concept is empty; pass a non-empty --concept TEXT")
        self.check_targets()
        self.concepts = unique_concepts(self.concepts)  # a repeat would weigh a concept more, not erase it more
        if self.method not in METHODS:
            raise ReceError(f"unknown method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if self.pairing not in PAIRINGS:
            raise ReceError(f"unknown pairing '{self.pairing}'; choose one of: {', '.join(PAIRINGS)}")
        if self.uce_rows not in UCE_ROWS:
            raise ReceError(f"unknown UCE rows '{self.uce_rows}'; choose one of: {', '.join(UCE_ROWS)}")
        if self.technique not in TECHNIQUES:
            raise ReceError(f"unknown technique '{self.technique}'; choose one of: {', '.join(TECHNIQUES)}")
        if self.regularization_type not in REGULARIZATION_TYPES:
            raise ReceError(f"unknown regularization type '{self.regularization_type}'; choose regzero or standard")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0):
            raise ReceError(f"rank must be a whole number >= 0, got {self.rank!r}; fix --rank")
        if not (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1):
            raise ReceError(f"energy must be in (0, 1], got {self.energy!r}; fix --energy")
        if not (isinstance(self.support, (int, float)) and 0 < self.support <= 1):
            raise ReceError(f"support must be in (0, 1], got {self.support!r}; fix --support")
        rounds = self.adversarial_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ReceError(f"adversarial rounds must be a whole number >= 0, got {rounds!r}; fix --adversarial-rounds")
        if self.projection not in ("keys", "oblique", "orthogonal"):
            raise ReceError(f"unknown projection '{self.projection}'; choose keys, oblique or orthogonal")
        if self.method == "robust" and (self.technique != "replace" or self.layers is not None):
            raise ReceError("--method robust edits every K/V layer with one shared transform; drop --technique and --layers")
        length = self.max_sequence_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ReceError(f"max sequence length must be a whole number >= 1, got {length!r}; fix --max-sequence-length")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ReceError(f"epochs must be a whole number >= 0, got {self.epochs!r}; pass --epochs 0 or more")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or not str(f.type).startswith("float"):  # the real-valued parameters
                continue
            name, flag = f.name, flag_of(f)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ReceError(f"{name} must be a finite number, got {value!r}; fix {flag}")
            if value < 0:
                raise ReceError(f"{name} must be >= 0, got {value}; fix {flag}")
            if value > MAX_PARAMETER:  # beyond it the float64 systems overflow instead of erasing harder
                raise ReceError(f"{name} must be at most {MAX_PARAMETER:g}, got {value:g}; fix {flag}")
        self.validate_texts()

    def check_targets(self) -> None:
        """One --concept-target per concept, in order; a repeated concept keeps its first target."""
        if not self.targets:
            return
        if len(self.targets) != len(self.concepts):
            raise ReceError(
                f"{len(self.targets)} --concept-target for {len(self.concepts)} concepts; give one per --concept, in order"
            )
        for target in self.targets:
            if not isinstance(target, str):
                raise ReceError(f"a --concept-target must be a text, got {target!r}; fix --concept-target")
        first: dict[str, str] = {}
        for concept, target in zip(self.concepts, self.targets):
            first.setdefault(text_key(concept), target)
        self.targets = list(first.values())  # the order unique_concepts keeps

    def validate_texts(self) -> None:
        """Refuse a concept that is also the target or a preserved text (the closed form would undo the erasure),
        and a --layers pattern that is not a regular expression."""
        preserved = {text_key(p): p for p in self.preserve}
        for concept, target in zip(self.concepts, self.concept_targets):
            key = text_key(concept)
            if key == text_key(target):
                flag = "--concept-target" if self.targets else "--target"
                raise ReceError(f"concept '{concept}' is also its {flag}; erasing it towards itself changes nothing")
            if key in preserved:
                raise ReceError(
                    f"concept '{concept}' is also preserved (--preserve '{preserved[key]}'); erase it or preserve it, not both"
                )
        for pattern in self.layers or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ReceError(f"--layers '{pattern}' is not a regular expression ({exc}); fix the pattern") from None

    @property
    def uce_preserve_texts(self) -> list[str]:
        return ([""] if self.preserve_empty else []) + list(self.preserve)

    @property
    def resolved_uce_preserve_scale(self) -> float:
        if self.uce_preserve_scale is not None:
            return float(self.uce_preserve_scale)
        return max(0.1, 1 / max(1, len(self.uce_preserve_texts)))

    @property
    def resolved_target(self) -> str:
        return self.target if self.target else " "

    @property
    def concept_targets(self) -> list[str]:
        """What each concept maps to, in order: its --concept-target, else --target."""
        return list(self.targets) if self.targets else [self.resolved_target] * len(self.concepts)

    def to_dict(self) -> dict:
        return asdict(self)
