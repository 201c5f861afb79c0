"""`rece robustness`: the whole attack matrix in one command.

For each concept it erases with each method (the shapes models' own recipe, `toy.door.recipe_for`; any other model
the concept word with `rece erase` defaults), runs every chosen attack on each edit and on the unedited model
(method `none`, the baseline), measures what the prompts naming the concept still show and what the others keep
(shapes models), and writes DIR/robustness.csv (long form: model, concept, method, measure, value, images) and
DIR/robustness.html (one table per model). Every measurement is a run folder of its own under DIR
(DIR/CONCEPT/METHOD/...), and DIR/robustness.json records the settings and each finished measurement: a rerun with
the same settings skips what is done and resumes what is not; other settings are refused unless `overwrite`.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .attacks import ATTACKS, attack_module, make_params, run_attack
from .config import EraseConfig
from .console import progress_bar
from .erase import erase
from .errors import ReceError
from .generate import generate_run
from .io import atomic_file, run_folder_lock
from .metrics import evaluate
from .metrics.shapes import shapes_detections
from .models import BaseModel, load_model
from .pictures import html_page, html_table
from .prompt_sets import resolve_prompt_set
from .provenance import file_sha256, utc_now
from .robustness_params import (
    DERIVED_IMAGES,
    FROM_UCE,
    METHODS,
    OTHER_IMAGES,
    PRESERVATION,
    PRESERVATION_GROUP,
    QUICK_ATTACKS,
    QUICK_IMAGES,
    SHAPES_ATTACKS,
    SHAPES_IMAGES,
    RobustnessConfig,
    attack_names,
    attack_overrides,
    chosen_attacks,
    erase_overrides,
)
from .runs import check_output_folder, load_run, write_csv, write_json
from .sampling import sampling_for
from .sweep import write_prompt_rows
from .toy import door

CSV_FILE, HTML_FILE, RECORD_FILE = "robustness.csv", "robustness.html", "robustness.json"
FORMAT = "rece-robustness"
HEADER = ("model", "concept", "method", "measure", "value", "images")
BASELINE = "none"  # the unedited model's rows


def attack_settings(model, config: RobustnessConfig, attacks: list[str]) -> dict[str, dict]:
    """Each attack's parameters: the matrix's (shapes or --quick), then --attack-param; checked by its Params."""
    overrides = attack_overrides(config.attack_param)
    for name in overrides:
        if name not in attacks:
            raise ReceError(f"--attack-param names '{name}', which is not among the attacks run ({', '.join(attacks)})")
    base = QUICK_ATTACKS if config.quick else SHAPES_ATTACKS if door.is_shapes_model(model) else {}
    settings = {}
    for name in attack_names():  # every attack's, so that a rerun may add attacks to a folder
        registered = "derived" if name == FROM_UCE else name
        settings[name] = {**base.get(registered, {}), **overrides.get(name, {})}
        if name == FROM_UCE and "derive_from" in settings[name]:
            raise ReceError("derived-from-uce derives c′ against the UCE edit; --attack-param cannot set its derive_from")
        make_params(registered, **settings[name])
    return settings


def check_config(model, config: RobustnessConfig) -> list[str]:
    """Every option before anything loads; returns the attacks to run."""
    if not config.concepts:
        raise ReceError("no concept to measure; pass --concept C (repeatable)")
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise ReceError(f"unknown method '{unknown[0] if unknown else ''}'; choose from: {', '.join(METHODS)}")
    if config.images is not None and config.images < 1:
        raise ReceError(f"--images must be at least 1 (got {config.images})")
    attacks = chosen_attacks(config.attacks)
    if config.erase_option:  # the values too: a bad one is one line now, not an error after the baseline's images
        EraseConfig.create(["x"], **erase_overrides(config.erase_option))
    shapes = door.is_shapes_model(model)
    for concept in config.concepts:
        if shapes and not door.is_world_concept(concept):
            raise ReceError(
                f"'{concept}' is not a shape or colour of the shapes model; choose from {', '.join(door.world_concepts())}"
            )
    needs_prompts = [a for a in attacks if a in ATTACKS and attack_module(a).NEEDS_PROMPTS]
    if needs_prompts and config.prompts is None and not shapes:
        raise ReceError(f"{', '.join(needs_prompts)} start from prompts; pass --prompts SET naming the concept")
    return attacks


def folder_name(text: str) -> str:
    """A concept or method as a folder name."""
    return re.sub(r"[^\w.-]+", "-", text).strip("-") or "concept"


@dataclass
class Matrix:
    """One robustness run: the model, what is measured, and where."""

    model: object
    config: RobustnessConfig
    attacks: list[str]
    parameters: dict[str, dict]
    output: Path
    base: BaseModel | None = None
    record: dict = field(default_factory=dict)
    edits: dict = field(default_factory=dict)  # (concept, method) → the edit file erased or found by this run

    @property
    def shapes(self) -> bool:
        return door.is_shapes_model(self.model)

    @property
    def images(self) -> int:
        c = self.config
        return c.images or (QUICK_IMAGES if c.quick else SHAPES_IMAGES if self.shapes else OTHER_IMAGES)

    @property
    def methods(self) -> list[str]:
        return [BASELINE, *self.config.methods]

    def settings(self) -> dict:
        """What every number depends on; a rerun with other settings is refused. Each attack's own parameters are kept
        with its results (`finished`), so that attacks can be added to a folder."""
        c = self.config
        prompts = file_sha256(resolve_prompt_set(c.prompts)) if c.prompts is not None else None
        settings = {
            "model": str(self.model), "quick": c.quick, "images_per_prompt": self.images, "steps": c.steps,
            "guidance": c.guidance, "seed": c.seed, "prompts": prompts,
        }  # fmt: skip
        if c.erase_option:  # only when given: folders measured before the option existed stay comparable
            settings["erase_options"] = erase_overrides(c.erase_option)
        return json.loads(json.dumps(settings))

    def sampling(self) -> dict:
        """The keywords generate_run and run_attack share."""
        c = self.config
        return dict(steps=c.steps, guidance=c.guidance, batch_size=c.batch_size, device=c.device,
                    overwrite=c.overwrite, progress=c.progress)  # fmt: skip

    def concept_folder(self, concept: str) -> Path:
        folder = self.output / folder_name(concept)
        folder.mkdir(exist_ok=True)
        return folder

    def prompt_set(self, concept: str, grid: bool = False) -> Path:
        """The prompts naming the concept (shapes: built in; `grid`: every shape × colour, the measure of what is kept)."""
        if not self.shapes:
            return resolve_prompt_set(self.config.prompts)
        rows = door.evaluation_prompt_rows(concept)
        if grid:
            rows = rows + door.evaluation_prompt_rows(concept, kept=True)
            rows = [{**row, "case_number": k} for k, row in enumerate(rows)]
        path = self.concept_folder(concept) / ("prompts-grid.csv" if grid else "prompts-named.csv")
        return write_prompt_rows(path, rows)

    def edit_path(self, concept: str, method: str) -> Path | None:
        """The edit of `method` for `concept`, erased once (None for the baseline)."""
        if method == BASELINE:
            return None
        if (concept, method) not in self.edits:
            path = self.concept_folder(concept) / folder_name(method) / "edit.safetensors"
            if self.config.overwrite or not path.is_file():  # a kill before the rename leaves no file: erased again
                recipe = door.recipe_for(self.model, [concept], method) or {"concepts": [concept]}
                path.parent.mkdir(parents=True, exist_ok=True)
                erase(self.base, method=method, **{**recipe, **erase_overrides(self.config.erase_option)}).save(path)
            self.edits[concept, method] = path
        return self.edits[concept, method]


def refusal(attack: str, base: BaseModel) -> str | None:
    """Why an attack does not run on the model's family (None: it runs)."""
    name = "derived" if attack == FROM_UCE else attack
    families = attack_module(name).FAMILIES
    if families is None or base.family.among(families):
        return None
    return f"the {name} attack does not run on {base.family.title} models"


