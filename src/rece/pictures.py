"""Pictures and pages people look at: labelled image grids, line charts and self-contained HTML pages."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def image_grid(images: np.ndarray, rows: int, cols: int, scale: int = 3, pad: int = 2) -> Image.Image:
    """Tile uint8 images [rows*cols, h, w, 3] into one picture, upscaled without smoothing."""
    h, w = images.shape[1:3]
    canvas = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    return canvas


def labelled_panels(
    panels: Sequence[Image.Image],
    titles: Sequence[str],
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    gap: int = 16,
) -> Image.Image:
    """Panels side by side with a title above each and optional row / column labels."""
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((draw_probe.textlength(t) for t in row_labels), default=0)
    label_w = int(label_w) + 8 if row_labels else 0
    title_h = 18 + (14 if col_labels else 0)
    width = label_w + sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = title_h + max(p.height for p in panels)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = label_w
    for panel, title in zip(panels, titles):
        draw.text((x + panel.width // 2 - draw.textlength(title) // 2, 2), title, fill=(0, 0, 0))
        if col_labels:
            step = panel.width / len(col_labels)
            for i, label in enumerate(col_labels):
                draw.text((x + step * i + step / 2 - draw.textlength(label) / 2, 17), label, fill=(90, 90, 90))
        canvas.paste(panel, (x, title_h))
        x += panel.width + gap
    if row_labels:
        step = (height - title_h) / len(row_labels)
        for i, label in enumerate(row_labels):
            draw.text((2, title_h + step * i + step / 2 - 6), label, fill=(90, 90, 90))
    return canvas


SERIES_COLOURS = ((200, 40, 40), (230, 140, 20), (40, 110, 200), (60, 160, 70), (120, 60, 170))


def line_chart(
    x_labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    x_title: str,
    y_title: str = "%",
    y_max: float = 100.0,
    size: tuple[int, int] = (640, 380),
) -> Image.Image:
    """A line chart of a few series over evenly spaced categories (None: no point), y from 0 to `y_max`, legend below."""
    width, height = size
    left, right, top, legend_h = 48, 16, 12, 18 * len(series) + 34
    bottom = height - legend_h
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for tick in range(0, 101, 20):
        y = bottom - (bottom - top) * tick / 100
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        label = f"{y_max * tick / 100:g}"
        draw.text((left - 6 - draw.textlength(label), y - 6), label, fill=(90, 90, 90))
    draw.line([(left, top), (left, bottom), (width - right, bottom)], fill=(0, 0, 0))
    n = len(x_labels)
    xs = [left + (width - left - right) * (i + 0.5) / max(n, 1) for i in range(n)]
    for x, label in zip(xs, x_labels):
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        draw.text((x - draw.textlength(label) / 2, bottom + 6), label, fill=(0, 0, 0))
    draw.text(((left + width - right) / 2 - draw.textlength(x_title) / 2, bottom + 20), x_title, fill=(0, 0, 0))
    draw.text((4, top - 10), y_title, fill=(90, 90, 90))
    for k, (name, ys) in enumerate(series.items()):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        points = [(x, bottom - (bottom - top) * min(max(y / y_max, 0.0), 1.0)) for x, y in zip(xs, ys) if y is not None]
        width_k = 2 + 3 * (len(series) - 1 - k)  # earlier series drawn wider, so lines on top of each other all show
        if len(points) > 1:
            draw.line(points, fill=colour, width=width_k)
        for x, y in points:
            r = 2 + width_k / 2
            draw.ellipse([(x - r, y - r), (x + r, y + r)], fill=colour)
        ly = bottom + 38 + 18 * k
        draw.line([(left, ly + 6), (left + 24, ly + 6)], fill=colour, width=3)
        draw.text((left + 32, ly), name, fill=(0, 0, 0))
    return canvas


def png_data_uri(image: Image.Image) -> str:
    """A PNG data URI of an image, for self-contained pages."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def html_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """An HTML table of escaped cells (floats with 3 decimals)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    """A table cell as text: None as a dash, floats with 3 decimals."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { image-rendering: pixelated; max-width: 100%; }
code, pre { background: #f4f4f4; padding: 2px 4px; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; }  /* a long line (an edit's preserve list) wraps in the page */
"""


def html_page(title: str, sections: Sequence[str], style: str = "") -> str:
    """A self-contained page (inline CSS, images as data URIs); `style` adds CSS rules."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>"
    )
