"""The easy-VQA demo corpus, read back with the plain webdataset library."""

from __future__ import annotations

import io
import json

import webdataset as wds
from PIL import Image

from pipeline.cli import main
from pipeline.data.demo_corpus import COLORS, SHAPES


def test_demo_corpus_shards_read_back_with_webdataset(tmp_path):
    assert main(["demo-corpus", str(tmp_path), "--samples", "30", "--shard-size", "12",
                 "--split", "test"]) == 0
    shards = sorted(tmp_path.glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert len(samples) == 30
    for sample in samples:
        caption = sample["txt"].decode()
        article, color, shape = caption.split()
        assert article == "a" and color in COLORS and shape in SHAPES
        meta = json.loads(sample["json"])
        assert (meta["color"], meta["shape"], meta["split"]) == (color, shape, "test")
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (64, 64)
