"""Matplotlib figures as PNG files (loss curves, benchmark curves, example sheets)."""

from __future__ import annotations

import io

from pipeline.io.storage import Location, write_bytes_atomic


def png_bytes(figure) -> bytes:
    """``figure`` as PNG bytes; the figure is closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def write_png(figure, target: Location) -> None:
    """Write ``figure`` to ``target`` as a PNG, atomically, and close it."""
    write_bytes_atomic(target, png_bytes(figure))
