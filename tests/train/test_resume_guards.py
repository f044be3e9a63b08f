"""What a re-run of ``qformer train`` refuses before any cluster work: a spec that changes what a
checkpoint trained, a run folder another run holds; and what it tolerates: a torn metrics line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.io.lease import hold_lease
from pipeline.io.storage import Location
from pipeline.train.metrics import read_records
from pipeline.train.resume import SpecChanged, check_resumable
from tests.helpers import one_error_line
from tests.train.helpers import job_spec, tiny_job


def _registered_checkpoint(run: Path, raw: dict, stage: str = "stage1", step: int = 3) -> Path:
    """A stage folder holding one checkpoint (metadata only) that Ray Train registered."""
    folder = run / stage / f"step-{step:08d}"
    folder.mkdir(parents=True)
    stage_index = [s["name"] for s in raw["stages"]].index(stage)
    spec = job_spec(raw).model_dump(mode="json")
    (folder / "metadata.json").write_text(json.dumps({"stage": stage, "stage_index": stage_index,
                                                      "step": step, "spec": spec}))
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": folder.name}}
    (run / stage / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return folder


@pytest.fixture
def saved(tmp_path) -> tuple[dict, Path]:
    raw = tiny_job("guarded", str(tmp_path / "runs"), str(tmp_path / "prepared"))
    return raw, _registered_checkpoint(tmp_path / "runs" / "guarded", raw)


def test_changes_to_what_a_stage_trains_are_refused_naming_each_field(saved):
    raw, checkpoint = saved
    changed = json.loads(json.dumps(raw))
    changed["stages"][0]["batch_size"] = 8
    changed["stages"][0]["optimizer"]["lr"] = 5e-4
    changed["model"]["qformer"]["num_query_tokens"] = 8
    changed["data"]["held_out_shards"] = 1  # other shards to train on
    with pytest.raises(SpecChanged) as refused:
        check_resumable(job_spec(changed), 0, Location.of(str(checkpoint)))
    message = str(refused.value)
    assert "stages.0.batch_size: 4 in the checkpoint, 8 now" in message
    assert "stages.0.optimizer.lr: 0.001 in the checkpoint, 0.0005 now" in message
    assert "model.qformer.num_query_tokens: 4 in the checkpoint, 8 now" in message
    assert "data.held_out_shards: 0 in the checkpoint, 1 now" in message


def test_harmless_and_accepted_changes_pass_and_are_listed(saved):
    raw, checkpoint = saved
    changed = json.loads(json.dumps(raw))
    changed["scaling"]["workers"] = 1
    changed["deepspeed"]["zero_stage"] = 3
    changed["stages"][0]["checkpoint_every"] = 5
    changed["stages"][0]["steps"] = 20
    changed["stages"][0]["optimizer"]["lr"] = 5e-4
    changed["run"]["accept_changes"] = ["stages.0.optimizer.lr"]
    accepted = check_resumable(job_spec(changed), 0, Location.of(str(checkpoint)))
    assert "stages.0.optimizer.lr: 0.001 in the checkpoint, 0.0005 now" in accepted
    assert "stages.0.steps: 6 in the checkpoint, 20 now" in accepted and len(accepted) == 6


@pytest.fixture
def no_ray(monkeypatch):
    """Make the driver's Ray start an error: a test that passes never got that far."""
    import pipeline.train.run

    def refuse(*args, **kwargs):
        raise AssertionError("the driver started Ray")

    monkeypatch.setattr(pipeline.train.run, "ensure_ray", refuse)


def test_qformer_train_refuses_a_changed_spec_in_one_line_before_ray_starts(saved, tmp_path, capsys, no_ray):
    raw, _ = saved
    raw["stages"][0]["batch_size"] = 8
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(raw))
    assert main(["train", str(spec)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("error: stage stage1 resumes from") and "stages.0.batch_size: 4" in err


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_second_run_on_a_held_run_folder_is_refused_naming_the_holder(storage, tmp_path, capsys, request, no_ray):
    if storage == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        raw = tiny_job("held", "s3://test-bucket/leased", str(tmp_path / "prepared"), endpoint_url=endpoint)
        folder = Location.of("s3://test-bucket/leased/held", job_spec(raw).run.storage_options)
    else:
        raw = tiny_job("held", str(tmp_path / "runs"), str(tmp_path / "prepared"))
        folder = Location.of(str(tmp_path / "runs" / "held"))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(raw))
    with hold_lease(folder, purpose="another qformer train"):
        assert main(["train", str(spec)]) == 2
    assert "another qformer train" in one_error_line(capsys.readouterr().err)


def test_a_torn_last_metrics_line_is_dropped_and_said(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    assert [r["step"] for r in read_records(Location.of(str(path)))] == [1, 2]
    assert "dropped a torn last line" in capsys.readouterr().out
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.8}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON record"):
        read_records(Location.of(str(path)))


def test_local_checkpoint_folders_of_dead_workers_are_removed(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import tempfile

    from pipeline.train.checkpoint import remove_stale_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left = tmp_path / f"qformer-ckpt-{dead}-abc"
    mine = tmp_path / f"qformer-ckpt-{os.getpid()}-def"
    for folder in (left, mine):
        folder.mkdir()
        (folder / "trainable.safetensors").write_bytes(b"x")
    assert remove_stale_folders() == [str(left)]
    assert not left.exists() and mine.exists()
