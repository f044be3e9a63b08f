"""How to reach ``s3://`` locations: the storage options every section that names a location takes."""

from __future__ import annotations

from pipeline.spec.base import SpecModel


class StorageSpec(SpecModel):
    """How to reach ``s3://`` locations. Credentials are never written here: they come from the
    environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) or a named profile."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, a loopback test server); None for AWS itself."""
    region: str | None = None
    """Region name passed to the S3 client."""
    anon: bool = False
    """Read public buckets without credentials."""
    profile: str | None = None
    """AWS profile name from ``~/.aws/credentials``."""
