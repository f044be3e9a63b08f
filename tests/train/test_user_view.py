"""What a user sees: the README's commands with a console of our own lines only, the run in
TensorBoard, MLflow and W&B, and ``qformer status`` on a running, a killed and a finished run
(whose resumed losses are those of an undisturbed run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import yaml

from pipeline.train.run import run_training
from tests.helpers import REPO, tensorboard_scalars
from tests.train.helpers import (
    NEWCOMER_COMMANDS,
    in_bf16,
    job_spec,
    tiny_job,
    wait_for_registered_checkpoint,
    wandb_history,
)

NOISE = ("Token authentication", "core_worker.cc", "Progress bars disabled", "deepspeed_shm_comm_op",
         "Loading weights", "FutureWarning", "all_gather_into_tensor", "deduplicates logs",
         "Checkpoint successfully created", "Reporting training result", "RayTrainWorker",
         "TrainController", "PlacementGroup", "Traceback", "WARNING", "INFO")
"""Other programs' lines that a plain `qformer train` printed before this console existed."""

OUR_LINES = re.compile(r"(train: |prep: |\[stage\d\] |stage stage\d: |vision tower: |run folder: |next:$|"
                       r"  (status|curves|evaluate|export): +qformer |  curves: +tensorboard |prep done: |wrote )")


