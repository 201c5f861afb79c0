"""`rece report`: run folders side by side (metrics, attacks, edits and settings, images, manifests) and sweeps."""

from __future__ import annotations

import html
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .edit_file import read_edit_metadata
from .errors import ReceError
from .io import atomic_file, check_output_path
from .metrics.table import format_value, results_rows
from .pictures import html_page, html_table, png_data_uri
from .provenance import file_sha256
from .runs import ATTACK_FORMAT, IMAGES, MANIFEST, METRICS_JSON, PROMPTS, image_files, image_set_digest, read_prompts
from .sweep import SERIES, sweep_plot, sweep_table

# -- `rece report`: runs side by side -------------------------------------------------------------
REPORT_MAX_IMAGES = 16
PROMPT_CHARS = 80
THUMBNAIL = 384  # largest side of an image in the page (twice its displayed width)
EDIT_KEYS = ("preset", "target", "preserve", "epochs", "regularization", "regularization_type", "lamb", "uce_lamb", "technique")
REPORT_STYLE = """
.runs td, .runs th { vertical-align: top; text-align: left; }
.runs td:first-child { white-space: nowrap; }
/* a long preserve list or model path wraps between words, and inside a word only when that word alone is wider than
   the page; `anywhere` let the table squeeze short columns below a word's width ("derive|d", "98.3|33") */
.runs td { overflow-wrap: break-word; }
.settings td:nth-child(2) { overflow-wrap: anywhere; min-width: 8em; }  /* a model path breaks anywhere, not a name */
.compare th, .compare td { text-align: center; }
.compare td:first-child { text-align: left; max-width: 260px; font-size: 0.9em; }
.compare img { width: 192px; height: auto; display: block; margin: auto; }
.compare .file { color: #777; font-size: 0.85em; }
details { margin: 0.5em 0; }
summary { cursor: pointer; }
pre { font-size: 0.85em; }
"""


@dataclass(frozen=True)
class ReportRun:
    """One run folder of a report: its name in the page, manifest, metrics.json entries, images and prompts.csv rows."""

    name: str
    path: Path
    manifest: dict
    metrics: dict
    images: list[str]
    prompts: dict[str, dict[str, str]]


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; a ReceError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReceError(f"cannot read {what} '{path}' ({str(exc).splitlines()[0]}); rerun the command that wrote it") from None
    if not isinstance(data, dict):
        raise ReceError(f"{what} '{path}' is not a JSON object; rerun the command that wrote it")
    return data


def _read_metrics(path: Path) -> dict:
    """The entries of a run's metrics.json ({} when there is none), each checked to have a summary."""
    if not path.is_file():
        return {}
    data = _read_json(path, "metrics file")
    bad = [k for k, v in data.items() if not isinstance(v, dict) or not isinstance(v.get("summary"), dict)]
    if bad:
        raise ReceError(f"metrics file '{path}' has no summary for '{bad[0]}'; rerun `rece evaluate` on that run")
    return data


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short distinct names of run folders: the folder name, with as many parent folders as it takes to tell them apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]  # the same folder given twice


def load_report_run(path: str | os.PathLike, name: str) -> ReportRun:
    """A `rece generate` run folder with its manifest, metrics (if evaluated), images and prompts."""
    path = Path(path)
    if not path.is_dir():
        raise ReceError(f"run folder '{path}' does not exist or is not a folder; pass `rece generate` output folders")
    if not (path / MANIFEST).is_file():
        raise ReceError(f"'{path}' has no {MANIFEST}, so it is not a `rece generate` run; pass the folder given to -o")
    images = image_files(path / IMAGES) if (path / IMAGES).is_dir() else []
    prompts = read_prompts(path / PROMPTS) if (path / PROMPTS).is_file() else {}
    manifest = _read_json(path / MANIFEST, "manifest")
    metrics = current_metrics(path, _read_metrics(path / METRICS_JSON), image_set_digest(path / IMAGES, images))
    return ReportRun(name, path, manifest, metrics, images, prompts)


def current_metrics(path: Path, metrics: dict, digest: str) -> dict:
    """The metrics computed on the run's present images; one whose image set has changed since (the run was resumed,
    an image regenerated) is left out, with a one-line warning saying to evaluate again."""
    out = {}
    for name, entry in metrics.items():
        if entry.get("image_set", digest) != digest:
            warnings.warn(
                f"metric {name} of '{path}' was computed on {entry.get('images', '?')} images that have changed since; "
                f"left out of the report: run `rece evaluate {path}` again",
                stacklevel=2,
            )
            continue
        out[name] = entry
    return out


