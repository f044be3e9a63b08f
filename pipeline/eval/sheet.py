"""A sheet of example images with their retrieved and generated captions: HTML (thumbnails
embedded as base64, one self-contained file) and a PNG grid."""

from __future__ import annotations

import base64
import html
import io
import math

from pipeline.io.pictures import png_bytes
from pipeline.io.storage import Location, write_bytes_atomic

_COLUMNS = 4
_CSS = """
body{font-family:sans-serif;margin:20px;background:#fafafa}
h1{font-size:20px} .meta{color:#555;font-size:13px;margin-bottom:14px}
.grid{display:grid;grid-template-columns:repeat(4,230px);gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}
.card img{width:112px;height:112px;image-rendering:pixelated;display:block;margin-bottom:6px}
.ok{color:#13803b} .bad{color:#c0262d} .ref{font-weight:bold} .small{color:#666;font-size:11px}
"""


def example_lines(example: dict) -> list[tuple[str, bool | None]]:
    """The text lines of one example and whether each is right (None: neutral); an example may
    bring its own (``"lines"``: ``[(text, right), ...]``)."""
    if "lines" in example:
        return [(text, ok) for text, ok in example["lines"]]
    lines: list[tuple[str, bool | None]] = [(f"ref: {example['caption']}", None)]
    for rank, hit in enumerate(example.get("retrieved", []), 1):
        lines.append((f"#{rank} {hit['caption']} ({hit['score']:.2f})", hit["correct"]))
    if "itm_match_probability" in example:
        probability = example["itm_match_probability"]
        lines.append((f"ITM match p={probability:.2f}", probability > 0.5))
    for field, label in (("generated", "greedy"), ("beam_generated", "beam")):
        if field in example:
            lines.append((f"{label}: {example[field]}", example[f"{field}_exact_match"]))
    return lines


def write_sheet(examples: list[dict], images: dict[str, bytes], folder: Location, title: str,
                subtitle: str) -> dict[str, str]:
    """Write ``sheet.html`` and ``sheet.png`` into ``folder``; returns their URLs.

    Args:
        examples: From :func:`pipeline.eval.summary.examples`.
        images: JPEG bytes by sample key.
        folder: Output folder (local or ``s3://``).
        title: Heading.
        subtitle: A line of headline metrics.
    """
    html_location, png_location = folder.child("sheet.html"), folder.child("sheet.png")
    write_bytes_atomic(html_location, _html(examples, images, title, subtitle).encode())
    write_bytes_atomic(png_location, _png(examples, images, title, subtitle))
    return {"html": html_location.url, "png": png_location.url}


def _html(examples: list[dict], images: dict[str, bytes], title: str, subtitle: str) -> str:
    cards = []
    for example in examples:
        data = base64.b64encode(images[example["key"]]).decode()
        lines = "".join(
            f'<div class="{_css_class(ok)}">{html.escape(text)}</div>' for text, ok in example_lines(example)
        )
        cards.append(f'<div class="card"><img src="data:image/jpeg;base64,{data}">{lines}'
                     f'<div class="small">{html.escape(example["key"])}</div></div>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class='meta'>{html.escape(subtitle)}</div><div class='grid'>{''.join(cards)}</div>"
            "</body></html>")


def _css_class(ok: bool | None) -> str:
    return "ref" if ok is None else "ok" if ok else "bad"


def _png(examples: list[dict], images: dict[str, bytes], title: str, subtitle: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    # Inches: each cell is a square image with room for its caption lines underneath.
    cell, image, text, header = 3.2, 2.3, 1.1, 0.8
    rows = max(1, math.ceil(len(examples) / _COLUMNS))
    width, height = cell * _COLUMNS, header + rows * (image + text)
    figure = plt.figure(figsize=(width, height), dpi=90)
    figure.suptitle(f"{title}\n{subtitle}", fontsize=10, y=1 - 0.15 / height)
    line = 0.16 / image  # one text line, in axes units
    for index, example in enumerate(examples):
        row, column = divmod(index, _COLUMNS)
        top = height - header - row * (image + text)
        axis = figure.add_axes(((column * cell + 0.3) / width, (top - image) / height,
                                image / width, image / height))
        axis.axis("off")
        axis.imshow(Image.open(io.BytesIO(images[example["key"]])).convert("RGB"))
        for number, (label, ok) in enumerate(example_lines(example)):
            colour = "black" if ok is None else "#13803b" if ok else "#c0262d"
            axis.text(0.0, -0.03 - line * number, label, transform=axis.transAxes, fontsize=8,
                      color=colour, va="top", weight="bold" if ok is None else "normal")
    return png_bytes(figure)