def _qformer(command: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    argv = command.split()
    assert argv[0] == "qformer"
    result = subprocess.run([sys.executable, "-m", "pipeline", *argv[1:]], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)  # not a terminal
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_newcomer_commands_show_only_our_lines_and_the_run_is_in_tensorboard_mlflow_wandb_and_status(
        tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the [mlflow] extra")  # installed by .ci/install
    pytest.importorskip("wandb", reason="the [wandb] extra")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store opt-in
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    results = {command: _qformer(command, tmp_path, env) for command in NEWCOMER_COMMANDS}

    for command in NEWCOMER_COMMANDS[1:3]:
        console = results[command].stdout + results[command].stderr
        for noise in NOISE:
            assert noise not in console, f"{command} printed {noise!r}:\n{console}"
        lines = console.splitlines()
        assert all(OUR_LINES.match(line) for line in lines), console
        assert len(lines) <= 25, console
    train = results[NEWCOMER_COMMANDS[2]]
    assert "train: run demo-tiny" in train.stderr and "[stage1] step 30/30 |" in train.stderr
    assert "[stage2] step 20/20 |" in train.stderr and "next:" in train.stdout
    log = re.search(r"qformer status (\S+)", train.stdout).group(1) + "/logs"
    [log_file] = Path(log).glob("train-*.log")
    assert "Reporting training result" in log_file.read_text(), "other programs' lines are in the log"

    run = tmp_path / "runs" / "demo-tiny"
    for stage, steps, loss in (("stage1", 30, "itc"), ("stage2", 20, "lm")):
        records = [r for r in _metrics(run / stage / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        scalars = tensorboard_scalars(str(run / stage))
        # TensorBoard keeps float32, metrics.jsonl the float64 the loop printed
        assert [s for s, _ in scalars["loss/total"]] == [r["step"] for r in records]
        assert [v for _, v in scalars["loss/total"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
        assert {f"loss/{loss}", "optim/lr", "throughput/samples_per_s", "time/data_wait_s"} <= set(scalars)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    history = client.get_metric_history(mlflow_run.info.run_id, "stage1/loss/total")
    assert sorted(m.step for m in history) == list(range(1, 31)) and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["stage2.checkpoint"].endswith("stage2/step-00000020")
    [wandb_file] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(wandb_file)
    assert [r["stage1/step"] for r in rows if "stage1/loss/total" in r] == list(range(1, 31))
    assert [r["stage2/step"] for r in rows if "stage2/loss/lm" in r] == list(range(1, 21))

    status = json.loads(results[NEWCOMER_COMMANDS[4]].stdout)
    assert status["state"] == "finished" and status["lease"] is None
    assert [(s["name"], s["state"], s["step"], s["steps"]) for s in status["stages"]] == [
        ("stage1", "done", 30, 30), ("stage2", "done", 20, 20)]
    assert status["stages"][1]["final_checkpoint"].endswith("stage2/step-00000020")
    assert results[NEWCOMER_COMMANDS[3]].stdout.startswith(f"run {run}: finished\n")


def _status(run: Path, capsys, *options: str) -> str:
    """``qformer status RUN [OPTIONS]``'s output, run in this process (a reader of the run folder
    like any other; this saves starting a Python with torch for each look)."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["status", str(run), *options])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _start_train(spec: Path, ray_address: str = "local") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(spec)],
                            env={**os.environ, "RAY_ADDRESS": ray_address}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_killed_driver_resumes_with_identical_losses_and_status_follows_it(prepared_demo, ray_address, tmp_path,
                                                                             capsys, monkeypatch):
    """``qformer status`` on a running, a killed and a resumed finished run; the resumed run's
    losses are those of an undisturbed one (bf16) and its log shows every step once. The killed
    command started a Ray of its own (killed with it); the resuming one joins the session's."""
    for name in ("RAY_DEDUP_LOGS", "RAY_COLOR_PREFIX"):  # what `qformer` sets in its process
        monkeypatch.setenv(name, "0")
    job = in_bf16(tiny_job("watched", str(tmp_path), prepared_demo, stage1_steps=40, stage2_steps=None,
                           checkpoint_every=8))
    reference = run_training(job_spec({**job, "run": {**job["run"], "name": "reference"}}))
    expected = _metrics(tmp_path / "reference" / "stage1" / "metrics.jsonl")
    assert reference["stages"][0]["step"] == 40
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    run, stage = tmp_path / "watched", tmp_path / "watched" / "stage1"
    first = _start_train(spec)
    wait_for_registered_checkpoint(fsspec.filesystem("file"), str(stage), lambda: first.poll() is None)

    running = json.loads(_status(run, capsys, "--json"))
    assert running["state"] == "running", running
    assert running["lease"]["held"] and running["lease"]["purpose"] == "qformer train"
    [now] = running["stages"]
    assert now["state"] == "running" and 8 <= now["step"] < 40 and now["steps"] == 40
    assert now["samples_seen"] == now["step"] * 8 and set(now["losses"]) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert re.fullmatch(r".*/stage1/step-000000(08|16|24|32)", now["latest_checkpoint"])
    assert now["samples_per_s"] > 0 and now["eta_s"] is not None and now["starts"] == 1

    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (stage / "complete.json").exists()
    killed = json.loads(_status(run, capsys, "--json"))
    assert killed["state"] == "stopped" and not killed["lease"]["held"]
    assert "is gone" in killed["lease"]["stale_reason"]
    assert killed["stages"][0]["state"] == "stopped" and killed["stages"][0]["eta_s"] is None
    text = _status(run, capsys)
    assert f"run {run}: stopped" in text and "run the same qformer train command again to resume" in text

    second = _start_train(spec, ray_address)
    output, _ = second.communicate(timeout=400)
    assert second.returncode == 0, output
    start = int(re.search(r"\[stage1\] resumed at step (\d+)/40", output).group(1))  # on the console
    [log] = sorted((run / "logs").glob("train-*.log"))[-1:]  # the second command's log
    shown = re.findall(r"\[stage1\] step (\d+)/40 ", log.read_text())
    assert shown == [str(step) for step in range(start + 1, 41)], "one progress line per step"
    resumed = _metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 41))
    for mine, theirs in zip(resumed, expected):
        for key in ("loss", "loss_itc", "loss_itm", "loss_itg", "lr", "samples_seen"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
    finished = json.loads(_status(run, capsys, "--json"))
    assert finished["state"] == "finished" and finished["lease"] is None and finished["launches"] == 2
    [done] = finished["stages"]
    assert (done["state"], done["step"], done["starts"], done["resumes"], done["worker_restarts"]) == (
        "done", 40, 2, 1, 0)