def attack_run(matrix: Matrix, concept: str, method: str, attack: str) -> Path:
    """Run one attack on one edit (or the unedited model) into its run folder (resumable)."""
    name = "derived" if attack == FROM_UCE else attack
    params = dict(matrix.parameters[attack])
    if attack == FROM_UCE:
        params["derive_from"] = str(matrix.edit_path(concept, "uce"))
    needs_prompts = attack_module(name).NEEDS_PROMPTS
    images = matrix.images if needs_prompts else DERIVED_IMAGES * matrix.images
    folder = matrix.concept_folder(concept) / folder_name(method) / f"attack-{attack}"
    return run_attack(
        matrix.model, matrix.edit_path(concept, method), name, folder,
        prompts=matrix.prompt_set(concept) if needs_prompts else None, concepts=[concept], seed=matrix.config.seed,
        images_per_prompt=images, **matrix.sampling(), **params,
    )  # fmt: skip


def measure_attack(matrix: Matrix, concept: str, method: str, attack: str) -> dict:
    """ASR (%) of one attack, with the concept's detector (`rece evaluate`'s asr metric)."""
    run = attack_run(matrix, concept, method, attack)
    summary = evaluate(run, ["asr"], concept=[concept], progress=False)["asr"]["summary"]
    row = {"measure": f"attack:{attack}", "value": float(summary["asr %"]), "images": len(load_run(run).images)}
    return {"rows": [row]}


