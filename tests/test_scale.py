"""Many concepts in one edit: exact against the plain transcription, a memory estimate before any work, progress on
stderr, and the preservation report (preserved and held-out texts' K/V change)."""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rece
from rece import budget, console
from rece import closed_form as cf
from rece.cli import main
from rece.config import EraseConfig
from rece.edit import load_edit
from rece.tiny import DEFAULT_WORDS

from .reference import reference_erase
from .test_erase import _encode_fns, _max_rel_error

NAMES = [f"{a} {b}" for a, b in itertools.product(DEFAULT_WORDS[17:29], DEFAULT_WORDS[29:34])]  # 60 two-word texts


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_sixty_concepts_match_the_plain_transcription(base, method, monkeypatch):
    """60 concepts (4,500 erased rows, 70× d): the dense accumulated updates, the chunked derivation (small chunks
    forced) and the " " rows counted once with their weight give the paper's procedure."""
    monkeypatch.setattr(rece.closed_form, "CHUNK_ROWS", 1000)
    concepts, preserve = NAMES[:60], ["a photo of a dog"]
    edit = rece.erase(base, concepts, preset="art", method=method, preserve=preserve)
    encode, counts = _encode_fns(base)
    expected = reference_erase(base.kv, encode, counts, concepts, target="art", preserve=preserve, method=method, r=1e-3)
    assert _max_rel_error(edit, base, expected) <= 1e-5


