"""Caption cleaning, caption filters, image checks and the image transform."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.data.captions import CaptionFilter, clean_caption
from pipeline.data.dedup import later_copies
from pipeline.data.drops import Drop
from pipeline.data.images import ImageTransform, ProcessedImage
from pipeline.data.screen import content_hash
from pipeline.spec.prep import FilterSpec, ImageSpec
from tests.helpers import jpeg_bytes
from tests.data.corpus import huge_png_header, truncated_jpeg


def test_clean_caption_normalises_whitespace_and_unicode():
    assert clean_caption("  a\tred \n\n circle ") == "a red circle"
    assert clean_caption("cafe\u0301") == "caf\u00e9"


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("abc", Drop.CAPTION_TOO_SHORT),
        ("x" * 51, Drop.CAPTION_TOO_LONG),
        ("single", Drop.CAPTION_TOO_FEW_WORDS),
        ("a b c d e f g", Drop.CAPTION_TOO_MANY_WORDS),
        ("buy CHEAP pills now", Drop.CAPTION_BLOCKLISTED),
        ("see www.example.com", Drop.CAPTION_BLOCKLISTED),
        ("a red circle", None),
    ],
)
def test_caption_filter(caption, reason):
    spec = FilterSpec(min_caption_chars=5, max_caption_chars=50, min_caption_words=2,
                      max_caption_words=6, blocklist=["cheap", r"www\.\w+"])
    assert CaptionFilter(spec).check(caption) == reason


def _png(width, height) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 0, 255, 0)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", Drop.IMAGE_EMPTY),
        (b"\xff\xd8\xff\xe0 garbage", Drop.IMAGE_CORRUPT),
        (truncated_jpeg(), Drop.IMAGE_CORRUPT),
        (huge_png_header(), Drop.IMAGE_TOO_MANY_PIXELS),
        (jpeg_bytes(20, 60), Drop.IMAGE_TOO_SMALL),
        (jpeg_bytes(400, 100), Drop.IMAGE_ASPECT_RATIO),
    ],
)
def test_image_drop_reasons(data, reason):
    transform = ImageTransform(FilterSpec(min_side=32, max_aspect_ratio=3.0), ImageSpec(size=32))
    assert transform.process(data) == reason


@pytest.mark.parametrize("reduced_decode", [True, False])
def test_transform_resizes_crops_and_reencodes(reduced_decode):
    source = Image.new("RGB", (640, 480), (10, 200, 10))
    source.paste((200, 10, 10), (0, 0, 80, 480))  # a red band on the far left gets cropped away
    out = io.BytesIO()
    source.save(out, format="JPEG", quality=95)
    transform = ImageTransform(FilterSpec(), ImageSpec(size=64, jpeg_quality=80,
                                                       reduced_decode=reduced_decode))
    result = transform.process(out.getvalue())
    assert isinstance(result, ProcessedImage)
    assert (result.original_width, result.original_height) == (640, 480)
    image = Image.open(io.BytesIO(result.jpeg))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
    red, green, _ = image.getpixel((2, 32))
    assert green > 150 and red < 80


def test_transparent_png_becomes_rgb_on_white():
    result = ImageTransform(FilterSpec(), ImageSpec(size=32)).process(_png(40, 40))
    image = Image.open(io.BytesIO(result.jpeg))
    assert image.mode == "RGB" and min(image.getpixel((16, 16))) > 240


def test_content_hash_modes():
    image = jpeg_bytes(seed=1)
    assert content_hash(image, "a", "image") == content_hash(image, "b", "image")
    assert content_hash(image, "a", "image_caption") != content_hash(image, "b", "image_caption")
    assert content_hash(image, "a", "image") != content_hash(jpeg_bytes(seed=2), "a", "image")


def test_later_copies_keeps_the_earliest_in_corpus_order():
    import pyarrow as pa

    block = pa.table({
        "hash": ["h1", "h2", "h1", "h3", "h1", "h2"],
        "order": [5, 1, 2, 7, 9, 0],
        "shard": ["s5", "s1", "s2", "s7", "s9", "s0"],
        "key": ["k5", "k1", "k2", "k7", "k9", "k0"],
    })
    assert sorted(later_copies(block).column("key").to_pylist()) == ["k1", "k5", "k9"]


def test_driver_and_shuffle_dedup_find_the_same_copies(ray_2cpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.dedup import find_duplicates, load_duplicate_keys
    from pipeline.data.shards import plan_tasks
    from pipeline.io.storage import Location

    sources = [Location.of(str(tmp_path / f"{i}.tar")) for i in range(3)]
    results = []
    for driver_max_rows in (0, 1000):
        out = Location.of(str(tmp_path / f"out{driver_max_rows}"))
        tasks = plan_tasks(sources, out)
        for task in tasks:
            hashes = [f"h{(task.ordinal * 5 + i) % 7}" for i in range(5)]
            rows = {"hash": hashes, "order": [(task.ordinal << 32) | i for i in range(5)],
                    "shard": [task.name] * 5, "key": [f"k{i}" for i in range(5)]}
            (tmp_path / f"out{driver_max_rows}" / "_work" / "index").mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(rows), task.index.url)
        find_duplicates(tasks, out, partitions=3, driver_max_rows=driver_max_rows)
        results.append({task.name: load_duplicate_keys(out, task.name) for task in tasks})
    # 15 samples over 7 hashes: the first 7 in corpus order are kept.
    assert results[0] == results[1] == {"0": set(), "1": {"k2", "k3", "k4"}, "2": {"k0", "k1", "k2", "k3", "k4"}}


def _encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 48), (20, 120, 220)).save(out, format=fmt)
    return out.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 48\n0 0 moveto 48 48 lineto stroke\n"


@pytest.mark.parametrize(
    "data, reason",
    [
        (_encoded("TIFF"), Drop.IMAGE_FORMAT_NOT_ALLOWED),  # a TIFF in a .jpg member
        (_encoded("BMP"), Drop.IMAGE_FORMAT_NOT_ALLOWED),
        (_encoded("GIF"), Drop.IMAGE_FORMAT_NOT_ALLOWED),
        (EPS, Drop.IMAGE_FORMAT_NOT_ALLOWED),  # never handed to Ghostscript
        (b"plain text, no image at all", Drop.IMAGE_CORRUPT),
        (_encoded("PNG")[:60], Drop.IMAGE_CORRUPT),  # an allowed format, cut
    ],
)
def test_only_allowed_image_formats_are_parsed(data, reason):
    assert ImageTransform(FilterSpec(), ImageSpec(size=32)).process(data) == reason


def test_allowed_formats_come_from_the_spec():
    transform = ImageTransform(FilterSpec(image_formats=["jpeg", "bmp"]), ImageSpec(size=32))
    assert isinstance(transform.process(_encoded("BMP")), ProcessedImage)
    assert transform.process(_encoded("PNG")) == Drop.IMAGE_FORMAT_NOT_ALLOWED
    with pytest.raises(ValueError, match="not among the formats Pillow reads"):
        FilterSpec(image_formats=["JPEG", "HEIC-ISH"])
