"""Errors of ``qformer eval`` and ``qformer export`` that users meet: one ``error:`` line and exit 2,
found in the driver before any Ray actor starts (not once per actor, not as a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.cli import main
from pipeline.data.prepared import MANIFEST
from tests.helpers import REPO
from tests.train.helpers import job_spec, tiny_job


def _checkpoint(root: Path, weights: bytes | None = None) -> Path:
    """A stage-1 checkpoint folder whose metadata is valid; its weights are ``weights`` (bytes of
    a file) or one real tensor."""
    raw = tiny_job("broken", str(root / "runs"), str(root / "data"))
    folder = root / "runs" / "broken" / "stage1" / "step-00000003"
    folder.mkdir(parents=True)
    if weights is None:
        save_file({"temp": torch.ones(1)}, str(folder / "trainable.safetensors"))
    else:
        (folder / "trainable.safetensors").write_bytes(weights)
    (folder / "metadata.json").write_text(json.dumps({"stage": "stage1", "stage_index": 0, "step": 3,
                                                      "spec": job_spec(raw).model_dump(mode="json")}))
    return folder


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_eval_of_a_corrupt_weights_file(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path, weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["eval", str(checkpoint), "--data", str(tmp_path / "data")]) == 2
    assert "trainable.safetensors: unreadable" in _one_error(capsys)


def test_eval_on_a_corrupt_parquet_shard(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "00000.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (data / MANIFEST).write_text(json.dumps({"shards": [{"output": str(data / "00000.parquet")}]}))
    assert main(["eval", str(checkpoint), "--data", str(data)]) == 2
    assert "00000.parquet: not a readable prepared shard" in _one_error(capsys)


@pytest.mark.parametrize("command", ["eval", "export"])
def test_s3_checkpoints_without_credentials(command, s3_endpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    args = {"eval": ["--data", str(tmp_path / "data")], "export": [str(tmp_path / "out")]}[command]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", command, "s3://test-bucket/runs/x/stage1", *args,
         "--endpoint-url", s3_endpoint], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: s3://test-bucket/runs/x/stage1: no S3 credentials found")
