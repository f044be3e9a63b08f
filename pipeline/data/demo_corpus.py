"""``qformer demo-corpus``: a small real image-text corpus from the easy-VQA images (PyPI).

Each easy-VQA image shows one coloured shape; its question/answer pairs name the colour and
the shape, from which the caption "a {color} {shape}" is derived. Images for which the pairs do
not name both are left out. Shards are WebDataset tars of ``{key}.jpg``, ``{key}.txt`` and
``{key}.json``, the layout img2dataset writes.

With ``caption_noise``, that fraction of the captions is replaced by a wrong one (the same shape in
another colour, or the same colour on another shape), as web captions are often wrong; the JSON
keeps the true colour and shape and says which captions are wrong (``caption_is_wrong``).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.assets import AssetError
from pipeline.io.storage import Location, atomic_write

log = logging.getLogger("qformer.demo")

COLORS = ("red", "green", "blue", "black", "gray", "teal", "yellow", "brown")
SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_dir() -> Path:
    """The easy-VQA package's data folder.

    Raises:
        AssetError: the package is not installed (exit status 2).
    """
    try:
        import easy_vqa
    except ImportError:
        raise AssetError("the demo corpus needs the easy-VQA images: `pip install --no-deps easy-vqa`") from None
    return Path(easy_vqa.__file__).parent / "data"


def derive_captions(questions: list[list]) -> dict[int, tuple[str, str]]:
    """image id -> (color, shape), from the non-yes/no question/answer pairs that name them."""
    colors: dict[int, str] = {}
    shapes: dict[int, str] = {}
    for question, answer, image_id in questions:
        words = question.rstrip("?").split()
        if answer in COLORS:
            colors[image_id] = answer
            shapes.update({image_id: w for w in words if w in SHAPES})
        elif answer in SHAPES:
            shapes[image_id] = answer
            colors.update({image_id: w for w in words if w in COLORS})
    return {i: (colors[i], shapes[i]) for i in sorted(colors.keys() & shapes.keys())}


def wrong_caption(color: str, shape: str, rng: np.random.Generator) -> tuple[str, str]:
    """Another (colour, shape): either the colour or the shape changed, each half the time."""
    if rng.random() < 0.5:
        return str(rng.choice([c for c in COLORS if c != color])), shape
    return color, str(rng.choice([s for s in SHAPES if s != shape]))


def write_demo_corpus(
    out: str, samples: int | None = None, shard_size: int = 500, split: str = "train",
    caption_noise: float = 0.0, noise_seed: int = 0,
) -> list[str]:
    """Write the corpus as ``out/{00000..}.tar``; returns the shard URLs written.

    Args:
        out: output folder (local or ``s3://``).
        samples: how many samples (default: every usable image of the split).
        shard_size: samples per shard.
        split: ``train`` (about 2,800 usable images) or ``test`` (about 700).
        caption_noise: fraction of the captions replaced by a wrong one (each image's draw
            seeded by ``noise_seed`` and its id).
        noise_seed: seeds which captions are wrong, and how.
    """
    if not 0.0 <= caption_noise <= 1.0:
        raise ValueError(f"caption_noise must be in [0, 1], not {caption_noise}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    data = easy_vqa_dir() / split
    captions = derive_captions(json.loads((data / "questions.json").read_text()))
    ids = list(captions)[:samples] if samples is not None else list(captions)
    if samples is not None and samples > len(ids):
        log.warning("the %s split has only %d usable images; writing %d", split, len(ids), len(ids))
    folder = Location.of(out)
    written = []
    for shard, start in enumerate(range(0, len(ids), shard_size)):
        target = folder.child(f"{shard:05d}.tar")
        with atomic_write(target) as handle, tarfile.open(fileobj=handle, mode="w") as archive:
            for image_id in ids[start : start + shard_size]:
                color, shape = captions[image_id]
                key = f"{split}{image_id:09d}"
                rng = np.random.default_rng([noise_seed, image_id])
                wrong = bool(rng.random() < caption_noise)
                said_color, said_shape = wrong_caption(color, shape, rng) if wrong else (color, shape)
                _add(archive, f"{key}.jpg", _as_jpeg(data / "images" / f"{image_id}.png"))
                _add(archive, f"{key}.txt", f"a {said_color} {said_shape}".encode())
                meta = {"image_id": image_id, "split": split, "color": color, "shape": shape}
                if caption_noise:
                    meta["caption_is_wrong"] = wrong
                _add(archive, f"{key}.json", json.dumps(meta).encode())
        written.append(target.url)
        log.info("demo-corpus: wrote %s", target.url)
    return written


def _as_jpeg(path: Path) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, format="JPEG", quality=95)
    return out.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(data))
