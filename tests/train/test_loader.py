"""The training batch stream: sharding across workers, exact resume, augmentation, S3, errors."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from PIL import Image

from pipeline.data.prepared import fixed_list, output_schema
from pipeline.io.storage import Location
from pipeline.data.augment import TrainTransform, crop_box
from pipeline.data.batches import PixelNormalizer, to_device
from pipeline.data.prepared import shards_from_manifest
from pipeline.train.loader import BatchStream, DataError, LoaderConfig
from tests.helpers import jpeg_bytes

QFORMER_LENGTH, LLM_LENGTH = 6, 5
PREP_SIZE, IMAGE_SIZE = 24, 16
# Three shards of 23, 17 and 10 rows in row groups of 8: groups of 8, 8, 7, 8, 8, 1, 8, 2 rows.
SHARD_ROWS = {"a": 23, "b": 17, "c": 10}
TOTAL = sum(SHARD_ROWS.values())


def token_ids(key: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and mask derived from the key, so a test can tell which row a token row came from."""
    base = zlib.crc32(key.encode()) % 1000
    mask = (np.arange(length) <= base % length).astype(np.int8)
    return (base + np.arange(length)).astype(np.int32), mask


def sample_image(key: str) -> bytes:
    return jpeg_bytes(PREP_SIZE, PREP_SIZE, seed=zlib.crc32(key.encode()) % 997)


def shard_table(keys: list[str], *, qformer: bool = True, llm: bool = True, bad: str | None = None) -> pa.Table:
    """A prepared shard's rows; ``bad`` names a key whose image bytes are not a JPEG."""
    schema = output_schema(QFORMER_LENGTH, LLM_LENGTH if llm else None)
    if not qformer:
        schema = pa.schema([f for f in schema if not f.name.startswith("qformer_")])
    columns = {
        "key": pa.array(keys),
        "source": pa.array(["test"] * len(keys)),
        "caption": pa.array([f"caption of {key}" for key in keys]),
        "image": pa.array([b"not a jpeg" if key == bad else sample_image(key) for key in keys], pa.binary()),
        "original_width": pa.array([PREP_SIZE] * len(keys), pa.int32()),
        "original_height": pa.array([PREP_SIZE] * len(keys), pa.int32()),
        "metadata": pa.array(["{}"] * len(keys)),
    }
    for prefix, length, wanted in (("qformer", QFORMER_LENGTH, qformer), ("llm", LLM_LENGTH, llm)):
        if wanted:
            ids, masks = zip(*(token_ids(key, length) for key in keys))
            columns[f"{prefix}_input_ids"] = fixed_list(np.stack(ids), length, pa.int32())
            columns[f"{prefix}_attention_mask"] = fixed_list(np.stack(masks), length, pa.int8())
    return pa.table(columns, schema=schema)


def write_shard(path, keys: list[str], rows_per_group: int = 8, **kwargs) -> Location:
    pq.write_table(shard_table(keys, **kwargs), str(path), row_group_size=rows_per_group)
    return Location.of(str(path))


def corpus_keys() -> list[str]:
    return [f"{name}-{i:03d}" for name, rows in SHARD_ROWS.items() for i in range(rows)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Location, ...]:
    root = tmp_path_factory.mktemp("prepared")
    return tuple(
        write_shard(root / f"{name}.parquet", [f"{name}-{i:03d}" for i in range(rows)])
        for name, rows in SHARD_ROWS.items()
    )


def config(shards, **overrides) -> LoaderConfig:
    fields = dict(
        shards=shards, batch_size=4, image_size=IMAGE_SIZE, text="qformer", seed=0,
    )
    return LoaderConfig(**{**fields, **overrides})


def take(stream: BatchStream, count: int) -> list:
    return [next(stream) for _ in range(count)]


def assert_same_batch(got, expected) -> None:
    assert (got.step, got.epoch, got.sample_keys) == (expected.step, expected.epoch, expected.sample_keys)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("world_size, batch_size", [(2, 4), (3, 5), (1, 7), (4, 2)])
def test_workers_share_an_epoch_without_overlap(corpus, world_size, batch_size):
    streams = [BatchStream(config(corpus, batch_size=batch_size), r, world_size) for r in range(world_size)]
    try:
        steps = streams[0].steps_per_epoch
        assert steps == TOTAL // world_size // batch_size
        epoch = [take(stream, steps) for stream in streams]
    finally:
        for stream in streams:
            stream.close()
    seen = []
    for step in range(steps):
        batches = [worker[step] for worker in epoch]
        step_keys = [key for batch in batches for key in batch.sample_keys]
        assert len(step_keys) == len(set(step_keys)) == world_size * batch_size
        assert {(batch.step, batch.epoch) for batch in batches} == {(step, 0)}
        seen += step_keys
    assert len(seen) == len(set(seen)) == streams[0].samples_per_epoch
    dropped = set(corpus_keys()) - set(seen)
    assert len(dropped) == TOTAL - world_size * steps * batch_size < world_size * batch_size


