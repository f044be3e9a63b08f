"""Storage helpers: credential-free URLs, durable atomic writes, one-line access errors."""

from __future__ import annotations

import os

import pytest

from pipeline.io import storage
from pipeline.io.redact import redact_text, redact_url
from pipeline.io.storage import Location, StorageError, expand_inputs, write_bytes_atomic
from pipeline.spec.storage import StorageSpec
from tests.helpers import free_port


@pytest.mark.parametrize(
    "url, recorded",
    [
        ("https://bucket.s3.amazonaws.com/raw/00000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
         "&X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=abc123",
         "https://bucket.s3.amazonaws.com/raw/00000.tar"),
        ("https://user:hunter2@data.example.com:8443/shards/1.tar#frag",
         "https://data.example.com:8443/shards/1.tar"),
        ("https://host/a.tar?sig=s3cr3t&token=t0k", "https://host/a.tar"),
        ("s3://bucket/raw/00000.tar", "s3://bucket/raw/00000.tar"),
        ("/local/raw/00000.tar", "/local/raw/00000.tar"),
    ],
)
def test_urls_are_recorded_without_credentials(url, recorded):
    assert redact_url(url) == recorded


def test_urls_inside_messages_are_redacted():
    message = 'Could not connect to "https://u:pw@h/x.tar?X-Amz-Signature=abc" (timeout)'
    assert redact_text(message) == 'Could not connect to "https://h/x.tar" (timeout)'


def test_local_atomic_write_is_durable_before_it_is_visible(tmp_path, monkeypatch):
    """The data is fsynced before the rename and the folder after it, so anything written
    after (a completion marker) cannot outlive it in a power loss."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    target = tmp_path / "out" / "data.bin"
    write_bytes_atomic(Location.of(str(target)), b"payload")
    assert target.read_bytes() == b"payload"
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert ".tmp-" in events[0][1] and events[1][1] == str(target)
    assert events[2][1] == str(target.parent)


def test_missing_credentials_are_one_clear_error(s3_endpoint, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for pattern in ("s3://test-bucket/raw/*.tar", "s3://test-bucket/raw/00000.tar"):
        # A fresh filesystem: fsspec caches instances by their arguments.
        spec = StorageSpec(endpoint_url=s3_endpoint, region="eu-west-3")
        with pytest.raises(StorageError, match="no S3 credentials found") as err:
            expand_inputs([pattern], spec)
        assert err.value.exit_status == 2


@pytest.mark.slow  # botocore and s3fs retry for several seconds
def test_unreachable_endpoint_is_one_clear_error():
    spec = StorageSpec(endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="cannot reach the storage endpoint"):
        expand_inputs(["s3://test-bucket/raw/00000.tar"], spec)


def test_missing_bucket_is_not_taken_for_a_missing_file(s3_endpoint):
    with pytest.raises(StorageError, match="bucket does not exist"):
        expand_inputs(["s3://no-such-bucket/raw/00000.tar"], StorageSpec(endpoint_url=s3_endpoint))


def test_a_local_path_below_a_file_does_not_exist(tmp_path):
    shard = tmp_path / "00000.parquet"
    shard.write_bytes(b"PAR1")
    # eval and held-out data given as a .parquet file: its "manifest.json" is looked for first
    assert storage.exists(Location.of(str(shard / "manifest.json"))) is False
    assert storage.exists(Location.of(str(shard))) is True
