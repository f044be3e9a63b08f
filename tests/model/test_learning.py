"""A tiny stage-1 model learns ITC, ITM and ITG on real images (easy-VQA shapes)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model import Blip2Pretrainer, build_qformer_tokenizer, image_preprocessing

from .tiny import SHAPES, caption_batch, save_bert, save_vision_tower, tiny_spec

PIXELS = 32
IMAGES_PER_CAPTION = 20
BATCH = 16
STEPS = 600


def _easy_vqa_images() -> dict[str, list[Path]]:
    """Image files by caption "a {color} {shape}", from the training questions' answers."""
    easy_vqa = pytest.importorskip("easy_vqa", reason="needs the easy_vqa package")
    root = Path(easy_vqa.__file__).parent / "data" / "train"
    color, shape = {}, {}
    for question, answer, image_id in json.loads((root / "questions.json").read_text()):
        if question.startswith("what color"):
            color[image_id] = answer
        elif answer in SHAPES:
            shape[image_id] = answer
    by_caption: dict[str, list[Path]] = {}
    for image_id in sorted(color.keys() & shape.keys()):
        by_caption.setdefault(f"a {color[image_id]} {shape[image_id]}", []).append(
            root / "images" / f"{image_id}.png"
        )
    return {caption: files[:IMAGES_PER_CAPTION] for caption, files in sorted(by_caption.items())}


def _load(files: list[Path], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    arrays = [
        np.asarray(Image.open(f).convert("RGB").resize((PIXELS, PIXELS), Image.BILINEAR))
        for f in files
    ]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    return (images - mean) / std


@pytest.mark.slow
def test_stage1_losses_go_down(tmp_path):
    files = _easy_vqa_images()
    assert len(files) == 24, sorted(files)  # 8 colours x 3 shapes
    # Wider-than-BERT init ranges keep a 48/64-wide random model out of its collapsed start,
    # where queries ignore the image (0.02 is tuned for width 768).
    vision = save_vision_tower(
        "vit", tmp_path / "vit", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        patch_size=4, initializer_range=0.1,
    )
    bert = save_bert(tmp_path / "bert", layers=2, hidden=64, initializer_range=0.1)
    spec = tiny_spec(vision, bert)
    qformer = spec.qformer.model_copy(
        update={"num_query_tokens": 8, "cross_attention_frequency": 1}
    )
    spec = spec.model_copy(update={"qformer": qformer})
    prep = image_preprocessing(spec.vision)
    assert prep.image_size == PIXELS
    mean, std = torch.tensor(prep.mean)[:, None, None], torch.tensor(prep.std)[:, None, None]
    pixels = {caption: _load(paths, mean, std) for caption, paths in files.items()}
    tokenizer = build_qformer_tokenizer(spec.qformer)

    torch.manual_seed(0)
    model = Blip2Pretrainer(spec, objective=1).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.05)
    rng = random.Random(0)
    history = []
    for _ in range(STEPS):
        # Distinct captions per batch: a repeated caption would be a false negative.
        captions = rng.sample(sorted(pixels), BATCH)
        images = torch.stack([pixels[c][rng.randrange(len(pixels[c]))] for c in captions])
        out = model(pixel_values=images, **caption_batch(tokenizer, captions))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append([out.loss_itc.item(), out.loss_itm.item(), out.loss_itg.item()])

    start, end = np.mean(history[:20], axis=0), np.mean(history[-50:], axis=0)
    itc, itm, itg = zip(start, end)
    summary = f"start {start.round(3)}, end {end.round(3)} (itc, itm, itg)"
    assert itc[1] < 0.6 * itc[0], summary  # from ln(16) = 2.77
    assert itm[1] < 0.85 * itm[0], summary  # from 0.64, always guessing the 1:2 prior
    assert itg[1] < 0.5 * itg[0], summary
    # Below what the caption prior alone allows (about 1.45): generation reads the image.
    assert itg[1] < 1.25, summary