def test_batches_align_images_and_tokens_with_keys(corpus):
    with BatchStream(config(corpus, augment=False), 1, 2) as stream:
        inputs = next(stream)
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask"}
    assert inputs["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert inputs["pixel_values"].dtype == torch.uint8
    normalized = to_device(inputs, "cpu", PixelNormalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))["pixel_values"]
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (4, QFORMER_LENGTH)
    assert inputs["input_ids"].dtype == inputs["attention_mask"].dtype == torch.int64
    for j, key in enumerate(inputs.sample_keys):
        ids, mask = token_ids(key, QFORMER_LENGTH)
        assert inputs["input_ids"][j].tolist() == ids.tolist()
        assert inputs["attention_mask"][j].tolist() == mask.tolist()
        image = Image.open(io.BytesIO(sample_image(key))).resize((IMAGE_SIZE,) * 2, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)  # (3, S, S)
        assert torch.equal(inputs["pixel_values"][j], pixels)
        assert torch.allclose(normalized[j], (pixels / 255 - 0.5) / 0.25, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_resumed_stream_continues_exactly_where_the_uninterrupted_one_was(corpus, rank):
    cfg = config(corpus, batch_size=3)
    with BatchStream(cfg, rank, 2) as full:
        steps = full.steps_per_epoch  # 50 // 2 // 3 = 8
        reference = take(full, 2 * steps + 3)
    for start in (2, steps - 1, steps, 2 * steps - 1):
        with BatchStream(cfg, rank, 2, start_step=start) as resumed:
            for expected in reference[start : start + 4]:
                assert_same_batch(next(resumed), expected)
            assert resumed.position(start)["epoch"] == reference[start].epoch


def test_position_is_arithmetic_on_the_step(corpus):
    with BatchStream(config(corpus), 0, 2) as stream:
        steps = stream.steps_per_epoch
        assert stream.position(0) == {"epoch": 0, "step_in_epoch": 0, "samples_in_epoch": 0}
        assert stream.position(2 * steps + 3) == {"epoch": 2, "step_in_epoch": 3, "samples_in_epoch": 3 * 4 * 2}


def test_epochs_reshuffle_and_the_seed_fixes_the_order(corpus):
    def keys_by_epoch(seed: int) -> list[list[str]]:
        with BatchStream(config(corpus, seed=seed), 0, 1) as stream:
            batches = take(stream, 2 * stream.steps_per_epoch)
        steps = len(batches) // 2
        return [[k for b in batches[e * steps : (e + 1) * steps] for k in b.sample_keys] for e in (0, 1)]

    first = keys_by_epoch(0)
    assert first[0] != first[1]
    assert keys_by_epoch(0) == first
    assert keys_by_epoch(1)[0] != first[0]


def test_augmentation_changes_pixels_and_is_reproducible(corpus):
    def batches(**overrides):
        with BatchStream(config(corpus, **overrides), 0, 2) as stream:
            return take(stream, 3)

    augmented, again, plain = batches(augment=True), batches(augment=True), batches(augment=False)
    for a, b, p in zip(augmented, again, plain):
        assert_same_batch(a, b)
        assert a.sample_keys == p.sample_keys and torch.equal(a["input_ids"], p["input_ids"])
        assert not torch.allclose(a["pixel_values"], p["pixel_values"])


def _half_red_half_blue() -> bytes:
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16, 0] = 255
    pixels[:, 16:, 2] = 255
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("hflip", [True, False])
def test_flip_and_crop_are_seeded(hflip):
    data = _half_red_half_blue()
    transform = TrainTransform(IMAGE_SIZE, augment=True, crop_scale=(0.9, 1.0), hflip=hflip)
    outputs = [transform(data, np.random.default_rng(seed)) for seed in range(32)]
    flipped = [int(out[:, 0, 2].mean()) > int(out[:, 0, 0].mean()) for out in outputs]  # blue on the left
    assert (0 < sum(flipped) < 32) if hflip else not any(flipped)
    assert all(np.array_equal(transform(data, np.random.default_rng(s)), outputs[s]) for s in range(32))
    assert len({out.tobytes() for out in outputs}) > 1