def prompt_set_key(run: ReportRun) -> tuple | None:
    """What a run's image names index: its prompt set's checksum, else (an attack of the edit's concepts) the attacked
    concepts; None when the manifest records neither."""
    settings = run.manifest.get("settings") or {}
    checksum = settings.get("prompts_sha256") or (run.manifest.get("prompts") or {}).get("sha256")
    if checksum:
        return ("prompts", checksum)
    concepts = settings.get("concepts") or (run.manifest.get("attack") or {}).get("concepts")
    return ("concepts", tuple(concepts)) if concepts else None


def prompt_set_name(run: ReportRun) -> str:
    """The prompt set of a run as the page names it."""
    key = prompt_set_key(run)
    if key is None:
        return "an unrecorded prompt set"
    if key[0] == "concepts":
        return "the concepts " + ", ".join(f"'{c}'" for c in key[1])
    return f"prompt set {(run.manifest.get('prompts') or {}).get('source') or key[1][:12]}"


def prompt_set_groups(runs: Sequence[ReportRun]) -> list[list[ReportRun]]:
    """The runs grouped by prompt set, in the order given; a warning when there is more than one, since images of
    different sets share file names ("0_0.png") without sharing prompts and seeds."""
    groups: dict[tuple | None, list[ReportRun]] = {}
    for run in runs:
        groups.setdefault(prompt_set_key(run), []).append(run)
    if len(groups) > 1:
        sets = "; ".join(f"{', '.join(r.name for r in g)}: {prompt_set_name(g[0])}" for g in groups.values())
        warnings.warn(
            f"the runs use {len(groups)} different prompt sets ({sets}); their images are compared only within each set",
            stacklevel=2,
        )
    return list(groups.values())


def common_images(runs: Sequence[ReportRun]) -> list[str]:
    """Image file names every run has (same prompt and seed), in the first run's natural order."""
    shared = set.intersection(*(set(r.images) for r in runs))
    if not shared:
        counts = ", ".join(f"'{r.path}' {len(r.images)}" for r in runs)
        raise ReceError(
            f"the runs have no image file names in common (images: {counts}); report runs of the same prompt set and seeds"
        )
    return [n for n in runs[0].images if n in shared]


