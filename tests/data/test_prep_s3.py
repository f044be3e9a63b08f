"""Prep reading from and writing to S3 through a real endpoint on loopback."""

from __future__ import annotations

import json

import boto3
import pyarrow.parquet as pq
import s3fs

from pipeline.data.prep import run_prep
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec
from tests.helpers import jpeg_bytes, sample_members, write_tar
from tests.data.corpus import EXPECTED_DROPS, EXPECTED_KEPT, bad_corpus_spec, write_bad_corpus


def test_prep_from_s3_to_s3(ray_2cpus, s3_endpoint, tmp_path):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)  # credentials: the environment
    for shard in write_bad_corpus(tmp_path / "raw"):
        fs.put_file(str(shard), f"test-bucket/raw/{shard.name}")
    raw = bad_corpus_spec(["s3://test-bucket/raw/{00000..00002}.tar"],
                          "s3://test-bucket/prepared", endpoint_url=s3_endpoint)
    spec = validate_spec(raw, JobSpec).prep
    manifest = run_prep(spec)

    assert manifest["drops"] == EXPECTED_DROPS
    assert json.loads(fs.cat_file("test-bucket/prepared/manifest.json"))["totals"] == manifest["totals"]
    assert fs.exists("test-bucket/prepared/00001.stats.json")
    keys = []
    for shard in manifest["shards"]:
        assert shard["output"].startswith("s3://test-bucket/prepared/")
        with fs.open(shard["output"], "rb") as handle:
            keys += pq.read_table(handle).column("key").to_pylist()
    assert sorted(keys) == sorted(EXPECTED_KEPT)
    assert not [p for p in fs.find("test-bucket/prepared") if ".tmp-" in p or "_lease" in p]

    # What a killed run leaves half-written, anywhere in the output, is removed by the next.
    for leftover in ("00000.parquet.tmp-0123456789ab", "_work/duplicates/_SUCCESS.tmp-0123456789ab",
                     "_work/plan.json.tmp-0123456789ab"):
        fs.pipe_file(f"test-bucket/prepared/{leftover}", b"half")
    again = run_prep(spec)
    assert again["run"]["shards_processed"] == 0 and again["totals"] == manifest["totals"]
    fs.invalidate_cache()
    assert not [p for p in fs.find("test-bucket/prepared") if ".tmp-" in p]


def test_presigned_inputs_are_recorded_without_credentials(ray_2cpus, s3_endpoint, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    shard = write_tar(tmp_path / "00000.tar", sample_members("p0", "a presigned sample", jpeg_bytes(seed=5)))
    client.upload_file(str(shard), "test-bucket", "signed/00000.tar")
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": "test-bucket", "Key": "signed/00000.tar"}, ExpiresIn=600)
    assert "Signature=" in url
    raw = bad_corpus_spec([url], str(tmp_path / "out"))
    raw["prep"]["tokenizers"].pop("llm")
    manifest = run_prep(validate_spec(raw, JobSpec).prep)

    address = f"{s3_endpoint}/test-bucket/signed/00000.tar"
    assert [(s["name"], s["input"], s["samples"]) for s in manifest["shards"]] == [("00000", address, 1)]
    assert pq.read_table(tmp_path / "out" / "00000.parquet").column("source").to_pylist() == [address]
    recorded = [p.read_text() for p in (tmp_path / "out").rglob("*.json")]
    assert recorded and not [text for text in recorded if "Signature" in text or "AWSAccessKeyId" in text]
