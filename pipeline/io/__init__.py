"""Storage access: local disk and S3 through one fsspec interface."""
