"""Chaos: a prep and a short training on an S3 endpoint that goes away for a while, with a Ray
Train worker killed, end with exactly the outputs of an undisturbed run (no sample lost or
duplicated, every training step logged once) once each command is re-run as a user would."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.checkpoint.status import run_status
from pipeline.data.demo_corpus import write_demo_corpus
from pipeline.data.prep import run_prep
from pipeline.errors import QformerError
from pipeline.io.storage import Location
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec
from pipeline.train.run import run_training
from tests.helpers import demo_prep_spec, free_port
from tests.train.helpers import (
    job_spec,
    registered_checkpoint,
    tiny_job,
    train_worker_pids,
)

pytestmark = pytest.mark.slow

OUTAGE_S = 8.0
"""Long enough for botocore's retries to give up on some requests."""


class FlakyEndpoint:
    """moto's S3 server on a port of its own, which can go away and come back (its buckets and
    objects live in this process, so they survive)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.outages = 0

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # refuse connections, as a dead endpoint does

    def outage(self, seconds: float = OUTAGE_S) -> None:
        self.stop()
        time.sleep(seconds)
        self.start()
        self.outages += 1


@pytest.fixture
def endpoint():
    endpoint = FlakyEndpoint()
    endpoint.start()
    s3fs.S3FileSystem(endpoint_url=endpoint.url).mkdir("chaos")
    yield endpoint
    endpoint.stop()


def _fs(endpoint: FlakyEndpoint) -> s3fs.S3FileSystem:
    fs = s3fs.S3FileSystem(endpoint_url=endpoint.url, skip_instance_cache=True)
    fs.invalidate_cache()
    return fs


def _prep(endpoint: FlakyEndpoint, tmp_path, output: str) -> dict:
    raw = demo_prep_spec(tmp_path)
    raw["prep"].update(inputs=["s3://chaos/raw/*.tar"], output=f"s3://chaos/{output}",
                       storage={"endpoint_url": endpoint.url})
    return raw


def _run_until_done(command, attempts: int = 4):
    """Run ``command`` again after each failure, as a user would; return its result."""
    for attempt in range(1, attempts + 1):
        try:
            return command()
        except QformerError:
            if attempt == attempts:
                raise


def _rows(fs, manifest: dict) -> list[tuple]:
    rows = []
    for shard in manifest["shards"]:
        with fs.open(shard["output"], "rb") as handle:
            table = pq.read_table(handle, columns=["key", "caption", "image", "qformer_input_ids"])
        rows += list(zip(*(table.column(name).to_pylist() for name in table.column_names)))
    return sorted(rows)


def _metrics(fs, run: str) -> list[dict]:
    lines = fs.cat_file(f"chaos/runs/{run}/stage1/metrics.jsonl").decode().splitlines()
    return [json.loads(line) for line in lines]


def test_prep_and_training_end_as_undisturbed_runs_despite_an_outage_and_a_killed_worker(
        ray_2cpus, endpoint, tmp_path):
    fs = _fs(endpoint)
    for shard in write_demo_corpus(str(tmp_path / "raw"), samples=120, shard_size=20):
        fs.put_file(shard, f"chaos/raw/{os.path.basename(shard)}")

    # Undisturbed.
    reference = run_prep(validate_spec(_prep(endpoint, tmp_path, "reference"), JobSpec).prep)
    train = tiny_job("reference", "s3://chaos/runs", "s3://chaos/reference", stage1_steps=6,
                     stage2_steps=None, checkpoint_every=2, endpoint_url=endpoint.url)
    train["data"]["storage"] = {"endpoint_url": endpoint.url}
    train["scaling"]["max_failures"] = 4
    run_training(job_spec(train))

    # Prep with the endpoint gone once, after the first shard is complete.
    def outage_after_first_shard():
        deadline = time.monotonic() + 300
        while not _fs(endpoint).glob("chaos/disturbed/*.stats.json") and time.monotonic() < deadline:
            time.sleep(0.2)
        endpoint.outage()

    spec = validate_spec(_prep(endpoint, tmp_path, "disturbed"), JobSpec).prep
    chaos = threading.Thread(target=outage_after_first_shard, daemon=True)
    chaos.start()
    disturbed = _run_until_done(lambda: run_prep(spec))
    chaos.join()
    if disturbed["failed_shards"]:  # accepted failures are retried by the next run
        disturbed = run_prep(spec)
    assert endpoint.outages == 1 and not disturbed["failed_shards"]
    assert disturbed["totals"] == reference["totals"] and disturbed["drops"] == reference["drops"]
    assert _rows(_fs(endpoint), disturbed) == _rows(_fs(endpoint), reference)

    # Training with a worker killed after the first registered checkpoint, then the endpoint gone.
    def kill_then_outage():
        deadline = time.monotonic() + 300
        while registered_checkpoint(_fs(endpoint), "chaos/runs/disturbed/stage1") is None:
            assert time.monotonic() < deadline, "no checkpoint registered in time"
            time.sleep(0.2)
        pids = train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
        endpoint.outage()

    train["run"]["name"] = "disturbed"
    train["data"]["prepared"] = "s3://chaos/disturbed"
    chaos = threading.Thread(target=kill_then_outage, daemon=True)
    chaos.start()
    summary = _run_until_done(lambda: run_training(job_spec(train)))
    chaos.join()
    assert endpoint.outages == 2 and summary["stages"][0]["step"] == 6

    fs = _fs(endpoint)
    final = json.loads(fs.cat_file(f"{summary['stages'][0]['checkpoint'].removeprefix('s3://')}/metadata.json"))
    assert final["resumed_from_step"] >= 2, "the restarted workers continued from a checkpoint"
    [stage] = run_status(Location("s3://chaos/runs/disturbed", {"endpoint_url": endpoint.url}))["stages"]
    assert stage["worker_restarts"] >= 1, "qformer status sees the restart"
    resumed, expected = _metrics(fs, "disturbed"), _metrics(fs, "reference")
    assert [r["step"] for r in resumed] == list(range(1, 7)), "every step logged exactly once"
    for mine, theirs in zip(resumed, expected):
        for key in ("loss", "loss_itc", "loss_itm", "loss_itg", "lr", "samples_seen"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
