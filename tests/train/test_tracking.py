"""MLflow (its file store) and W&B (offline mode) runs of a training run: metrics per logged
step, the spec as parameters, final checkpoints as links, one run across resumes, no secrets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.io.storage import Location
from pipeline.train.tracking import Trackers, flat_params
from tests.train.helpers import job_spec, tiny_job, wandb_history

SECRET_URL = "https://reader:pa55word@data.example.com/heldout?X-Amz-Signature=sig0123456789"


def _job(tmp_path: Path, mlruns: str, wandb_dir: Path):
    raw = tiny_job("tracked", str(tmp_path / "runs"), str(tmp_path / "prepared"))
    raw["stages"][0]["eval"] = {"data": SECRET_URL, "every": 2}
    raw["run"]["tracking"] = {
        "run_name": "tracked-demo", "tags": {"team": "vision", "smoke": ""},
        "mlflow": {"tracking_uri": mlruns, "experiment": "qformer-tests"},
        "wandb": {"project": "qformer-tests", "mode": "offline", "dir": str(wandb_dir)},
    }
    return job_spec(raw)


def _record(step: int) -> dict:
    return {"step": step, "loss": 10.0 / step, "loss_itc": 3.0 / step, "lr": 1e-3, "samples_per_s": 50.0,
            "tokens_per_s": 900.0, "data_wait_s": 0.01, "step_time_s": 0.3, "samples_seen": 8 * step}


def test_mlflow_and_wandb_offline_hold_the_logged_steps_and_links(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the [mlflow] extra")  # installed by .ci/install
    pytest.importorskip("wandb", reason="the [wandb] extra")
    from mlflow import MlflowClient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-42")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store opt-in
    mlruns, wandb_dir = f"file:{tmp_path / 'mlruns'}", tmp_path / "wandb"
    job = _job(tmp_path, mlruns, wandb_dir)
    run_dir = Location.of(str(tmp_path / "runs" / "tracked"))
    plot = tmp_path / "runs" / "tracked" / "stage1" / "loss.png"

    trackers = Trackers.open(job, run_dir)
    for step in (1, 2, 3):
        trackers.log("stage1", _record(step))
    trackers.log("stage1", {"step": 2, "eval_caption_accuracy": 0.25, "eval_samples": 12, "eval_time_s": 1.0})
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot.write_bytes(b"\x89PNG\r\n\x1a\n not really drawn")
    trackers.stage_done({"stage": "stage1", "checkpoint": str(plot.parent / "step-00000003")}, run_dir)
    trackers.close()
    # Running the job again (a resume) continues the same runs. (W&B names an offline run's
    # folder by the second it started: a resume within the same second would share it.)
    time.sleep(1.1)
    again = Trackers.open(job, run_dir)
    again.log("stage2", {**_record(1), "loss_lm": 5.0})
    again.close()

    client = MlflowClient(tracking_uri=mlruns)
    runs = client.search_runs([client.get_experiment_by_name("qformer-tests").experiment_id])
    assert len(runs) == 1, "one MLflow run for the run folder, across resumes"
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "stage1/loss/total")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 5.0), (3, 10.0 / 3)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "stage1/eval/caption_accuracy")] == [0.25]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "stage2/loss/lm")] == [1]
    assert run.data.params["stages.0.steps"] == "6" and run.data.params["scaling.workers"] == "2"
    assert run.data.tags["team"] == "vision" and run.info.run_name == "tracked-demo"
    assert run.data.tags["stage1.checkpoint"].endswith("stage1/step-00000003")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "stage1")] == ["stage1/loss.png"]
    assert run.info.status == "FINISHED"

    runs_dir = list(wandb_dir.glob("wandb/offline-run-*"))
    assert len(runs_dir) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs_dir}) == 1, "one W&B run id"
    rows = [row for f in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")) for row in wandb_history(f)]
    losses = [(r["stage1/step"], r["stage1/loss/total"]) for r in rows if "stage1/loss/total" in r]
    assert losses == [(1, 10.0), (2, 5.0), (3, 10.0 / 3)]
    assert [(r["stage2/step"], r["stage2/loss/lm"]) for r in rows if "stage2/loss/lm" in r] == [(1, 5.0)]
    assert any(r.get("stage1/eval/caption_accuracy") == 0.25 for r in rows)

    # No secret anywhere in what the trackers wrote: not the URL's credentials or signature,
    # not the environment's.
    for folder in (tmp_path / "mlruns", wandb_dir):
        for file in folder.rglob("*"):
            if file.is_file():
                data = file.read_bytes()
                for secret in (b"pa55word", b"sig0123456789", b"env-secret-value-42"):
                    assert secret not in data, (file, secret)


def test_parameters_are_the_flattened_spec_without_url_credentials(tmp_path):
    params = flat_params(_job(tmp_path, "file:/unused", tmp_path))
    assert params["stages.0.eval.data"] == "https://data.example.com/heldout"
    assert params["model.vision.name"] == "tiny:vit" and params["deepspeed.zero_stage"] == "2"
    assert not [key for key in params if key.startswith("run.tracking")]
