"""The README and the documentation site: the site builds with no broken link or anchor, the README's links resolve,
and the facts the README repeats (the fresh-machine commands, the family table) agree with their other homes."""

from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(markdown: str) -> list[str]:
    """The targets of a Markdown text's relative links and images (outside code blocks), without their #anchors."""
    targets = (m.group(1) for m in LINK.finditer(FENCE.sub("", markdown)))
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose target does not exist, relative to the file."""
    return [t for t in relative_links(path.read_text(encoding="utf-8")) if not (path.parent / t).exists()]


def code_blocks(markdown: str) -> list[str]:
    """The contents of a Markdown text's fenced code blocks, in order."""
    return [block.split("\n", 1)[1].rsplit("```", 1)[0].strip() for block in FENCE.findall(markdown)]


def family_table(markdown: str) -> list[str]:
    """The rows of the (first) table under the heading 'What works on each family'."""
    lines = markdown.split("## What works on each family", 1)[1].strip().splitlines()
    return list(itertools.takewhile(lambda line: line.startswith("|"), lines))


def test_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](docs/there.md#part) ![img](docs/gone.png) [web](https://example.com) [anchor](#top)\n"
        '```bash\n[not a link](nowhere.md)\n```\n[gone](docs/missing.md "title")\n'
    )
    assert broken_links(page) == ["docs/gone.png", "docs/missing.md"]


def test_every_relative_link_in_the_readme_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert relative_links(readme), "the README links into docs/"
    assert broken_links(ROOT / "README.md") == []


def test_readme_starts_with_the_fresh_machine_commands_that_ci_runs():
    blocks = code_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    install = 'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[dev]" && .venv/bin/rece demo'
    tests = "HF_HUB_OFFLINE=1 .venv/bin/python -m pytest"
    assert blocks[:2] == [install, tests]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci and 'pip install --quiet torch==2.13.0 -e ".[dev]"' in ci


def test_readme_and_site_show_the_same_family_table():
    readme = family_table((ROOT / "README.md").read_text(encoding="utf-8"))
    index = family_table((ROOT / "docs" / "index.md").read_text(encoding="utf-8"))
    assert len(readme) == 8 and readme == index  # header, rule, six families


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[dev]')")
def test_docs_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    built = [name for name in pages if (site / ("" if name == "index" else name) / "index.html").is_file()]
    assert built == pages  # every page is in the site (mkdocs warns, so --strict fails, on a page left out of nav)
    assert (site / "img" / "demo-triangle.png").is_file()