def _truncate(text: str, limit: int = PROMPT_CHARS) -> str:
    """`text` cut to `limit` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def metrics_section(runs: Sequence[ReportRun]) -> str:
    """The metrics table: one row per run, one column per summary value of each metric (as the paper's tables read)."""
    if not any(r.metrics for r in runs):
        return "<h2>Metrics</h2><p>No run has a metrics.json yet; measure them with <code>rece evaluate RUN_DIR ...</code>.</p>"
    header, rows = results_rows({r.name: r.metrics for r in runs})
    rows = [[row[0]] + [format_value(v, title) for v, title in zip(row[1:], header[1:])] for row in rows]
    return "<h2>Metrics</h2>" + html_table(rows, header)


def _edit_config(entry: dict) -> dict:
    """The erase parameters of a manifest's edit entry: its own `config`, else the edit file's metadata when unchanged."""
    if isinstance(entry.get("config"), dict):
        return entry["config"]
    path = Path(str(entry.get("path") or ""))
    if not path.is_file():
        return {}
    try:
        if entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            return {}
        return read_edit_metadata(path).get("config", {})
    except Exception:  # an unreadable edit file only costs the report its parameters
        return {}


def _param(value) -> str:
    """A parameter value as the page shows it: strings quoted (the target ' ' stays visible)."""
    return repr(value) if isinstance(value, str) else str(value)


def describe_edits(manifest: dict) -> str:
    """One line per applied edit: method, concepts and the key erase parameters; 'none' for the original model."""
    edits = manifest.get("edits") or []
    if not edits:
        return "none (original model)"
    lines = []
    for entry in edits:
        config = _edit_config(entry)
        params = ", ".join(f"{k} {_param(config[k])}" for k in EDIT_KEYS if config.get(k) is not None)
        concepts = ", ".join(entry.get("concepts") or []) or "?"
        lines.append(f"{entry.get('method', '?')}: {concepts}" + (f" ({params})" if params else ""))
    return "\n".join(lines)


def describe_sampling(manifest: dict) -> str:
    """Steps, guidance, scheduler and image size of a run, from its manifest settings."""
    s = manifest.get("settings") or {}
    size = f"{s.get('width')}×{s.get('height')}" if s.get("width") else "?"
    return f"{s.get('scheduler', '?')}, {s.get('steps', '?')} steps, guidance {s.get('guidance', '?')}, {size}"


def edits_section(runs: Sequence[ReportRun]) -> str:
    """A table of each run's model, edits and sampling settings."""
    rows = [
        (r.name, (r.manifest.get("model") or {}).get("source", "?"), describe_edits(r.manifest), describe_sampling(r.manifest))
        for r in runs
    ]
    table = html_table(rows, ["run", "model", "edits", "sampling"]).replace("<table>", "<table class='runs settings'>", 1)
    return "<h2>Edits and settings</h2>" + table.replace("\n", "<br>")


def _image_cell(run: ReportRun, name: str) -> str:
    """One <img> of a run's image as a data URI, labelled with the run and file name."""
    with Image.open(run.path / IMAGES / name) as img:
        img = img.convert("RGB")
    img.thumbnail((THUMBNAIL, THUMBNAIL), Image.LANCZOS)  # only ever shrinks: a 512² image need not weigh 400 kB here
    uri = png_data_uri(img)
    label = html.escape(f"{run.name}: {name}", quote=True)
    return f"<td><img src='{uri}' alt='{label}' title='{label}'></td>"


def _row_label(runs: Sequence[ReportRun], name: str) -> str:
    """The prompt (truncated; full text on hover), seed and file name of an image, from the first run that knows it."""
    row = next((r.prompts[name] for r in runs if name in r.prompts), {})
    prompt = row.get("prompt", "")
    seed = f", seed {row['seed']}" if row.get("seed") else ""
    return (
        f"<td title='{html.escape(prompt, quote=True)}'>{html.escape(_truncate(prompt)) or '<i>no prompt</i>'}"
        f"<div class='file'>{html.escape(name)}{html.escape(seed)}</div></td>"
    )


def images_section(runs: Sequence[ReportRun], names: Sequence[str], max_images: int, title: str = "<h2>Images</h2>") -> str:
    """Same prompt and seed side by side: one row per image file name, one column per run."""
    shown = names[:max_images]
    head = "<tr><th>prompt / image</th>" + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs) + "</tr>"
    body = "".join("<tr>" + _row_label(runs, n) + "".join(_image_cell(r, n) for r in runs) + "</tr>" for n in shown)
    note = f"{len(shown)} of the {len(names)} images the runs have in common (same file name: same prompt and seed)."
    if len(runs) == 1:
        note = f"{len(shown)} of the run's {len(names)} images."
    return f"{title}<p>{note}</p><table class='compare'><thead>{head}</thead><tbody>{body}</tbody></table>"


def is_attack_run(run: ReportRun) -> bool:
    """Whether a run folder was written by `rece attack`."""
    return run.manifest.get("format") == ATTACK_FORMAT


def attack_row(run: ReportRun) -> list:
    """One row of the attacks table: attack, method, concepts, parameters, detector, ASR (images and prompts)."""
    attack = run.manifest.get("attack") or {}
    asr = (run.metrics.get("asr") or {}).get("summary", {})
    methods = ", ".join(e.get("method", "?") for e in run.manifest.get("edits") or []) or "none (original model)"
    params = attack.get("parameters") or {}
    shown = ", ".join(f"{k} {_param(v)}" for k, v in params.items() if v is not None and not isinstance(v, (dict, list)))
    return [
        run.name,
        attack.get("name", "none (prompts)"),
        methods,
        ", ".join(attack.get("concepts") or []) or "-",
        shown or "-",
        attack.get("detector") or (run.metrics.get("asr") or {}).get("params", {}).get("detector") or "-",
        format_value(asr.get("asr %"), "asr %"),
        format_value(asr.get("prompt asr %"), "prompt asr %"),
    ]


def attacks_section(runs: Sequence[ReportRun]) -> str:
    """Attack success rate per attack and method, side by side (one row per run); '' when no run is an attack or has an ASR."""
    rows = [attack_row(r) for r in runs if is_attack_run(r) or "asr" in r.metrics]
    if not rows:
        return ""
    header = ["run", "attack", "method", "concepts", "parameters", "detector", "ASR %", "prompt ASR %"]
    note = "<p>ASR: share of images showing the erased concept (prompt ASR: of attacked prompts with at least one); " + (
        "measure runs with <code>rece evaluate RUN_DIR</code>.</p>"
    )
    return "<h2>Attacks</h2>" + note + html_table(rows, header).replace("<table>", "<table class='runs'>", 1)


