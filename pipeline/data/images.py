"""Image checks and the training transform: decode, resize, centre-crop, re-encode as JPEG."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from pipeline.data.drops import Drop
from pipeline.spec.prep import FilterSpec, ImageSpec

# Our own max_pixels check runs on the header before any decoding; PIL's global guard would
# only duplicate it with a warning or an exception of its own.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class ProcessedImage:
    jpeg: bytes
    original_width: int
    original_height: int


class ImageTransform:
    """Checks an encoded image against the filters and turns it into a square JPEG."""

    def __init__(self, filters: FilterSpec, spec: ImageSpec):
        self.filters = filters
        self.spec = spec

    def open(self, data: bytes) -> Image.Image | Drop:
        """The image, opened (its header only) and checked against the filters, or the reason
        the sample is dropped.

        Only the plugins of ``filters.image_formats`` parse the bytes. Whatever a plugin raises
        on a malformed file (Pillow's plugins raise many exception types) drops the sample as
        ``image_corrupt``.
        """
        if not data:
            return Drop.IMAGE_EMPTY
        try:
            image = Image.open(io.BytesIO(data), formats=self.filters.image_formats)
        except Image.UnidentifiedImageError:
            return self._unidentified(data)
        except Exception:
            return Drop.IMAGE_CORRUPT
        drop = self._check_geometry(*image.size)
        return image if drop is None else drop

    def process(self, data: bytes) -> ProcessedImage | Drop:
        """The processed image, or the reason the sample is dropped (see :meth:`open`)."""
        image = self.open(data)
        if isinstance(image, Drop):
            return image
        width, height = image.size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                jpeg = self._transform(image)
        except Exception:
            return Drop.IMAGE_CORRUPT
        return ProcessedImage(jpeg, width, height)

    def _unidentified(self, data: bytes) -> Drop:
        found = sniff_format(data)
        if found is not None and found not in self.filters.image_formats:
            return Drop.IMAGE_FORMAT_NOT_ALLOWED
        return Drop.IMAGE_CORRUPT

    def _check_geometry(self, width: int, height: int) -> Drop | None:
        filters = self.filters
        if width * height > filters.max_pixels:
            return Drop.IMAGE_TOO_MANY_PIXELS
        if min(width, height) < filters.min_side:
            return Drop.IMAGE_TOO_SMALL
        if max(width, height) / min(width, height) > filters.max_aspect_ratio:
            return Drop.IMAGE_ASPECT_RATIO
        return None

    def _transform(self, image: Image.Image) -> bytes:
        size = self.spec.size
        if self.spec.reduced_decode and image.format == "JPEG":
            # draft() picks the largest DCT scale-down that keeps both sides >= the request.
            scale = size / min(image.size)
            image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image = to_rgb(ImageOps.exif_transpose(image))
        image = resize_center_square(image, size)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=self.spec.jpeg_quality)
        return out.getvalue()


def sniff_format(data: bytes) -> str | None:
    """The Pillow format whose magic bytes ``data`` starts with, or None; nothing is parsed
    (only the plugins' prefix checks run)."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a prefix check that does not expect so short a prefix
            continue
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white rather than onto black (what a page shows,
    and what a JPEG copy of a transparent image holds)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_center_square(image: Image.Image, size: int) -> Image.Image:
    """Resize-shorter-side-then-centre-crop in one step: only the central square is resampled,
    which is what a resize followed by a crop keeps anyway, at a fraction of the work."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so that the shorter side is ``size`` (bicubic), keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size`` x ``size`` square."""
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