def shapes_figures(run_dir: Path, concept: str) -> dict:
    """Counts in a grid run of the shapes model: the named images showing the concept, the others showing their own
    shape (colour when the concept is a colour), every image and the others showing their colour, the named ones
    keeping their colour (their shape when the concept is a colour)."""
    run = load_run(run_dir)
    kind = door.concept_kind(concept)
    names = ("named", "named_shown", "named_coloured", "named_shaped", "others", "others_kept", "others_coloured")
    counts = dict.fromkeys((*names, "all", "coloured"), 0)
    for name, found in shapes_detections(run, progress=False).items():
        color, shape = run.prompts[name]["prompt"].split()[-2:]
        asked = {"shape": shape, "color": color}
        named = asked[kind] == concept
        coloured = found.color == color
        counts["all"] += 1
        counts["coloured"] += coloured
        if named:
            counts["named"] += 1
            counts["named_shown"] += getattr(found, kind) == concept
            counts["named_coloured"] += coloured
            counts["named_shaped"] += found.shape == shape
        else:
            counts["others"] += 1
            counts["others_kept"] += getattr(found, kind) == asked[kind]
            counts["others_coloured"] += coloured
    return counts


def percent(part: float, whole: float) -> float:
    """part as % of whole (0 when whole is 0), to 4 decimals."""
    return round(100.0 * part / whole, 4) if whole else 0.0


def preservation_rows(counts: dict, baseline: dict, concept: str) -> list[dict]:
    """The preservation measures from a grid's counts and the baseline's (`others` relative to the baseline, %).

    `colours` counts every image when a shape is erased ("a blue triangle" must stay blue) and the images of the
    other prompts when a colour is (its own prompts are meant to lose it); `erased_colours` / `erased_shapes` count
    the named prompts keeping their other attribute."""
    kept, kept_before = percent(counts["others_kept"], counts["others"]), percent(baseline["others_kept"], baseline["others"])
    rows = [
        {"measure": "named", "value": percent(counts["named_shown"], counts["named"]), "images": counts["named"]},
        {"measure": "others", "value": percent(kept, kept_before), "images": counts["others"]},
    ]
    if door.concept_kind(concept) == "shape":
        rows.append({"measure": "colours", "value": percent(counts["coloured"], counts["all"]), "images": counts["all"]})
        rows.append({"measure": "erased_colours", "value": percent(counts["named_coloured"], counts["named"]),
                     "images": counts["named"]})  # fmt: skip
    else:
        coloured = percent(counts["others_coloured"], counts["others"])
        rows.append({"measure": "colours", "value": coloured, "images": counts["others"]})
        rows.append({"measure": "erased_shapes", "value": percent(counts["named_shaped"], counts["named"]),
                     "images": counts["named"]})  # fmt: skip
    return rows


def measure_preservation(matrix: Matrix, concept: str, method: str) -> dict:
    """Generate every shape × colour prompt with the edit and count what it shows (shapes models)."""
    edit = matrix.edit_path(concept, method)
    folder = matrix.concept_folder(concept) / folder_name(method) / "grid"
    run = generate_run(matrix.model, matrix.prompt_set(concept, grid=True), folder, edits=[edit] if edit else [],
                       images_per_prompt=matrix.images, **matrix.sampling())  # fmt: skip
    counts = shapes_figures(run, concept)
    baseline = counts if method == BASELINE else matrix.record["results"][key(concept, BASELINE, PRESERVATION_GROUP)]["counts"]
    return {"rows": preservation_rows(counts, baseline, concept), "counts": counts}


