"""Pictures and pages people look at: labelled image grids and self-contained HTML reports."""

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


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def html_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
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
"""


def html_page(title: str, sections: Sequence[str]) -> str:
    """A self-contained page (inline CSS, images as data URIs)."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>"
    )
