"""Curated shards with several captions per image: each step draws one caption per sample, seeded
by the step and the sample's position, so resumed and uninterrupted streams agree."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.prepared import curated_schema, fixed_list
from pipeline.io.storage import Location
from pipeline.train.loader import BatchStream, LoaderConfig, placeholder_batch
from tests.helpers import jpeg_bytes

LENGTH, SIZE = 6, 16
ROWS = 30


def caption_tokens(key: str, index: int) -> np.ndarray:
    """Distinct ids per (key, caption) so a test can tell which caption a row carries."""
    base = zlib.crc32(f"{key}#{index}".encode()) % 5000
    return (base + np.arange(LENGTH)).astype(np.int32)


def captions_of(key: str) -> int:
    return 1 + zlib.crc32(key.encode()) % 3


def curated_shard(path, keys: list[str]) -> Location:
    counts = [captions_of(key) for key in keys]
    ids = [np.stack([caption_tokens(key, j) for j in range(n)]) for key, n in zip(keys, counts)]
    flat = np.concatenate(ids)  # (M, L)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    mask = np.ones_like(flat, dtype=np.int8)
    firsts = offsets.to_numpy()[:-1]
    columns = {
        "key": keys, "source": ["test"] * len(keys), "caption": [f"{k} #0" for k in keys],
        "image": [jpeg_bytes(24, 24, seed=i) for i in range(len(keys))],
        "original_width": pa.array([24] * len(keys), pa.int32()),
        "original_height": pa.array([24] * len(keys), pa.int32()), "metadata": ["{}"] * len(keys),
        "qformer_input_ids": fixed_list(flat[firsts], LENGTH, pa.int32()),
        "qformer_attention_mask": fixed_list(mask[firsts], LENGTH, pa.int8()),
        "captions": [[f"{k} #{j}" for j in range(n)] for k, n in zip(keys, counts)],
        "caption_origins": [["web"] * n for n in counts],
        "caption_scores": [[0.5] * n for n in counts],
        "caption_count": pa.array(counts, pa.int32()),
        "qformer_captions_input_ids": pa.ListArray.from_arrays(offsets, fixed_list(flat, LENGTH, pa.int32())),
        "qformer_captions_attention_mask": pa.ListArray.from_arrays(offsets, fixed_list(mask, LENGTH, pa.int8())),
    }
    pq.write_table(pa.table(columns, schema=curated_schema(LENGTH, None)), str(path), row_group_size=8)
    return Location.of(str(path))


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> tuple[Location, ...]:
    root = tmp_path_factory.mktemp("curated")
    return (curated_shard(root / "a.parquet", [f"a-{i:02d}" for i in range(ROWS)]),
            curated_shard(root / "b.parquet", [f"b-{i:02d}" for i in range(ROWS // 2)]))


def config(shards, **overrides) -> LoaderConfig:
    fields = dict(shards=shards, batch_size=4, image_size=SIZE,
                  text="qformer", seed=3, augment=False)
    return LoaderConfig(**{**fields, **overrides})


def drawn(batch) -> list[tuple[str, int]]:
    """(key, caption index) of each row of a batch."""
    out = []
    for key, ids in zip(batch.sample_keys, batch["input_ids"]):
        matches = [j for j in range(captions_of(key)) if ids.tolist() == caption_tokens(key, j).tolist()]
        assert len(matches) == 1, f"{key}: its tokens are none of its captions'"
        out.append((key, matches[0]))
    return out


def test_every_step_draws_one_kept_caption_per_sample_and_all_are_drawn_over_time(curated):
    with BatchStream(config(curated), 0, 1) as stream:
        steps = stream.steps_per_epoch * 30
        rows = [row for _ in range(steps) for row in drawn(next(stream))]
    by_key: dict[str, set[int]] = {}
    for key, index in rows:
        by_key.setdefault(key, set()).add(index)
    multi = [key for key in by_key if captions_of(key) > 1]
    assert multi, "the corpus must hold samples with several captions"
    # Over thirty epochs each caption of a two- or three-caption sample turns up.
    assert all(by_key[key] == set(range(captions_of(key))) for key in multi)


def test_caption_draws_are_the_same_for_a_resumed_stream_and_on_every_worker_count(curated):
    with BatchStream(config(curated), 0, 1) as stream:
        uninterrupted = [next(stream) for _ in range(12)]
    with BatchStream(config(curated), 0, 1, start_step=7) as stream:
        resumed = [next(stream) for _ in range(5)]
    for got, expected in zip(resumed, uninterrupted[7:]):
        assert got.sample_keys == expected.sample_keys
        assert torch.equal(got["input_ids"], expected["input_ids"])
    with BatchStream(config(curated, seed=4), 0, 1) as stream:
        other_seed = [next(stream) for _ in range(12)]
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(other_seed, uninterrupted))


def test_a_placeholder_batch_of_a_curated_corpus_has_the_single_caption_shapes(curated):
    batch = placeholder_batch(config(curated))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, LENGTH)