def key(concept: str, method: str, group: str) -> str:
    """A finished measurement's key in the record."""
    return f"{concept}\t{method}\t{group}"


def open_record(matrix: Matrix) -> dict:
    """The record to continue: the folder's when made with the same settings, else a new one."""
    path, settings = matrix.output / RECORD_FILE, matrix.settings()
    if path.is_file() and not matrix.config.overwrite:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReceError(f"cannot read {path} ({exc}); delete it or pass --overwrite") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ReceError(f"{path} is not a rece robustness record; use another -o folder or pass --overwrite")
        if shared_settings(record.get("settings")) != settings:
            raise ReceError(f"'{matrix.output}' was measured with other settings; use another -o folder or pass --overwrite")
        return record
    if not path.is_file() and matrix.output.is_dir() and any(matrix.output.iterdir()) and not matrix.config.overwrite:
        raise ReceError(f"'{matrix.output}' exists and is not a rece robustness folder; choose another -o or pass --overwrite")
    return {"format": FORMAT, "settings": settings, "created": utc_now(), "results": {}, "not_run": {}}


def shared_settings(settings) -> dict | None:
    """A record's settings without the attack parameters older records kept among them."""
    if not isinstance(settings, dict):
        return None
    return {k: v for k, v in settings.items() if k != "attack_parameters"}


def finished(matrix: Matrix, concept: str, method: str, group: str) -> bool:
    """Whether the record has this measurement; an attack measured with other parameters is refused in one line."""
    result = matrix.record["results"].get(key(concept, method, group))
    if result is None or group == PRESERVATION_GROUP:
        return result is not None
    attack = group.removeprefix("attack:")
    used = result.get("parameters", matrix.record["settings"].get("attack_parameters", {}).get(attack))
    if used != json.loads(json.dumps(matrix.parameters[attack])):
        raise ReceError(
            f"'{matrix.output}' measured {attack} with other parameters ({used}); use another -o folder or pass --overwrite"
        )
    return True


def groups(matrix: Matrix) -> list[str]:
    """What is measured on every edit, in order (preservation first: `others` needs the baseline's)."""
    return ([PRESERVATION_GROUP] if matrix.shapes else []) + [f"attack:{a}" for a in matrix.attacks]


def measure_all(matrix: Matrix) -> None:
    """Every (concept, method, measurement) not yet in the record, saving the record after each one."""
    record, path = matrix.record, matrix.output / RECORD_FILE
    todo = [(c, m, g) for c in matrix.config.concepts for m in matrix.methods for g in groups(matrix)]
    done = {cell for cell in todo if finished(matrix, *cell)}  # other parameters refused before any work
    with progress_bar(total=len(todo), desc="robustness", unit="run", enabled=matrix.config.progress) as bar:
        for concept, method, group in todo:
            bar.set_postfix_str(f"{concept} {method} {group}")
            attack = group.removeprefix("attack:")
            reason = refusal(attack, matrix.base) if group != PRESERVATION_GROUP else None
            if reason is not None:
                record["not_run"][attack] = reason
            elif (concept, method, group) not in done:
                start = time.perf_counter()
                if group == PRESERVATION_GROUP:
                    result = measure_preservation(matrix, concept, method)
                else:
                    result = {**measure_attack(matrix, concept, method, attack), "parameters": matrix.parameters[attack]}
                record["results"][key(concept, method, group)] = {**result, "seconds": round(time.perf_counter() - start, 3)}
                write_outputs(matrix)  # the CSV and page grow with the matrix: a long run can be read while it runs
            write_json(path, record)
            bar.update(1)


def model_label(model) -> str:
    """The model as the CSV and the page name it."""
    return door.shapes_model_name(model) or str(model)


def csv_rows(matrix: Matrix) -> list[dict]:
    """The long-form rows of the matrix asked for, in order; attacks not run have none."""
    rows = []
    for concept in matrix.config.concepts:
        for method in matrix.methods:
            for group in groups(matrix):
                for row in matrix.record["results"].get(key(concept, method, group), {}).get("rows", []):
                    rows.append({"model": model_label(matrix.model), "concept": concept, "method": method, **row})
    return rows


