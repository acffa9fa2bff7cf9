"""HTML building blocks of the curation report: tables, SVG histograms and thumbnail grids, all self-contained.

Everything is inlined (CSS, SVG, base64 JPEG thumbnails) so `report/index.html` opens from disk without a server
and without network access. Every piece of text from the data is escaped.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np
from PIL import Image

from curate.sources.decode import DecodeLimits, ImageRejected, decode_rgb

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; margin: 0.3em 0 1em 0; align-items: flex-start; }
figure { margin: 0; width: THUMBpx; } figure img { width: THUMBpx; height: THUMBpx; object-fit: cover;
  border: 2px solid #ddd; display: block; } figure.key img { border-color: #1a7f37; }
figure.bad img { border-color: #cf222e; } figcaption { font-size: 10px; color: #555; overflow-wrap: anywhere; }
.group { margin-bottom: 0.8em; } .group h3 { font-size: 13px; margin: 0.2em 0; font-weight: 600; }
.muted { color: #777; font-size: 12px; } svg text { font-size: 10px; fill: #444; }
"""


@dataclass
class Tile:
    """One image of a grid: its bytes, a caption, a tooltip and a style ("", "key" or "bad")."""

    data: bytes | None
    caption: str
    title: str = ""
    style: str = ""


def page(title: str, body: str, thumb_size: int) -> str:
    """The full HTML document."""
    css = CSS.replace("THUMB", str(thumb_size))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{css}</style></head><body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n")


def section(title: str, content: str, note: str = "") -> str:
    note_html = f"<p class=\"muted\">{escape(note)}</p>" if note else ""
    return f"<section><h2>{escape(title)}</h2>{note_html}\n{content}\n</section>\n"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; numbers are right-aligned."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, int | float | np.integer | np.floating):
                cells.append(f"<td class=\"num\">{_fmt(v)}</td>")
            else:
                cells.append(f"<td>{escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(v: object) -> str:
    if isinstance(v, float | np.floating):
        return f"{float(v):.3f}"
    return f"{int(v):,}"


def histogram_svg(values: np.ndarray, bins: int | Sequence[float], title: str, xlabel: str,
                  marker: float | None = None, marker_label: str = "", log_y: bool = False,
                  width: int = 560, height: int = 200) -> str:
    """An SVG bar histogram of `values` with an optional vertical marker (e.g. a threshold)."""
    values = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(values[np.isfinite(values)], bins=bins)
    return counts_svg(counts, edges, title, xlabel, marker, marker_label, log_y, width, height)


def counts_svg(counts: np.ndarray, edges: np.ndarray, title: str, xlabel: str, marker: float | None = None,
               marker_label: str = "", log_y: bool = False, width: int = 560, height: int = 200) -> str:
    """`histogram_svg` of counts already binned (`edges`: one more than the counts), e.g. summed over partitions;
    a note instead when no value fell in a bin."""
    if counts.sum() == 0:
        return f"<p class=\"muted\">{escape(title)}: no values.</p>"
    left, bottom, top, right = 48, 30, 22, 10
    pw, ph = width - left - right, height - top - bottom
    heights = np.log10(counts + 1.0) if log_y else counts.astype(np.float64)
    scale = ph / max(heights.max(), 1e-9)
    x0, x1 = float(edges[0]), float(edges[-1])
    span = max(x1 - x0, 1e-12)

    def x_of(v: float) -> float:
        return left + (v - x0) / span * pw

    parts = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" role=\"img\">",
             f"<title>{escape(title)}</title>",
             f"<text x=\"{left}\" y=\"14\" style=\"font-size:12px;font-weight:600\">{escape(title)}</text>"]
    for c, h, a, b in zip(counts, heights, edges[:-1], edges[1:], strict=True):
        if c == 0:
            continue
        bar_h = h * scale
        bar_w = max(x_of(b) - x_of(a) - 1, 1)
        parts.append(f"<rect x=\"{x_of(a):.1f}\" y=\"{top + ph - bar_h:.1f}\" width=\"{bar_w:.1f}\" "
                     f"height=\"{bar_h:.1f}\" fill=\"#4e79a7\"><title>[{a:.3g}, {b:.3g}): {c}</title></rect>")
    parts.append(f"<line x1=\"{left}\" y1=\"{top + ph}\" x2=\"{left + pw}\" y2=\"{top + ph}\" stroke=\"#888\"/>")
    for v in np.linspace(x0, x1, 6):
        parts.append(f"<text x=\"{x_of(v):.1f}\" y=\"{top + ph + 13}\" text-anchor=\"middle\">{v:.3g}</text>")
    ymax = int(counts.max())
    parts.append(f"<text x=\"{left - 4}\" y=\"{top + 8}\" text-anchor=\"end\">{ymax:,}</text>")
    parts.append(f"<text x=\"{left - 4}\" y=\"{top + ph}\" text-anchor=\"end\">0</text>")
    parts.append(f"<text x=\"{left + pw / 2}\" y=\"{height - 3}\" text-anchor=\"middle\">"
                 f"{escape(xlabel)}{' (log count)' if log_y else ''}</text>")
    if marker is not None and x0 <= marker <= x1:
        xm = x_of(marker)
        parts.append(f"<line x1=\"{xm:.1f}\" y1=\"{top}\" x2=\"{xm:.1f}\" y2=\"{top + ph}\" stroke=\"#cf222e\" "
                     "stroke-dasharray=\"4,3\"/>")
        parts.append(f"<text x=\"{xm + 3:.1f}\" y=\"{top + 10}\" style=\"fill:#cf222e\">{escape(marker_label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def thumbnail_uri(data: bytes | None, size: int, limits: DecodeLimits) -> str | None:
    """A `data:image/jpeg;base64,...` thumbnail (longest side `size`), or None when the bytes do not decode."""
    if not data:
        return None
    try:
        img = decode_rgb(data, limits)
    except ImageRejected:
        return None
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def grid(tiles: Sequence[Tile], size: int, limits: DecodeLimits) -> str:
    """A row of thumbnails with captions; tiles whose bytes do not decode show their caption only."""
    figures = []
    for t in tiles:
        uri = thumbnail_uri(t.data, size, limits)
        img = f"<img src=\"{uri}\" alt=\"{escape(t.caption)}\" loading=\"lazy\">" if uri else \
            f"<div class=\"muted\" style=\"height:{size}px\">no preview</div>"
        cls = f" class=\"{t.style}\"" if t.style else ""
        figures.append(f"<figure{cls} title=\"{escape(t.title)}\">{img}<figcaption>{escape(t.caption)}"
                       "</figcaption></figure>")
    return f"<div class=\"grid\">{''.join(figures)}</div>"


def group(title: str, body: str) -> str:
    return f"<div class=\"group\"><h3>{escape(title)}</h3>{body}</div>"