def test_crop_box_stays_inside_the_image_with_the_asked_area():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = crop_box(40, 30, (0.3, 0.8), rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert 0.2 < (right - left) * (bottom - top) / (40 * 30) < 0.9
    assert crop_box(10, 100, (0.99, 1.0), rng) == (0, 43, 10, 56)  # no try fits: centre, clamped ratio


def test_stage2_stream_reads_only_the_llm_columns(tmp_path):
    keys = [f"k{i:02d}" for i in range(12)]
    shards = (write_shard(tmp_path / "llm_only.parquet", keys, qformer=False),)
    with BatchStream(config(shards, text="llm"), 0, 1) as stream:
        batch = next(stream)
    assert set(batch) == {"pixel_values", "llm_input_ids", "llm_attention_mask"}
    assert batch["llm_input_ids"].shape == (4, LLM_LENGTH)
    assert batch["llm_attention_mask"].dtype == torch.int64
    for j, key in enumerate(batch.sample_keys):
        assert batch["llm_input_ids"][j].tolist() == token_ids(key, LLM_LENGTH)[0].tolist()
    with pytest.raises(ValueError, match=r"llm_only\.parquet: prepared shard has no column.*qformer_input_ids"):
        BatchStream(config(shards, text="qformer"), 0, 1)


def test_reads_shards_listed_in_a_manifest_on_s3(s3_endpoint, tmp_path, corpus):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)  # credentials: the environment
    entries = []
    for local in corpus[:2]:
        name = local.url.rsplit("/", 1)[-1]
        fs.put_file(local.url, f"test-bucket/loader-input/{name}")
        entries.append({"name": name, "input": "x", "output": f"s3://test-bucket/loader-input/{name}", "samples": 0})
    fs.pipe_file("test-bucket/loader-input/manifest.json", json.dumps({"shards": entries}).encode())
    manifest = Location("s3://test-bucket/loader-input/manifest.json", {"endpoint_url": s3_endpoint})
    shards = shards_from_manifest(manifest)
    assert [s.options for s in shards] == [{"endpoint_url": s3_endpoint}] * 2
    with BatchStream(config(shards), 1, 2) as remote, BatchStream(config(corpus[:2]), 1, 2) as local:
        for _ in range(3):
            assert_same_batch(next(remote), next(local))


def test_shards_from_a_local_manifest(tmp_path, corpus):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": [{"output": s.url} for s in corpus], "failed_shards": []}))
    assert shards_from_manifest(Location.of(str(manifest))) == corpus
    manifest.write_text(json.dumps({"shards": []}))
    with pytest.raises(ValueError, match="lists no prepared shard"):
        shards_from_manifest(Location.of(str(manifest)))


def test_a_corpus_too_small_for_one_step_is_refused(corpus):
    with pytest.raises(ValueError, match=r"50 samples in 3 shard.*world_size 8 x batch_size 7 = 56"):
        BatchStream(config(corpus, batch_size=7), 0, 8)


def test_an_undecodable_image_surfaces_in_the_consumer_naming_shard_and_key(tmp_path):
    keys = [f"bad-{i:03d}" for i in range(8)]
    shards = (write_shard(tmp_path / "broken.parquet", keys, bad="bad-005"),)
    stream = BatchStream(config(shards), 0, 1)
    with pytest.raises(DataError, match=r"broken\.parquet: sample 'bad-005': cannot decode"):
        take(stream, stream.steps_per_epoch)
    with pytest.raises(RuntimeError, match="closed"):
        next(stream)


def test_batches_are_decoded_ahead_of_the_consumer_up_to_the_prefetch_bound(corpus):
    with BatchStream(config(corpus, prefetch_batches=3), 0, 1) as stream:
        next(stream)
        assert isinstance(stream.wait_seconds, float) and stream.wait_seconds >= 0
        deadline = time.monotonic() + 120  # generous: only a stalled producer reaches it
        while stream.ready < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.ready == 3  # decoded before anyone asked for them, never more than the bound
        assert [batch.step for batch in take(stream, 3)] == [1, 2, 3]


def test_close_stops_every_thread(corpus):
    stream = BatchStream(config(corpus), 0, 1)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("batch-stream")]


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 0), ("crop_scale", (0.0, 1.0)), ("text", "bert"), ("shards", ())],
)
def test_config_validation_names_the_field(corpus, field, value):
    overrides = {field: value}
    with pytest.raises(ValueError, match=field):
        config(overrides.pop("shards", corpus), **overrides)


def test_config_is_a_plain_frozen_dataclass(corpus):
    cfg = config(list(corpus))
    assert cfg.shards == corpus
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
