"""Prep never dies because of one sample or one shard: a hostile corpus, a shard that cannot be
read until it is fixed, and a second run on the same output folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.io.lease import hold_lease
from pipeline.io.storage import Location
from pipeline.data.drops import merge_counts
from tests.helpers import jpeg_bytes, one_error_line, sample_members, write_tar
from tests.data.corpus import (
    EXPECTED_DROPS,
    EXPECTED_KEPT,
    HOSTILE_DROPS,
    HOSTILE_KEPT,
    HOSTILE_LIMITS,
    bad_corpus_spec,
    write_bad_corpus,
    write_hostile_shard,
)

GZ_KEPT = {"g0": "a sample from a gzipped shard", "g1": "another gzipped sample"}
FIXED_KEPT = {"f0": "a sample of the repaired shard"}


def _write_gz_shard(path: Path, first_image: bytes) -> None:
    """An unordered gzipped shard: two new samples and a copy of the corpus's first image."""
    members = [("g1.jpg", jpeg_bytes(seed=51)), *sample_members("g0", GZ_KEPT["g0"], jpeg_bytes(seed=50)),
               ("g1.txt", GZ_KEPT["g1"].encode()), *sample_members("g2", "a copy from the gzip", first_image)]
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    import gzip

    path.write_bytes(gzip.compress(plain.getvalue()))


def _output_keys(out: Path, manifest: dict) -> list[str]:
    keys = []
    for shard in manifest["shards"]:
        keys += pq.read_table(out / f"{shard['name']}.parquet").column("key").to_pylist()
    return keys


def _assert_every_sample_accounted_for(out: Path, manifest: dict) -> None:
    for shard in manifest["shards"]:
        stats = json.loads((out / f"{shard['name']}.stats.json").read_text())
        assert stats["samples_in"] == stats["samples_out"] + sum(stats["drops"].values())
        assert pq.read_metadata(out / f"{shard['name']}.parquet").num_rows == stats["samples_out"]
    totals = manifest["totals"]
    assert totals["samples_in"] == totals["samples_out"] + sum(manifest["drops"].values())


@pytest.mark.slow
def test_hostile_corpus_completes_and_a_failed_shard_is_retried_until_it_is_processed(
    ray_2cpus, tmp_path, capsys
):
    raw = tmp_path / "raw"
    bad = write_bad_corpus(raw)
    first_image = jpeg_bytes(seed=1)  # s00's image, as in the bad corpus
    hostile = write_hostile_shard(raw / "00003.tar")
    _write_gz_shard(raw / "00004.tar.gz", first_image)
    broken = raw / "broken.tar"
    broken.write_bytes(b"this shard was cut to pieces in transit " * 50)
    inputs = [str(bad[0]), str(broken), str(bad[1]), str(bad[2]), str(hostile), str(raw / "00004.tar.gz")]
    spec = bad_corpus_spec(inputs, str(tmp_path / "out"))
    spec["prep"]["filters"].update(HOSTILE_LIMITS)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    drops_without_broken = merge_counts(EXPECTED_DROPS, HOSTILE_DROPS, {"duplicate": 1})
    read_without_broken = (len(EXPECTED_KEPT) + sum(EXPECTED_DROPS.values())  # the bad corpus
                           + len(HOSTILE_KEPT) + sum(HOSTILE_DROPS.values()) + 3)  # + 3 gzipped

    # 1. Every other shard completes; the run fails naming the unreadable shard.
    assert main(["prep", str(spec_path)]) == 1
    assert one_error_line(capsys.readouterr().err).startswith("error: prep: 1 of 6 shards failed (broken: ReadError")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(f["name"], f["phase"]) for f in manifest["failed_shards"]] == [("broken", "index")]
    assert not (out / "broken.stats.json").exists()
    assert manifest["drops"] == drops_without_broken
    assert manifest["totals"]["samples_in"] == read_without_broken
    assert sorted(_output_keys(out, manifest)) == sorted({**EXPECTED_KEPT, **HOSTILE_KEPT, **GZ_KEPT})
    _assert_every_sample_accounted_for(out, manifest)

    # 2. Still unreadable: only it is tried again; accepted, the run succeeds and names it.
    assert main(["prep", str(spec_path), "--max-failed-shards", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 failed shards accepted" in printed and "broken: ReadError" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["shards_processed"] == 0 and manifest["run"]["shards_skipped"] == 5
    assert [f["name"] for f in manifest["failed_shards"]] == ["broken"]

    # 3. Repaired: the next run processes it. Its copy of u2's image (u2 was kept from a shard
    # finished before it) is dropped, so the output never holds two copies.
    write_tar(broken, [*sample_members("f0", FIXED_KEPT["f0"], jpeg_bytes(seed=60)),
                       *sample_members("f1", "a late copy of u2", jpeg_bytes(seed=22))])
    assert main(["prep", str(spec_path)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failed_shards"] == [] and manifest["run"]["shards_processed"] == 1
    assert manifest["drops"] == merge_counts(drops_without_broken, {"duplicate": 1})
    assert manifest["totals"]["samples_in"] == read_without_broken + 2
    keys = _output_keys(out, manifest)
    assert sorted(keys) == sorted({**EXPECTED_KEPT, **HOSTILE_KEPT, **GZ_KEPT, **FIXED_KEPT})
    images = [row for shard in manifest["shards"]
              for row in pq.read_table(out / f"{shard['name']}.parquet").column("image").to_pylist()]
    assert len(set(images)) == len(images)
    _assert_every_sample_accounted_for(out, manifest)


def test_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path, capsys):
    write_tar(tmp_path / "raw" / "a.tar", sample_members("a0", "a red square", jpeg_bytes(seed=1)))
    spec = bad_corpus_spec([str(tmp_path / "raw" / "a.tar")], str(tmp_path / "out"))
    spec["prep"]["tokenizers"].pop("llm")
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    with hold_lease(Location.of(str(tmp_path / "out")), purpose="qformer prep") as lease:
        assert main(["prep", str(spec_path)]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: {tmp_path / 'out'} is in use by qformer prep")
    assert lease.record["owner"] in error
    assert not (tmp_path / "out" / "_work").exists()  # refused before touching anything
