"""Shared fixtures: a real local Ray, a real S3 endpoint on loopback, the prepared demo corpus and
the prepared bad corpus.
Helpers that tests import live in ``tests/helpers.py``."""

from __future__ import annotations

import os
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
# Ray Train's controller polls its workers every 2 s by default: a stage's end, and each checkpoint
# reported while the previous report still waits in the worker's one-slot queue, wait for the next
# poll. Tiny test stages report every few hundred milliseconds; polling more often saves seconds
# per `qformer train` stage and changes nothing else (a missed poll is not a failure; workers are
# declared dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


RAY_FIXTURES = frozenset({"ray_2cpus", "ray_head"})
"""Fixtures that start Ray: every test that uses one, directly or through another fixture, is slow."""


def pytest_collection_modifyitems(config, items):
    gpu = None
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu"):
            if gpu is None:
                import torch

                gpu = torch.cuda.is_available()
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="the GPU tier needs CUDA (docs/gpu.md)"))


def pytest_ignore_collect(collection_path, config):
    """``pytest -m gpu`` collects only tests/gpu: a GPU machine has only the tier's wheels, and
    other test modules import Ray, moto and the rest at import time."""
    if (config.getoption("markexpr") or "").strip() == "gpu":
        gpu_tests = Path(__file__).parent / "gpu"
        if collection_path.is_dir() and (gpu_tests.is_relative_to(collection_path) or collection_path.is_relative_to(gpu_tests)):
            return None
        if collection_path.is_relative_to(gpu_tests):
            return None
        return True
    return None


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
def ray_address(ray_2cpus) -> str:
    """The address of the session's Ray, for a ``qformer`` process of a test to join as its
    ``RAY_ADDRESS`` instead of starting (and paying for) a Ray of its own. Tests that kill such a
    process together with its Ray keep ``RAY_ADDRESS=local``."""
    return ray_2cpus.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto's server) on loopback, with bucket ``test-bucket``."""
    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="test-bucket")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def prepared_demo(ray_2cpus, tmp_path_factory) -> str:
    """240 easy-VQA samples prepared at 32 px with MiniLM and SmolLM2 tokens (length 16)."""
    from pipeline.data.demo_corpus import write_demo_corpus
    from pipeline.data.prep import run_prep
    from pipeline.spec import JobSpec
    from pipeline.spec.loader import validate_spec
    from tests.helpers import demo_prep_spec

    root = tmp_path_factory.mktemp("demo")
    write_demo_corpus(str(root / "raw"), samples=240, shard_size=60)
    spec = validate_spec(demo_prep_spec(root), JobSpec).prep
    run_prep(spec)
    return str(root / "prepared")


@pytest.fixture(scope="session")
def prepared_bad_corpus(ray_2cpus, tmp_path_factory):
    """The bad corpus of ``tests/data/corpus.py`` prepared once for every test that reads it:
    (prep spec, the manifest that run returned, output folder). Its inputs name the shards with a
    brace pattern. A test may re-run the same spec (which skips every shard) or try another spec
    on the folder (which is refused), and must leave the folder otherwise as it is."""
    from pipeline.data.prep import run_prep
    from pipeline.spec import JobSpec
    from pipeline.spec.loader import validate_spec
    from tests.data.corpus import bad_corpus_spec, write_bad_corpus

    root = tmp_path_factory.mktemp("bad")
    write_bad_corpus(root / "raw")
    spec = validate_spec(bad_corpus_spec([str(root / "raw" / "{00000..00002}.tar")], str(root / "out")),
                         JobSpec).prep
    return spec, run_prep(spec), root / "out"