def test_memory_is_estimated_before_any_work(sd_path, tmp_path, capsys, monkeypatch):
    sizes = [budget.erase_bytes(n, 3, 77, 768, 1) for n in (1000, 2000, 3000)]
    assert abs((sizes[2] - sizes[1]) - (sizes[1] - sizes[0])) <= 2  # linear in the concepts
    assert 1.2e9 <= sizes[1] - sizes[0] <= 2e9  # 1,000 concepts' rows and c′ (float64, 77 × 768 each, ×3)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES))
    out = tmp_path / "edit.safetensors"
    need = budget.erase_bytes(len(NAMES), 5, 77, 64, 1)
    monkeypatch.setenv("RECE_MEMORY_LIMIT", str(need // 2))
    called = []
    monkeypatch.setattr(rece.text.PromptEncoder, "encode", lambda *a, **k: called.append(1))
    code = main(["erase", str(sd_path), "--concept-prompts", str(names), "--preset", "art", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not out.exists() and not called
    assert re.search(r"erasing 60 concepts needs about [\d.]+ MB and [\d.]+ MB is allowed by RECE_MEMORY_LIMIT", err)
    assert "split --concept-prompts and erase each part from the previous result" in err


def test_progress_on_stderr_unless_json(sd_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "PROGRESS_DELAY", 0.0)
    out = tmp_path / "edit.safetensors"
    argv = ["erase", str(sd_path), "-c", "cat", "--preset", "nudity", "-o", str(out)]
    assert main(argv) == 0
    assert "encoding texts" not in capsys.readouterr().err  # not a terminal: no bars by default
    rece.erase(sd_path, ["cat"], preset="nudity", progress=True)
    err = capsys.readouterr().err
    assert "encoding texts" in err and "RECE epochs" in err
    assert main([*argv, "--json", "--overwrite"]) == 0
    assert capsys.readouterr().err == ""


def _direct_changes(edit, base, texts):
    """‖W′p − W⁰p‖ / ‖W⁰p‖ over every edited layer, from the weights themselves."""
    new = edit.edited_kv(base.kv)
    out = {}
    for text in texts:
        rows = base.encoder.encode([text])[0]
        num = sum(((new[n].double() - w.double()) @ rows.T).pow(2).sum() for n, w in base.kv.items() if n in new)
        den = sum((w.double() @ rows.T).pow(2).sum() for w in base.kv.values())
        out[text] = (num / den).sqrt().item()
    return out


@pytest.mark.parametrize("technique", ["replace", "tensor"])
def test_preservation_report_in_the_edit_and_info(base, sd_path, tmp_path, capsys, technique):
    check = ["a red cat", "kitten", "a photo of a dog"]
    edit = rece.erase(base, ["cat"], preset="nudity", preserve=["dog"], check=check, technique=technique)
    report = edit.metadata["preservation"]
    direct = _direct_changes(edit, base, ["", "dog", *check])
    assert report["preserved"]["texts"] == 2 and report["check"]["texts"] == 3
    for group, texts in (("preserved", ["", "dog"]), ("check", check)):
        values = {t: v for t, v in report[group]["worst"]}
        for t in texts:
            assert values[t] == pytest.approx(direct[t], rel=1e-4, abs=1e-6)
        assert report[group]["max"] == pytest.approx(max(direct[t] for t in texts), rel=1e-4)
        assert report[group]["mean"] == pytest.approx(sum(direct[t] for t in texts) / len(texts), rel=1e-4)
    checks = tmp_path / "check.txt"
    checks.write_text("\n".join(check))
    path = tmp_path / "edit.safetensors"
    argv = ["erase", str(sd_path), "-c", "cat", "--preserve", "dog", "--check-prompts", str(checks), "-o", str(path)]
    assert main(argv) == 0
    capsys.readouterr()
    assert load_edit(path).metadata["preservation"]["check"]["texts"] == 3
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "preserved     K/V change over 2 texts" in out and "check texts   K/V change over 3 texts" in out


def test_preservation_on_a_two_space_family(tmp_path):
    from rece.tiny_dit import build_tiny_flux

    flux = rece.load_model(build_tiny_flux(tmp_path / "flux"))
    edit = rece.erase(flux, ["cat"], preset="nudity", check=["a red cat"])
    new = edit.edited_kv(flux.kv)
    num = den = 0.0
    for view in flux.spaces:
        rows = view.encoder.encode(["a red cat"])[0]
        for n, w in view.kv.items():
            num += ((new[n].double() - w.double()) @ rows.T).pow(2).sum().item()
            den += (w.double() @ rows.T).pow(2).sum().item()
    assert edit.metadata["preservation"]["check"]["max"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert torch.isfinite(torch.tensor(edit.metadata["preservation"]["preserved"]["max"]))


def test_an_edit_of_many_concepts_can_leave_out_its_derived_embeddings(base, tmp_path):
    full = rece.erase(base, NAMES[:20], preset="art")
    small = rece.erase(base, NAMES[:20], preset="art", derived=False)
    assert len(full.derived) == 1 and full.derived[0].shape[0] == 20 and small.derived == []
    assert torch.equal(full.transform, small.transform)  # the same edit
    a, b = full.save(tmp_path / "full.safetensors"), small.save(tmp_path / "small.safetensors")
    assert b.stat().st_size < a.stat().st_size / 5
    assert load_edit(b).derived == [] and load_edit(b).metadata["config"]["derived"] is False


def test_summary_lines_say_what_they_count(sd_path):
    # one text is "1 text"; preserve has a line of its own (not after the target); '' is counted and said
    text = rece.erase(sd_path, ["cat"], preserve=["dog"], check=["house"]).summary()
    assert "\ntarget        ' '\npreserve      1 text and '' (UCE's default): 'dog'\n" in text
    assert "preserved     K/V change over 2 texts (the preserve texts and ''): mean" in text
    assert "check texts   K/V change over 1 text: mean" in text
    many = [f"a {c} {s} painting" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle", "star")]
    lines = rece.erase(sd_path, ["cat"], preserve=many, preserve_empty=False).summary().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("preserve "))
    assert lines[start].startswith("preserve      12 texts: 'a red circle painting', ")
    assert all(len(line) <= 100 for line in lines if not line.startswith("created"))  # wrapped between the texts
    assert lines[start + 1].startswith(" " * 14 + "'a ") and lines[start + 1].rstrip().endswith(",")
    assert "preserved     K/V change over 12 texts (the preserve texts): mean" in "\n".join(lines)


PEAK_SCRIPT = """
import ctypes, json, os, sys
import torch
torch.set_num_threads(1)
import rece
from rece import budget
from rece.models import load_model

model, n = sys.argv[1], int(sys.argv[2])
check = [f"a photo of {i} cats and {i % 7} dogs" for i in range(n)]
base = load_model(model)
rece.erase(base, ["cat"], method="uce")  # imports, the gram, first-call work: not the erasure's
seen = {}
erase_module = sys.modules["rece.erase"]
def measured_check(base, config):
    seen["estimate"] = budget.estimate_bytes(base, config)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system, so new allocations show in RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
    with open("/proc/self/statm") as f:
        seen["before"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
erase_module.check_memory = measured_check
rece.erase(base, ["cat"], method="rece", check=check)
# the peak RSS of this process's memory (ru_maxrss would also count the parent's size when it forked us)
with open("/proc/self/status") as f:
    seen["peak"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps(seen))
"""


def peaks_added(script_text: str, sd_path, tmp_path) -> dict[int, int]:
    """Peak RSS each erasure in `script_text` adds at 1, 1,000 and 20,000 texts, each in a fresh process; each within
    1.5× of `budget.estimate_bytes`."""
    script = tmp_path / "peak.py"
    script.write_text(script_text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    added = {}
    for n in (1, 1000, 20000):
        done = subprocess.run([sys.executable, str(script), str(sd_path), str(n)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        added[n] = seen["peak"] - seen["before"]
        assert 1 / 1.5 <= seen["estimate"] / added[n] <= 1.5, (n, seen)
    return added


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resetting the peak RSS needs Linux")
def test_check_texts_memory_is_flat_and_estimated(sd_path, tmp_path):
    """Held-out texts are encoded a chunk at a time: what an erasure adds to the process's peak RSS stays flat in
    their number and within 1.5× of `budget.estimate_bytes` (1, 1,000 and 20,000 texts; it grew 4 bytes a byte of
    their rows before, 3.4 GB at 20,000 on tiny SD)."""
    added = peaks_added(PEAK_SCRIPT, sd_path, tmp_path)
    rows = 20000 * 77 * 64 * 8  # one float64 copy of the 20,000 texts' rows
    assert added[20000] < rows / 8 and added[20000] < 2 * added[1000]


PRESERVE = [f"a photo of {i} cats and {i % 7} dogs" for i in range(300)]  # 23,100 rows, 360× d on tiny SD


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("technique", ["replace", "tensor"])
def test_many_preserve_texts_give_the_all_at_once_edit(base, monkeypatch, technique):
    """Preserve texts beyond one chunk are summed a chunk at a time into a d×d factor of their gram: the edit, its
    c′ and the preservation report are those of the rows stacked all at once (to float64 rounding)."""
    from rece.erase import _run_per_layer, _run_shared, _Texts

    kwargs = dict(preset="nudity", preserve=PRESERVE, technique=technique, derived=True)
    at_once = rece.erase(base, ["cat"], **kwargs)  # 300 texts fit one chunk: stacked rows, as before
    monkeypatch.setattr(rece.preservation, "CHECK_CHUNK_BYTES", 8 * 77 * 64 * 40)  # 40 texts a chunk
    chunked = rece.erase(base, ["cat"], **kwargs)
    # the reference: the closed forms on every preserve text's rows, explicitly stacked
    config = EraseConfig.create(["cat"], **kwargs)
    texts = _Texts.encode(base, ["cat", " ", "", *PRESERVE])
    run = _run_shared if technique == "replace" else _run_per_layer
    reference, derived = run(base, config, texts, list(base.kv))
    if technique == "replace":
        assert _relative(chunked.transform, cf.identity_plus(*reference)) < 1e-10
        assert _relative(chunked.transform, at_once.transform) < 1e-10
    else:
        for name, delta in reference.items():
            assert _relative(chunked.deltas[name], delta) < 1e-10
    for a, b in zip(chunked.derived, derived, strict=True):
        assert _relative(a, b) < 1e-10
    ours, theirs = chunked.metadata["preservation"]["preserved"], at_once.metadata["preservation"]["preserved"]
    assert ours["texts"] == theirs["texts"] == 301
    assert ours["mean"] == pytest.approx(theirs["mean"], rel=1e-8) and ours["worst"] == theirs["worst"]


def test_many_preserve_texts_match_the_uce_closed_form(base, monkeypatch):
    """UCE's M from the explicitly stacked rows of '' and the 300 texts, against the chunked erasure."""
    monkeypatch.setattr(rece.preservation, "CHECK_CHUNK_BYTES", 8 * 77 * 64 * 40)
    edit = rece.erase(base, ["cat"], method="uce", preserve=PRESERVE)
    rows = base.encoder.encode(["cat", " ", "", *PRESERVE])
    counts = base.encoder.token_counts(["cat", " "])
    erase_rows, target_rows = cf.uce_token_rows(rows[0], counts[0], rows[1], counts[1])
    stacked = rows[2:].reshape(-1, rows.shape[-1])  # 23,177 rows
    expected = cf.shared_edit_transform(erase_rows, target_rows, stacked, 0.5, 1.0, max(0.1, 1 / 301), "--uce-lamb")
    assert _relative(edit.transform, expected) < 1e-10


def test_row_sum_keeps_few_rows_and_factors_many():
    torch.manual_seed(0)
    total = cf.RowSum(8)
    few = torch.randn(5, 8, dtype=torch.float64)
    total.add(few)
    assert torch.equal(total.rows(), few)  # at most d rows: the rows themselves
    more = [torch.randn(7, 8, dtype=torch.float64) for _ in range(3)]
    for rows in more:
        total.add(rows)
    stacked = torch.cat([few, *more])
    factor = total.rows()
    assert factor.shape == (8, 8) and _relative(factor.T @ factor, stacked.T @ stacked) < 1e-13
    singular = cf.RowSum(8)
    singular.add(torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64))  # rank 3
    factor = singular.rows()
    assert torch.isfinite(factor).all() and _relative(factor.T @ factor, singular.gram) < 1e-13


PRESERVE_PEAK_SCRIPT = PEAK_SCRIPT.replace(
    'check = [f"a photo of {i} cats and {i % 7} dogs" for i in range(n)]',
    'preserve = [f"a photo of {i} cats and {i % 7} dogs" for i in range(n)]',
).replace('rece.erase(base, ["cat"], method="rece", check=check)', 'rece.erase(base, ["cat"], method="rece", preserve=preserve)')


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resetting the peak RSS needs Linux")
def test_preserve_texts_memory_is_flat_and_estimated(sd_path, tmp_path):
    """Preserve texts beyond one chunk are encoded and summed a chunk at a time: what an erasure adds to the peak RSS
    stays flat in their number and within 1.5× of `budget.estimate_bytes` (1, 1,000 and 20,000 texts; 20,000 added
    3.4 GB on tiny SD when they were encoded and stacked all at once)."""
    assert PRESERVE_PEAK_SCRIPT.count("preserve=preserve") == 1
    added = peaks_added(PRESERVE_PEAK_SCRIPT, sd_path, tmp_path)
    rows = 20000 * 77 * 64 * 8  # one float64 copy of the 20,000 texts' rows
    # measured: 1,000 texts add about 80 MB; 20,000 add 87 to 116 MB from run to run (a small per-text part remains, a
    # few % of their rows), where encoding them all at once added 3.4 GB
    assert added[20000] < rows / 6 and added[20000] < 1.5 * added[1000]


@pytest.mark.parametrize("family", ["flux-schnell", "pixart"])
def test_many_preserve_texts_at_several_lengths_and_masked(tmp_path, monkeypatch, family):
    """FLUX.1 [schnell] (each text's rows at 256 and 512 joined, two spaces) and PixArt (padding masked): preserve texts
    summed one per chunk give the edit and the report of the texts stacked at once."""
    from rece.tiny_dit import build_tiny_flux, build_tiny_pixart

    path = build_tiny_flux(tmp_path / "m", schnell=True) if family == "flux-schnell" else build_tiny_pixart(tmp_path / "m")
    base = rece.load_model(path)
    preserve = PRESERVE[:60]
    at_once = rece.erase(base, ["cat"], preset="nudity", preserve=preserve)
    monkeypatch.setattr(rece.preservation, "CHECK_CHUNK_BYTES", 1)  # one text a chunk
    chunked = rece.erase(base, ["cat"], preset="nudity", preserve=preserve)
    if at_once.kind == "transform":
        assert _relative(chunked.transform, at_once.transform) < 1e-9
    else:
        for name, delta in at_once.deltas.items():
            assert _relative(chunked.deltas[name], delta) < 1e-9
    ours, theirs = chunked.metadata["preservation"]["preserved"], at_once.metadata["preservation"]["preserved"]
    assert ours["texts"] == theirs["texts"] == 61 and ours["mean"] == pytest.approx(theirs["mean"], rel=1e-8)
