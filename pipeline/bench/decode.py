"""The data side of ``qformer bench step``: a synthetic prepared shard to train from, and the
training loader's per-thread image rate next to plain PIL decoding of the same JPEGs."""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.bench.synthetic import photo_like_jpeg
from pipeline.data.batches import InputBuilder
from pipeline.data.prepared import IMAGE, TOKEN_COLUMNS, TextKind, fixed_list, output_schema
from pipeline.spec.prep import ImageSpec
from pipeline.train.loader import sample_rng

_ROW_GROUP_ROWS = 64


@dataclass(frozen=True)
class TextShape:
    """Token ids of one text kind: their padded length and the vocabulary they come from."""

    length: int
    vocab_size: int


def synthetic_images(count: int, *, seed: int = 0) -> list[bytes]:
    """``count`` distinct square JPEGs as ``qformer prep`` writes them by default (its output
    size and JPEG quality)."""
    image = ImageSpec()
    rng = np.random.default_rng(seed)
    return [photo_like_jpeg(rng, image.size, image.size, image.jpeg_quality) for _ in range(count)]


def write_shard(path: Path, images: list[bytes], rows: int, texts: dict[TextKind, TextShape],
                *, seed: int = 0) -> Path:
    """A prepared shard (the columns of :func:`pipeline.data.prepared.output_schema`) of ``rows``
    samples cycling through ``images``, with random token ids at full length: the model's work
    depends on the lengths, not on which tokens they are.
    """
    rng = np.random.default_rng(seed)
    schema = output_schema(texts["qformer"].length, texts["llm"].length)
    columns = {
        "key": [f"{i:09d}" for i in range(rows)],
        "source": ["synthetic"] * rows,
        "caption": ["synthetic"] * rows,
        IMAGE: [images[i % len(images)] for i in range(rows)],
        "original_width": [ImageSpec().size] * rows,
        "original_height": [ImageSpec().size] * rows,
        "metadata": ["{}"] * rows,
    }
    for kind, shape in texts.items():
        ids, mask = TOKEN_COLUMNS[kind]
        columns[ids] = fixed_list(rng.integers(0, shape.vocab_size, (rows, shape.length)), shape.length, pa.int32())
        columns[mask] = fixed_list(np.ones((rows, shape.length), np.int8), shape.length, pa.int8())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=_ROW_GROUP_ROWS)
    return path


@dataclass(frozen=True)
class DecodeRates:
    """Single-threaded images/s over the same JPEGs.

    Attributes:
        jpeg_side: Side of the prepared JPEGs.
        output_side: Side of the loader's output (the vision tower's image size).
        images: Distinct JPEGs timed.
        plain_pil: ``Image.open(...).convert("RGB")`` alone: the decode ceiling.
        loader: The training loader's per-sample work: decode, random resized crop, flip,
            normalised float tensor (``pipeline.data.batches.InputBuilder``, augmenting).
    """

    jpeg_side: int
    output_side: int
    images: int
    plain_pil: float
    loader: float

    @property
    def loader_fraction(self) -> float:
        """The loader's rate as a fraction of plain decoding."""
        return self.loader / self.plain_pil

    def threads_needed(self, samples: int, seconds: float) -> int:
        """Decode threads that produce ``samples`` images in ``seconds`` at the loader's rate."""
        return max(1, math.ceil(samples / seconds / self.loader))


def decode_rates(rows: pa.Table, builder: InputBuilder, *, seconds: float = 0.5) -> DecodeRates:
    """Time plain PIL decoding and the loader's batch builder on ``rows``, one thread each.

    Args:
        rows: Prepared rows (images and the builder's token columns), each JPEG distinct.
        builder: The loader's input builder (``LoaderConfig.input_builder()``), augmenting.
        seconds: Time each for at least this long, in whole passes over ``rows``, taking turns.
    """
    jpegs = rows.column(IMAGE).to_pylist()

    def plain() -> None:
        for data in jpegs:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")

    def loader() -> None:
        # As the loader's decode threads do per batch: a generator per sample, then the builder.
        builder(rows, [sample_rng(0, 0, position) for position in range(rows.num_rows)])

    with Image.open(io.BytesIO(jpegs[0])) as first:
        side = first.width
    plain_s, loader_s = _interleaved(plain, loader, seconds)
    return DecodeRates(jpeg_side=side, output_side=builder.transform.image_size, images=len(jpegs),
                       plain_pil=len(jpegs) / plain_s, loader=len(jpegs) / loader_s)


def _interleaved(first, second, seconds: float) -> tuple[float, float]:
    """Seconds per call of each, alternating calls until each has run ``seconds`` in all, so
    that a machine growing busier or quieter meanwhile skews both alike."""
    spent, calls = [0.0, 0.0], 0
    while min(spent) < seconds:
        for index, work in enumerate((first, second)):
            started = time.perf_counter()
            work()
            spent[index] += time.perf_counter() - started
        calls += 1
    return spent[0] / calls, spent[1] / calls
