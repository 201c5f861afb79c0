"""Render a `rece report` page in headless Chromium and save a screenshot, to check by eye that it reads well.

    python bench/check_report_render.py report.html -o report.png [--chromium chromium] [--size 1200,1600]

Chromium is the Debian package `chromium` (`apt-get install -y chromium`). It runs with a fresh profile in a
temporary folder, no sandbox, no GPU and no network activity of its own; the page is self-contained, so nothing
is fetched. Exits non-zero when Chromium fails or writes no screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium(name: str | None) -> str:
    """The Chromium executable: `name` if given, else the first of CHROMIUM_NAMES on PATH."""
    for candidate in [name] if name else CHROMIUM_NAMES:
        path = shutil.which(candidate)
        if path:
            return path
    sys.exit(f"error: no Chromium found ({name or ', '.join(CHROMIUM_NAMES)}); install it with `apt-get install -y chromium`")


def render(page: Path, screenshot: Path, chromium: str, size: str, timeout: float) -> subprocess.CompletedProcess:
    """Run headless Chromium on `page` with a fresh profile and write a PNG screenshot."""
    with tempfile.TemporaryDirectory(prefix="rece-chromium-") as profile:
        cmd = [
            chromium,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={screenshot.resolve()}",
            f"--window-size={size}",
            page.resolve().as_uri(),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="report.html to render")
    parser.add_argument("-o", "--output", type=Path, default=None, help="screenshot PNG (default: PAGE with .png)")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: found on PATH)")
    parser.add_argument("--size", default="1200,1600", help="window size WIDTH,HEIGHT (1200,1600)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up (120)")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        sys.exit(f"error: '{args.page}' does not exist; write one with `rece report RUN_DIR ... -o report.html`")
    output = args.output or args.page.with_suffix(".png")
    output.unlink(missing_ok=True)
    result = render(args.page, output, find_chromium(args.chromium), args.size, args.timeout)
    if result.returncode != 0 or not output.is_file() or output.stat().st_size == 0:
        tail = "\n".join((result.stderr or "").strip().splitlines()[-5:])
        sys.exit(f"error: chromium exited {result.returncode} without a screenshot:\n{tail}")
    from PIL import Image

    with Image.open(output) as img:
        print(f"wrote {output} ({img.width}×{img.height}) from {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
