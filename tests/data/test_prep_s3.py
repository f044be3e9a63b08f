"""Prep reading from and writing to S3 through a real endpoint on loopback."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import s3fs

from pipeline.data.prep import run_prep
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec
from tests.data.corpus import EXPECTED_DROPS, EXPECTED_KEPT, bad_corpus_spec, write_bad_corpus


def test_prep_from_s3_to_s3(ray_2cpus, s3_endpoint, tmp_path):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)  # credentials: the environment
    for shard in write_bad_corpus(tmp_path / "raw"):
        fs.put_file(str(shard), f"test-bucket/raw/{shard.name}")
    raw = bad_corpus_spec(["s3://test-bucket/raw/{00000..00002}.tar"],
                          "s3://test-bucket/prepared", endpoint_url=s3_endpoint)
    manifest = run_prep(validate_spec(raw, JobSpec).prep)

    assert manifest["drops"] == EXPECTED_DROPS
    assert json.loads(fs.cat_file("test-bucket/prepared/manifest.json"))["totals"] == manifest["totals"]
    assert fs.exists("test-bucket/prepared/00001.stats.json")
    keys = []
    for shard in manifest["shards"]:
        assert shard["output"].startswith("s3://test-bucket/prepared/")
        with fs.open(shard["output"], "rb") as handle:
            keys += pq.read_table(handle).column("key").to_pylist()
    assert sorted(keys) == sorted(EXPECTED_KEPT)
    assert not [p for p in fs.find("test-bucket/prepared") if ".tmp-" in p]
