"""Edit files: the result of an erasure as a small safetensors file, applied to and reverted from pipelines.

An edit is either one d×d transform P shared by every cross-attention K/V layer (W' = W·P; the
"replace" technique on all layers) or per-layer deltas (W' = W + ΔW). Metadata records the method,
every parameter, the concepts, library versions and a fingerprint of the base model's K/V weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ReceError
from .io import atomic_dir, atomic_file
from .models import KV_WEIGHT, BaseModel, kv_fingerprint, load_model, unet_weight_files

FORMAT = "rece-edit"
FORMAT_VERSION = 1
METADATA_KEY = "rece"


def library_versions() -> dict[str, str]:
    """Versions of rece and the libraries whose numerics an edit depends on (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    versions = {"rece": __version__, "torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class Edit:
    """An erasure's result. `transform` (d×d, float64) or `deltas` ({layer: ΔW}) describe the new weights."""

    metadata: dict
    transform: torch.Tensor | None = None
    deltas: dict[str, torch.Tensor] | None = None
    derived: list[torch.Tensor] = field(default_factory=list)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_transform(cls, transform, base: BaseModel, config, derived, seconds: float, robust: dict | None = None) -> Edit:
        meta = cls._metadata("transform", base, config, list(base.kv), seconds)
        if robust is not None:
            meta["robust"] = robust
        return cls(meta, transform=transform.cpu(), derived=[d.cpu() for d in derived])

    @classmethod
    def from_deltas(cls, deltas, base: BaseModel, config, derived, seconds: float) -> Edit:
        meta = cls._metadata("layers", base, config, list(deltas), seconds)
        return cls(meta, deltas={n: d.cpu() for n, d in deltas.items()}, derived=[d.cpu() for d in derived])

    @staticmethod
    def _metadata(kind: str, base: BaseModel, config, edited: list[str], seconds: float) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "method": config.method,
            "concepts": list(config.concepts),
            "config": config.to_dict(),
            "base": {
                "source": base.source,
                "fingerprint": base.fingerprint(),
                "pipeline": base.kind,
                "dim": base.dim,
                "dtype": str(base.dtype).replace("torch.", ""),
                "layers": list(base.kv),
                "shapes": {n: list(w.shape) for n, w in base.kv.items()},
            },
            "edited_layers": edited,
            "seconds": round(seconds, 4),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": library_versions(),
        }

    # -- properties ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def concepts(self) -> list[str]:
        return self.metadata["concepts"]

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def layers(self) -> list[str]:
        return self.metadata["edited_layers"]

    @property
    def fingerprint(self) -> str:
        return self.metadata["base"]["fingerprint"]

    # -- the math of applying -----------------------------------------------------------------
    def edited_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The edited version of one original K/V weight, in the weight's dtype and device."""
        w64 = weight.detach().to(torch.float64)
        if self.kind == "transform":
            new = w64 @ self.transform.to(w64.device, torch.float64)
        else:
            new = w64 + self.deltas[name].to(w64.device, torch.float64)
        return new.to(weight.dtype)

    def edited_kv(
        self, kv: dict[str, torch.Tensor], allow_other_base: bool = False, source: str = "model"
    ) -> dict[str, torch.Tensor]:
        """New weights for the edited layers of `kv` (original weights); checks the base model first."""
        self.check_base(kv, allow_other_base, source)
        return {n: self.edited_weight(n, kv[n]) for n in self.layers}

    def check_base(self, kv: dict[str, torch.Tensor], allow_other_base: bool = False, source: str = "model") -> None:
        missing = [n for n in self.layers if n not in kv]
        if missing:
            raise ReceError(f"'{source}' has no layer {missing[0]} that this edit changes; it is a different architecture")
        shapes = self.metadata["base"]["shapes"]
        for n in self.layers:
            if list(kv[n].shape) != shapes[n]:
                raise ReceError(
                    f"layer {n} of '{source}' is {list(kv[n].shape)}, the edit expects {shapes[n]}; "
                    "it is a different architecture"
                )
        if not allow_other_base and kv_fingerprint(kv) != self.fingerprint:
            raise ReceError(
                f"this edit was made for base model {self.fingerprint} ({self.metadata['base']['source']}) but '{source}' is "
                f"{kv_fingerprint(kv)}; use the same base model, "
                "or pass --allow-other-base (allow_other_base=True) for a fine-tune of it"
            )

    # -- pipelines in memory ------------------------------------------------------------------
    def apply(self, pipe, allow_other_base: bool = False):
        """Edit a diffusers pipeline in place (revert with `revert`). Returns the pipeline."""
        modules = dict(pipe.unet.named_modules())
        kv = {n: m.weight for n, m in modules.items() if KV_WEIGHT.search(n + ".weight")}
        new = self.edited_kv(kv, allow_other_base, source=type(pipe).__name__)
        stack = pipe.unet.__dict__.setdefault("_rece_applied", [])
        stack.append((self.fingerprint_of_edit(), {n: kv[n].detach().clone() for n in new}))
        with torch.no_grad():
            for n, w in new.items():
                modules[n].weight.copy_(w)
        return pipe

    def revert(self, pipe):
        """Restore the exact weights the pipeline had before this edit was applied."""
        stack = pipe.unet.__dict__.get("_rece_applied", [])
        if not stack or stack[-1][0] != self.fingerprint_of_edit():
            raise ReceError(
                "this edit is not the last one applied to this pipeline; revert edits in reverse order, or reload the model"
            )
        _, originals = stack.pop()
        modules = dict(pipe.unet.named_modules())
        with torch.no_grad():
            for n, w in originals.items():
                modules[n].weight.copy_(w)
        return pipe

    def fingerprint_of_edit(self) -> str:
        return json.dumps([self.metadata["created"], self.metadata["concepts"], self.metadata["config"]], sort_keys=True)

    # -- files ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.kind == "transform":
            eye = torch.eye(self.transform.shape[0], dtype=torch.float64)
            out["transform.delta"] = (self.transform.to(torch.float64) - eye).to(torch.float32).contiguous()
        else:
            out.update({f"layers.{n}.delta": d.to(torch.float32).contiguous() for n, d in self.deltas.items()})
        for epoch, rows in enumerate(self.derived):
            out[f"derived.{epoch}"] = rows.to(torch.float32).contiguous()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the edit as safetensors + JSON metadata (atomically)."""
        from safetensors.torch import save_file

        with atomic_file(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata={METADATA_KEY: json.dumps(self.metadata), "format": "pt"})
        return Path(path)

    def summary(self) -> str:
        m, c = self.metadata, self.metadata["config"]
        lines = [
            f"concepts      {', '.join(m['concepts'])}",
            f"method        {m['method']}" + (f" (preset {c['preset']})" if c.get("preset") else ""),
            f"target        {c['target']!r}   preserve {c['preserve'] or '-'}",
        ]
        if m["method"] == "rece":
            lines.append(
                f"rece          epochs {c['epochs']}, r {c['regularization']:g} ({c['regularization_type']}), "
                f"λ1 {c['lamb']:g}, λ2 {c['preserve_scale']:g}"
            )
        if m["method"] == "robust" and "robust" in m:
            r = m["robust"]
            residual = ", ".join(f"{k} {v:.3f}" for k, v in r["fresh_residual"].items())
            lines.append(f"robust        rank {r['rank']} removed; fresh c′ residual {residual} (0 = concept recoverable)")
            how = [f"projection {c.get('projection', 'keys')}", f"tradeoff μ {c.get('tradeoff', 5.0):g}"]
            how.append("rank fixed" if c.get("rank") is not None else f"rank by energy {c.get('energy', 0.9):g}")
            how.append("mapped to target first" if c.get("map_to_target", True) else "projection only")
            how.append("built-in templates" if c.get("templates", True) else "given texts only")
            lines.append("              " + ", ".join(how))
        lines.append(f"uce           λ {c['uce_lamb']:g}, erase scale {c['uce_erase_scale']:g}, technique {c['technique']}")
        if m["kind"] == "transform":
            eye = torch.eye(self.transform.shape[0], dtype=torch.float64)
            rank = int(torch.linalg.matrix_rank(self.transform - eye).item())
            kind = f"one {m['base']['dim']}×{m['base']['dim']} transform, rank of M − I {rank}"
        else:
            kind = "per-layer deltas"
        lines.append(f"edit          {kind}, {len(m['edited_layers'])} of {len(m['base']['layers'])} K/V layers")
        lines.append(f"base          {m['base']['source']} (fingerprint {m['base']['fingerprint']}, {m['base']['pipeline']})")
        return "\n".join(lines)

    # -- LoRA ----------------------------------------------------------------------------------
    def to_lora(
        self,
        model,
        path: str | os.PathLike | None = None,
        tolerance: float = 1e-3,
        max_rank: int | None = None,
        allow_other_base: bool = False,
    ) -> dict[str, torch.Tensor]:
        """LoRA weights that `pipe.load_lora_weights` loads and that reproduce the edited K/V.

        One rank for all layers: the smallest at which every layer satisfies
        ‖W_lora − W_edit‖_F ≤ tolerance·‖W_edit‖_F (from each ΔW's SVD), capped by `max_rank`.
        """
        base = model if isinstance(model, BaseModel) else load_model(model)
        self.check_base(base.kv, allow_other_base, base.source)
        svds, rank = {}, 1
        for n in self.layers:
            w0 = base.kv[n].to(torch.float64)
            delta = self._delta64(n, w0)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            budget = (tolerance * (w0 + delta).norm()) ** 2
            tail = torch.cumsum(s.flip(0) ** 2, 0).flip(0)  # tail[k] = Σ_{i≥k} s_i²
            need = int((tail > budget).sum().item())
            rank = max(rank, need)
            svds[n] = (u, s, vh)
        if max_rank is not None:
            rank = min(rank, max_rank)
        state = {}
        for n, (u, s, vh) in svds.items():
            dtype = base.kv[n].dtype if base.kv[n].dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
            state[f"unet.{n}.lora_A.weight"] = vh[:rank].to(dtype).contiguous()
            state[f"unet.{n}.lora_B.weight"] = (u[:, :rank] * s[:rank]).to(dtype).contiguous()
        if path is not None:
            from safetensors.torch import save_file

            with atomic_file(path) as tmp:
                save_file(
                    state,
                    str(tmp),
                    metadata={
                        "format": "pt",
                        METADATA_KEY: json.dumps({"lora_rank": rank, "tolerance": tolerance, "edit": self.metadata}),
                    },
                )
        return state

    def _delta64(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        if self.kind == "transform":
            eye = torch.eye(self.transform.shape[0], dtype=torch.float64)
            return w0 @ (self.transform.to(torch.float64) - eye)
        return self.deltas[name].to(torch.float64)


def load_edit(path: str | os.PathLike) -> Edit:
    """Read an edit file, validating that it is a complete rece edit."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ReceError(f"edit file '{path}' does not exist; create one with `rece erase MODEL --concept ... -o {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ReceError(
            f"edit file '{path}' is corrupt or not a safetensors file ({str(exc).splitlines()[0]}); re-create it with rece erase"
        ) from None
    if METADATA_KEY not in header:
        raise ReceError(f"'{path}' is not a rece edit (no rece metadata); if it is a LoRA, load it with pipe.load_lora_weights")
    try:
        meta = json.loads(header[METADATA_KEY])
        if meta.get("format") != FORMAT:
            raise ValueError("format")
        kind = meta["kind"]
        if kind == "transform":
            delta = tensors["transform.delta"].to(torch.float64)
            transform, deltas = delta + torch.eye(delta.shape[0], dtype=torch.float64), None
        else:
            transform, deltas = None, {n: tensors[f"layers.{n}.delta"].to(torch.float64) for n in meta["edited_layers"]}
        derived = [tensors[f"derived.{i}"].to(torch.float64) for i in range(sum(k.startswith("derived.") for k in tensors))]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReceError(f"'{path}' is not a complete rece edit (bad or missing {exc}); re-create it with rece erase") from None
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ReceError(f"edit file '{path}' has NaN/Inf in {name}; it is corrupt, re-create it with rece erase")
    return Edit(meta, transform=transform, deltas=deltas, derived=derived)


def write_applied_pipeline(
    model, edits: list[Edit], out_dir: str | os.PathLike, allow_other_base: bool = False, overwrite: bool = False
) -> Path:
    """Write a complete diffusers pipeline folder with the edits applied; every other byte's content unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = model if isinstance(model, BaseModel) else load_model(model)
    kv = dict(base.kv)
    new: dict[str, torch.Tensor] = {}
    for edit in edits:
        changed = edit.edited_kv(kv, allow_other_base, base.source)
        kv.update(changed)
        new.update(changed)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if base.folder is None:  # a pipeline in memory, e.g. from a single-file checkpoint
            pipe = base.pipeline
            for edit in edits:
                edit.apply(pipe, allow_other_base)
            pipe.save_pretrained(tmp)
            for edit in reversed(edits):
                edit.revert(pipe)
            return Path(out_dir)
        folder = base.folder
        if base.source != str(folder) and not (folder / "vae").exists():
            folder = _full_snapshot(base.source)
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        for file in unet_weight_files(tmp / "unet"):
            if file.suffix == ".bin":
                state = torch.load(file, map_location="cpu", weights_only=True)
                for key in state:
                    if key.endswith(".weight") and key[:-7] in new:
                        state[key] = new[key[:-7]].to(state[key].dtype)
                file.unlink()
                torch.save(state, file)
                continue
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata()
                state = {k: f.get_tensor(k) for k in f.keys()}
            for key in state:
                if key.endswith(".weight") and key[:-7] in new:
                    state[key] = new[key[:-7]].to(state[key].dtype).contiguous()
            file.unlink()  # copytree may have copied a link into a cache; never write through it
            save_file(state, str(file), metadata=meta)
    return Path(out_dir)


def _full_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, ignore_patterns=["*.bin", "*.ckpt", "*.msgpack", "*.onnx*"]))
    except Exception as exc:
        raise ReceError(f"cannot fetch '{repo_id}' from the hub ({str(exc).splitlines()[0]}); pass a local folder") from None