def not_erased(rows: list[dict]) -> list[str]:
    """One sentence per concept × method whose `named` rate did not drop below the unedited model's: an edit that
    erased nothing is said plainly, not left for a reader to spot in the table."""
    named = {(r["model"], r["concept"], r["method"]): r["value"] for r in rows if r["measure"] == "named"}
    out = []
    for (model, concept, method), value in named.items():
        before = named.get((model, concept, "none"))
        if method != "none" and before is not None and value >= before:
            out.append(
                f"{method} erased nothing of '{concept}' from {model}: prompts naming it show it {value:.1f} % of the "
                f"time, {before:.1f} % on the unedited model"
            )
    return out


def html_report(matrix: Matrix, rows: list[dict]) -> str:
    """The page: one table per model, a row per concept × method, a column per preservation figure and per attack."""
    measures = [m for m in PRESERVATION if any(r["measure"] == m for r in rows)] if matrix.shapes else []
    measures += [f"attack:{a}" for a in matrix.attacks]
    not_run = matrix.record["not_run"]
    sections = []
    for model in dict.fromkeys(r["model"] for r in rows) or [model_label(matrix.model)]:
        values = {(r["concept"], r["method"], r["measure"]): r for r in rows if r["model"] == model}
        table = []
        for concept in matrix.config.concepts:
            for method in matrix.methods:
                cells = []
                for m in measures:
                    found = values.get((concept, method, m))
                    not_run_here = m.startswith("attack:") and m.removeprefix("attack:") in not_run
                    cells.append(f"{found['value']:.1f} ({found['images']})" if found else "not run" if not_run_here else None)
                table.append([concept, method, *cells])
        sections.append(f"<h2>{html.escape(model)}</h2>" + html_table(table, ["concept", "method", *measures]))
    reasons = "".join(f"<li>{html.escape(a)}: {html.escape(r)}</li>" for a, r in not_run.items())
    notices = "".join(f"<p><b>{html.escape(text)}.</b></p>" for text in not_erased(rows))
    sections.insert(0, notices)
    named = {**shared_settings(matrix.record["settings"]), "attack_parameters": {a: matrix.parameters[a] for a in matrix.attacks}}
    settings = json.dumps(named, indent=1, ensure_ascii=False)
    sections.append(
        "<p>Values in %, images counted in brackets: named, % of images of prompts naming the concept that show it; "
        "others, the other concepts' detection rate as % of the unedited model's; colours, % of images showing their "
        "prompt's colour (a shape erased: every image; a colour erased: the other prompts' images); erased_colours / "
        "erased_shapes, % of the images of erased prompts that keep their colour / shape; attack:NAME, the "
        "attack's success rate. Method none is the unedited model.</p>"
        + (f"<h2>Not run</h2><ul>{reasons}</ul>" if reasons else "")
        + f"<h2>Settings</h2><pre>{html.escape(settings)}</pre>"
    )
    return html_page("rece robustness", sections)


def write_outputs(matrix: Matrix) -> list[dict]:
    """DIR/robustness.csv and DIR/robustness.html from the record; returns the CSV's rows."""
    rows = csv_rows(matrix)
    write_csv(matrix.output / CSV_FILE, [{**r, "value": round(r["value"], 4)} for r in rows], HEADER)
    with atomic_file(matrix.output / HTML_FILE) as tmp:
        tmp.write_text(html_report(matrix, rows), encoding="utf-8")
    return rows


def run_robustness(model, output: str | os.PathLike, config: RobustnessConfig | None = None, **options) -> list[dict]:
    """Erase, attack and measure MODEL for every concept × method (see the module's docstring); returns the CSV rows.

    `options` are fields of `RobustnessConfig`, over `config`'s."""
    known = {f.name for f in fields(RobustnessConfig)}
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ReceError(f"run_robustness takes no option '{unknown[0]}'; it takes {', '.join(sorted(known))}")
    config = replace(config or RobustnessConfig(), **options)
    once = {name: list(dict.fromkeys(getattr(config, name))) for name in ("concepts", "methods", "attacks")}
    config = replace(config, **once)  # a concept, method or attack named twice is measured once
    attacks = check_config(model, config)
    matrix = Matrix(model, config, attacks, attack_settings(model, config, attacks), check_output_folder(output))
    matrix.output.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(matrix.output):
        matrix.base = load_model(model, config.device or "cpu")
        drawn = sampling_for(model, matrix.base.family, config.steps, config.guidance)
        matrix.config = replace(config, steps=drawn.steps, guidance=drawn.guidance)
        matrix.record = open_record(matrix)
        measure_all(matrix)
        return write_outputs(matrix)