def gallery_section(runs: Sequence[ReportRun], max_images: int, title: str = "<h2>Images</h2>") -> str:
    """Each run's first images in its own row, for attack runs whose cases differ (no file names in common)."""
    body = "".join(
        f"<tr><td>{html.escape(r.name)}</td>" + "".join(_image_cell(r, n) for n in r.images[:max_images]) + "</tr>" for r in runs
    )
    note = "The runs attack different cases, so their images are shown per run (first images of each)."
    return f"{title}<p>{note}</p><table class='compare'><tbody>{body}</tbody></table>"


def group_images(runs: Sequence[ReportRun], max_images: int, title: str) -> str:
    """The images of runs of one prompt set: side by side by file name, or per run for attacks of different cases."""
    shared = set.intersection(*(set(r.images) for r in runs))
    if not shared and all(is_attack_run(r) and r.images for r in runs):
        return gallery_section(runs, max_images, title)
    return images_section(runs, common_images(runs), max_images, title)


def all_images_section(runs: Sequence[ReportRun], max_images: int) -> str:
    """The images section: one part per prompt set (images are paired only within a set)."""
    groups = prompt_set_groups(runs)
    if len(groups) == 1:
        return group_images(runs, max_images, "<h2>Images</h2>")
    parts = [
        group_images(g, max_images, f"<h3>{html.escape(', '.join(r.name for r in g))}: {html.escape(prompt_set_name(g[0]))}</h3>")
        for g in groups
    ]
    return "<h2>Images</h2><p>The runs use different prompt sets: images are compared within each set.</p>" + "".join(parts)


def manifests_section(runs: Sequence[ReportRun]) -> str:
    """Each run's manifest.json, pretty-printed inside a collapsed <details>."""
    blocks = [
        f"<details><summary>{html.escape(r.name)}: {html.escape(str(r.path / 'manifest.json'))}</summary>"
        f"<pre>{html.escape(json.dumps(r.manifest, indent=2, ensure_ascii=False))}</pre></details>"
        for r in runs
    ]
    return "<h2>Manifests</h2>" + "".join(blocks)


def sweep_section(path: Path) -> str:
    """A `rece sweep` folder: what was varied, the trade-off plot and the table of points."""
    record = _read_json(path / "sweep.json", "sweep file")
    if not isinstance(record.get("points"), list) or "settings" not in record:
        raise ReceError(f"{path / 'sweep.json'} is not a rece sweep file; rerun `rece sweep`")
    settings = record["settings"]
    header, rows = sweep_table(record)
    legend = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in SERIES.items())
    intro = (
        f"<p>Model <code>{html.escape(settings['model'])}</code>, concept <b>{html.escape(settings['concept'])}</b>, "
        f"method {html.escape(str(settings['config'].get('method')))}, attack {html.escape(settings['attack'])}, "
        f"{settings['steps']} steps, guidance {settings['guidance']:g}, {settings['images_per_prompt']} image(s) per prompt; "
        f"preservation by {html.escape(settings['preserve_metric'])}.</p><ul>{legend}</ul>"
    )
    plot = ""
    if record["points"]:
        plot = f"<img alt='sweep plot' style='image-rendering:auto' src='{png_data_uri(sweep_plot(record))}'>"
    title = f"<h2>Sweep of {html.escape(settings['parameter'])}: {html.escape(str(path))}</h2>"
    return title + intro + plot + html_table(rows, header)


def build_report(run_dirs: Sequence[str | os.PathLike], max_images: int = REPORT_MAX_IMAGES) -> str:
    """The HTML page comparing run folders: metrics, edits and settings, images side by side, manifests."""
    if not run_dirs:
        raise ReceError("give at least one run folder; `rece report RUN_DIR [RUN_DIR ...] -o report.html`")
    if max_images < 1:
        raise ReceError(f"--max-images must be at least 1 (got {max_images})")
    paths = [Path(p) for p in run_dirs]
    sweeps = [p for p in paths if (p / "sweep.json").is_file()]
    paths = [p for p in paths if p not in sweeps]
    sections = [sweep_section(p) for p in sweeps]
    if not paths:
        return html_page("rece report: sweep " + ", ".join(p.name for p in sweeps), sections, style=REPORT_STYLE)
    runs = [load_report_run(p, n) for p, n in zip(paths, run_labels(paths))]
    images = all_images_section(runs, max_images)
    title = "rece report: " + " vs ".join(r.name for r in runs)
    sections += [metrics_section(runs), attacks_section(runs), edits_section(runs), images, manifests_section(runs)]
    return html_page(title, sections, style=REPORT_STYLE)


def write_report(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike, max_images: int = REPORT_MAX_IMAGES) -> Path:
    """Build the report of `run_dirs` and write it atomically to `output`; return its path."""
    output = check_output_path(output)
    page = build_report(run_dirs, max_images)
    with atomic_file(output) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return output
