"""Several nodes: a 2-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, one CPU
per node), and a run resumed on fewer workers than it started with.

Prep on two nodes writes what prep on one node writes. A 2-worker run spread over both nodes
survives the loss of one node: Ray Train restarts the workers (on the node left and a replacement)
from the last checkpoint on S3, and the run finishes every step. A run that lost a worker resumes
on one worker from a 2-worker checkpoint and trains exactly as the uninterrupted 2-worker run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.train.run import TrainError, run_training
from tests.data.corpus import bad_corpus_spec
from tests.train.helpers import in_bf16, job_spec, tiny_job, train_worker_pids, wait_for_registered_checkpoint


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a worker node, 1 CPU each; shut down after the module."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _qformer(command: str, spec: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "pipeline", command, str(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(folder: Path) -> dict[str, dict]:
    rows = {}
    for shard in sorted(folder.glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            rows[row["key"]] = row
    return rows


def test_prep_on_two_nodes_equals_one_node(prepared_bad_corpus, two_nodes, tmp_path):
    cluster = two_nodes
    one_spec, one_node, one_out = prepared_bad_corpus  # prepared on the session's one-node Ray

    spec = tmp_path / "prep.yaml"
    spec.write_text(yaml.safe_dump(bad_corpus_spec(list(one_spec.inputs), str(tmp_path / "two"))))
    process = _qformer("prep", spec, cluster.address)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output

    two_nodes_manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert two_nodes_manifest["drops"] == one_node["drops"]
    assert two_nodes_manifest["totals"] == one_node["totals"] and one_node["totals"]["samples_out"] > 0
    assert _rows(tmp_path / "two") == _rows(one_out)


STEPS = 40  # enough that a kill at the first checkpoint lands mid-stage


def _stage2_job(name: str, storage: str, prepared: str, **storage_options) -> dict:
    """Stage 2 alone (LM loss: no cross-rank terms), so a resumed run can be compared exactly
    with an uninterrupted one whatever the number of workers."""
    job = in_bf16(tiny_job(name, storage, prepared, stage1_steps=STEPS, stage2_steps=None, checkpoint_every=4,
                           **storage_options))
    job["stages"][0].update(name="caption", losses={"lm": 1.0})
    return job


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _lose_node(cluster, node) -> None:
    """Lose ``node`` as a crashed machine does: every process of it dies at once (the raylet's
    children, i.e. its Ray workers, then the raylet and the node's other Ray processes)."""
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    for child in raylet.children(recursive=True):
        child.kill()
    cluster.remove_node(node, allow_graceful=False)


def test_a_run_survives_losing_a_node(ray_2cpus, two_nodes, prepared_demo, tmp_path, s3_endpoint):
    import s3fs

    cluster = two_nodes
    head, (lost,) = cluster.head_node, list(cluster.worker_nodes)
    raw = _stage2_job("node-loss", "s3://test-bucket/node-loss", prepared_demo, endpoint_url=s3_endpoint)
    raw["scaling"]["max_failures"] = 1
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(raw))
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    stage = "test-bucket/node-loss/node-loss/caption"

    training = _qformer("train", spec, cluster.address)
    registered = wait_for_registered_checkpoint(fs, stage, lambda: training.poll() is None)
    first = json.loads(fs.cat(f"{stage}/{registered}/metadata.json"))
    _lose_node(cluster, lost)
    replacement = cluster.add_node(num_cpus=1)  # as an autoscaler replaces a lost machine
    output, _ = training.communicate(timeout=300)

    assert training.returncode == 0, output
    assert sorted(first["worker_nodes"]) == sorted([head.node_id, lost.node_id]), \
        "the two workers ran one on each node"
    fs.invalidate_cache()
    final = json.loads(fs.cat(f"{stage}/step-{STEPS:08d}/metadata.json"))
    assert first["step"] < STEPS, "the node was lost mid-stage"
    assert (final["resumed_from_step"] or 0) >= first["step"], "restarted from the last checkpoint"
    assert sorted(final["worker_nodes"]) == sorted([head.node_id, replacement.node_id])
    records = _records(fs.cat(f"{stage}/metrics.jsonl").decode())
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "every step logged exactly once"


@pytest.fixture(scope="module")
def uninterrupted(prepared_demo, tmp_path_factory) -> list[dict]:
    """The metrics of the stage-2 job run start to end on 2 workers."""
    folder = tmp_path_factory.mktemp("reference")
    run_training(job_spec(_stage2_job("reference", str(folder), prepared_demo)))
    return _records((folder / "reference" / "caption" / "metrics.jsonl").read_text())


def _assert_same_training(resumed: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), "every step logged exactly once"
    for mine, theirs in zip(resumed, expected):
        for key in ("loss_lm", "lr", "samples_seen"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (mine["step"], key)


def test_a_run_resumes_on_fewer_workers(ray_2cpus, uninterrupted, prepared_demo, tmp_path):
    raw = _stage2_job("resized", str(tmp_path), prepared_demo)
    raw["scaling"]["max_failures"] = 0
    stage = tmp_path / "resized" / "caption"

    def kill_the_workers_after_the_first_checkpoint():
        wait_for_registered_checkpoint(fsspec.filesystem("file"), str(stage), lambda: True)
        for pid in train_worker_pids():
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_workers_after_the_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(TrainError):
        run_training(job_spec(raw))
    killer.join()

    raw["scaling"]["workers"] = 1  # the re-submitted run has one node (one worker) left
    summary = run_training(job_spec(raw))
    assert summary["stages"][0]["step"] == STEPS
    final = json.loads(Path(summary["stages"][0]["checkpoint"], "metadata.json").read_text())
    assert (final["world_size"], final["data_streams"]) == (1, 2)
    # One worker trains both data streams (as accumulation): same samples, optimizer state,
    # schedule and global batch as the two workers, so the same losses.
    _assert_same_training(_records((stage / "metrics.jsonl").read_text()), uninterrupted)
