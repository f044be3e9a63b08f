"""Helpers of the data tests: real demo images and the variants a near-duplicate search must find."""

from __future__ import annotations

import io
import json

from PIL import Image

from pipeline.data.demo_corpus import derive_captions, easy_vqa_dir


def demo_images(count: int | None = None) -> tuple[list[Image.Image], list[tuple[str, str]]]:
    """The easy-VQA train images that have a caption, and their (colour, shape)."""
    folder = easy_vqa_dir() / "train"
    captions = derive_captions(json.loads((folder / "questions.json").read_text()))
    ids = list(captions)[:count]
    return [Image.open(folder / "images" / f"{i}.png").convert("RGB") for i in ids], [captions[i] for i in ids]


def variants(image: Image.Image) -> dict[str, Image.Image]:
    """Resized to 80%, re-encoded at JPEG quality 60, cropped by 5% (centred), flipped."""
    width, height = image.size
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=60)
    cut_w, cut_h = round(width * 0.05), round(height * 0.05)
    return {
        "resized": image.resize((round(width * 0.8), round(height * 0.8)), Image.Resampling.BICUBIC),
        "jpeg60": Image.open(io.BytesIO(encoded.getvalue())).convert("RGB"),
        "cropped": image.crop((cut_w // 2, cut_h // 2, width - (cut_w - cut_w // 2), height - (cut_h - cut_h // 2))),
        "flipped": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }
