"""Training runs on a real local Ray with real DeepSpeed: curricula, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.checkpoint.status import run_status
from pipeline.io.storage import Location
from pipeline.model import Blip2Pretrainer
from pipeline.train.run import run_training
from tests.train.helpers import (
    in_bf16,
    job_spec,
    tiny_job,
    train_worker_pids,
    wait_for_registered_checkpoint,
)

FROZEN_PREFIXES = ("vision_model.", "language_model.")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _tensor_bytes(path: Path) -> int:
    """A safetensors file's size without its header (8-byte length + JSON)."""
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("zero_stage, precision", [(2, "fp32"), (3, "bf16")])
def test_two_stage_curriculum_end_to_end(prepared_demo, tmp_path, zero_stage, precision):
    raw = tiny_job("curriculum", str(tmp_path), prepared_demo, zero_stage=zero_stage)
    if precision == "bf16":
        raw = in_bf16(raw)
    for stage in raw["stages"]:  # periodic held-out evaluation (the training data stands in)
        stage["eval"] = {"data": prepared_demo, "every": 3, "max_samples": 12, "batch_size": 4,
                         "itm_top_k": 2, "max_new_tokens": 3}
    job = job_spec(raw)
    summary = run_training(job)
    run = tmp_path / "curriculum"

    assert [s["stage"] for s in summary["stages"]] == ["stage1", "stage2"]
    assert [s["step"] for s in summary["stages"]] == [6, 4]
    evaluated = {"stage1": {"eval_caption_accuracy", "eval_t2i_r1", "eval_i2t_itm_r1", "eval_itm_accuracy"},
                 "stage2": {"eval_exact_match", "eval_token_f1", "eval_caption_loss"}}
    for stage, steps, losses in (("stage1", 6, {"loss_itc", "loss_itm", "loss_itg"}), ("stage2", 4, {"loss_lm"})):
        all_records = _metrics(run / stage / "metrics.jsonl")
        evals = [r for r in all_records if "eval_samples" in r]
        assert [r["step"] for r in evals] == [3, steps] and all(r["eval_samples"] == 12 for r in evals)
        assert all(evaluated[stage] <= set(r) for r in evals)
        records = [r for r in all_records if "loss" in r]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert losses <= set(records[0]) and {"lr", "samples_per_s", "tokens_per_s", "data_wait_s"} <= set(records[0])
        assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
        assert (run / stage / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sorted(p.name for p in (run / stage).glob("step-*")) == ["step-00000003", f"step-{steps:08d}"]

    # Every stage's checkpoints hold the trainable state only, once: fp32 masters and AdamW
    # moments (no frozen tensor, not a tied embedding's second name, no second copy).
    for index, stage_summary in enumerate(summary["stages"]):
        stage_spec = job.stages[index]
        model = Blip2Pretrainer(job.model, objective=stage_spec.objective, loss_weights=stage_spec.losses)
        names = set(model.trainable_state_dict())
        folder = Path(stage_summary["checkpoint"])
        trainable = load_file(folder / "trainable.safetensors")
        moments = load_file(folder / "optimizer.safetensors")
        assert set(trainable) == names and all(t.dtype == torch.float32 for t in trainable.values())
        assert set(moments) == {f"{n}.{m}" for n in names for m in ("exp_avg", "exp_avg_sq")}
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "metrics.jsonl",
                                                             "optimizer.safetensors", "trainable.safetensors"]
        counts = model.parameter_counts()
        assert sum(t.numel() for t in trainable.values()) == counts.trainable
        # 12 bytes a trainable parameter (fp32 master + two moments) and nothing else but the
        # safetensors headers and a few kB of metadata and metrics.
        payload = sum(_tensor_bytes(folder / name) for name in ("trainable.safetensors", "optimizer.safetensors"))
        assert payload == 12 * counts.trainable
        assert _folder_bytes(folder) - payload < 64_000
        dtypes = json.loads((folder / "metadata.json").read_text())["dtypes"]
        expected = {"vision": raw["model"]["vision"]["dtype"], "trainable": "bfloat16" if precision == "bf16" else "float32",
                    "masters": "float32"}
        if stage_spec.objective == 2:
            expected["llm"] = raw["model"]["llm"]["dtype"]
        assert dtypes == expected
        if precision == "bf16":  # the masters were never rounded to the working precision
            assert any(not torch.equal(t.bfloat16().float(), t) for t in trainable.values())
    trainable = load_file(Path(summary["stages"][0]["checkpoint"]) / "trainable.safetensors")

    # Stage 2 started from stage 1's trained Q-Former, not from a fresh initialisation.
    stage2 = Blip2Pretrainer(job.model, objective=2, loss_weights=job.stages[1].losses)
    fresh = stage2.trainable_state_dict()
    final2 = load_file(Path(summary["stages"][1]["checkpoint"]) / "trainable.safetensors")
    shared = [k for k in final2 if k.startswith("qformer.") and k in trainable]
    assert shared
    moved_from_stage1 = max(float((final2[k] - trainable[k]).abs().max()) for k in shared)
    distance_to_fresh = max(float((final2[k] - fresh[k]).abs().max()) for k in shared)
    assert moved_from_stage1 < distance_to_fresh


def test_killed_worker_restarts_from_last_checkpoint(prepared_demo, tmp_path):
    raw = tiny_job("worker-kill", str(tmp_path), prepared_demo, stage1_steps=12, stage2_steps=None,
                   checkpoint_every=4)
    run = tmp_path / "worker-kill" / "stage1"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        wait_for_registered_checkpoint(fsspec.filesystem("file"), str(run), lambda: True)
        pids = train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = run_training(job_spec(raw))
    killer.join()

    assert killed, "no Ray Train worker was found to kill"
    assert summary["stages"][0]["step"] == 12
    final = json.loads(Path(summary["stages"][0]["checkpoint"], "metadata.json").read_text())
    assert final["resumed_from_step"] == 4, "the restarted workers continued from the checkpoint"
    steps = [r["step"] for r in _metrics(run / "metrics.jsonl")]
    assert steps == list(range(1, 13)), "metrics must cover every step exactly once after the restart"
    [stage] = run_status(Location.of(str(tmp_path / "worker-kill")))["stages"]
    assert (stage["starts"], stage["worker_restarts"], stage["resumes"]) == (2, 1, 0), "qformer status sees it"


def _start_train(spec: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(spec)],
                            env={**os.environ, "RAY_ADDRESS": "local"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_driver_killed_resumes_from_s3_checkpoints_with_identical_losses(prepared_demo, tmp_path, s3_endpoint):
    import s3fs

    reference = run_training(job_spec(in_bf16(tiny_job("reference", str(tmp_path), prepared_demo,
                                                       stage1_steps=8, stage2_steps=None, checkpoint_every=4))))
    expected = _metrics(tmp_path / "reference" / "stage1" / "metrics.jsonl")
    assert reference["stages"][0]["step"] == 8

    raw = in_bf16(tiny_job("resumed", "s3://test-bucket/runs", prepared_demo, stage1_steps=8,
                           stage2_steps=None, checkpoint_every=4, endpoint_url=s3_endpoint))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(raw))
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    first = _start_train(spec)
    wait_for_registered_checkpoint(fs, "test-bucket/runs/resumed/stage1", lambda: first.poll() is None)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not fs.exists("test-bucket/runs/resumed/stage1/complete.json")

    second = _start_train(spec)
    output, _ = second.communicate(timeout=400)
    assert second.returncode == 0, output
    start = int(re.search(r"resumed at step (\d+)/8", output).group(1))  # on the console
    fs.invalidate_cache()
    # The command's log, uploaded to the run folder, has every step's line once.
    [log] = fs.glob("test-bucket/runs/resumed/logs/train-*.log")
    shown = re.findall(r"\[stage1\] step (\d+)/8 ", fs.cat_file(log).decode())
    assert shown == [str(step) for step in range(start + 1, 9)], "one progress line per step"

    resumed = [json.loads(line) for line in fs.cat_file("test-bucket/runs/resumed/stage1/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for mine, theirs in zip(resumed, expected):
        for key in ("loss", "loss_itc", "loss_itm", "loss_itg", "lr", "samples_seen"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
    complete = json.loads(fs.cat_file("test-bucket/runs/resumed/stage1/complete.json"))
    assert complete["step"] == 8 and complete["checkpoint"].startswith("s3://test-bucket/runs/resumed/stage1/")
    status = run_status(Location("s3://test-bucket/runs/resumed", {"endpoint_url": s3_endpoint}))
    assert status["state"] == "finished" and status["lease"] is None and status["launches"] == 2
    [stage] = status["stages"]
    assert (stage["step"], stage["starts"], stage["resumes"], stage["worker_restarts"]) == (8, 2, 1, 0)


def test_raising_steps_continues_a_finished_stage_and_a_torn_metrics_line_is_dropped(prepared_demo, tmp_path):
    raw = tiny_job("longer", str(tmp_path), prepared_demo, stage1_steps=4, stage2_steps=None, checkpoint_every=2)
    first = run_training(job_spec(raw))
    stage = tmp_path / "longer" / "stage1"
    assert first["stages"][0]["step"] == 4
    with open(stage / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a writer killed mid-line

    raw["stages"][0]["steps"] = 6
    second = run_training(job_spec(raw))
    assert second["stages"][0]["step"] == 6
    assert json.loads((stage / "complete.json").read_text())["step"] == 6
    final = json.loads(Path(second["stages"][0]["checkpoint"], "metadata.json").read_text())
    assert final["resumed_from_step"] == 4
    assert [r["step"] for r in _metrics(stage / "metrics.jsonl") if "loss" in r] == list(range(1, 7))


def test_a_corrupt_sample_stops_training_at_once_with_its_name(prepared_demo, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.prepared import MANIFEST, shards_from_manifest
    from pipeline.train.run import TrainError

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    manifest = json.loads((Path(prepared_demo) / MANIFEST).read_text())
    for entry, shard in zip(manifest["shards"], shards_from_manifest(Location.of(prepared_demo).child(MANIFEST))):
        table = pq.read_table(shard.url)
        images = pa.array([b"not a jpeg"] * table.num_rows, pa.binary())
        entry["output"] = str(corrupt / Path(shard.url).name)
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", images),
                       entry["output"], row_group_size=30)
    (corrupt / MANIFEST).write_text(json.dumps(manifest))

    raw = tiny_job("corrupt", str(tmp_path), str(corrupt), stage2_steps=None)
    with pytest.raises(TrainError, match=r"sample '.*': cannot decode its image") as failed:
        run_training(job_spec(raw))
    assert "stage stage1 failed: " in str(failed.value) and "resumes from its last checkpoint" not in str(failed.value)
    assert not (tmp_path / "corrupt" / "stage1" / "metrics.jsonl").exists() or not _metrics(
        tmp_path / "corrupt" / "stage1" / "metrics.jsonl")
