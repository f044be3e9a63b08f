"""The README's main job as a newcomer runs it: a fresh clone with no ``../shared`` beside it and
an empty model cache, the real DINOv2-S from PyPI, and at the end held-out figures from a shard
the run did not train on: stage 1 retrieves the right caption for at least half the images
(chance 1/24), stage 2 reports its caption token F1. Then what the README tells a newcomer to
run next: ``qformer status``, ``qformer eval`` on the held-out shard and ``qformer export``.
``.ci/run`` leaves the main job to this test rather than run it a second time.

It takes about 10 minutes on 2 quiet CPU cores (more on a busy machine); the figures and time are
written to ``newcomer_demo.json`` in the test's folder and printed (``pytest -s``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.train.helpers import DEMO_FOLLOW_UP_COMMANDS, readme_main_job

RETRIEVAL = re.compile(r"^stage stage1: held out at step 100, (\d+) samples: caption retrieval accuracy "
                       r"([\d.]+) \(chance ([\d.]+)\)", re.MULTILINE)
TOKEN_F1 = re.compile(r"^stage stage2: held out at step 60, (\d+) samples: caption token F1 ([\d.]+), "
                      r"exact match ([\d.]+)", re.MULTILINE)


def _fresh_clone(into: Path) -> Path:
    """The repository's tracked files, as they are in the work tree, in ``into/qformer-pipeline``."""
    clone = into / "qformer-pipeline"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    return clone


@pytest.mark.slow
def test_the_readme_main_job_on_a_fresh_clone_learns_what_held_out_data_shows(tmp_path):
    clone = _fresh_clone(tmp_path)
    assert not (clone.parent / "shared").exists()
    commands = readme_main_job()
    assert [c.split()[:2] for c in commands] == [["qformer", "demo-corpus"], ["qformer", "prep"], ["qformer", "train"]]
    env = {**os.environ, "PYTHONPATH": str(clone), "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "QFORMER_CACHE": str(tmp_path / "cache")}
    started = time.monotonic()
    outputs = []
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "pipeline", *command.split()[1:]], cwd=clone, env=env,
                                capture_output=True, text=True, timeout=3600)
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout + result.stderr)
    elapsed = time.monotonic() - started
    train = outputs[-1]

    assert "vision tower: pypi:vit-dinov2-small\n" in train and "FALLBACK" not in train, train
    retrieval, token_f1 = RETRIEVAL.search(train), TOKEN_F1.search(train)
    assert retrieval and token_f1, train
    held_out = json.loads((clone / "runs" / "demo" / "summary.json").read_text())["held_out"]
    assert held_out == [str(clone / "data" / "demo" / "prepared" / "00006.parquet")]
    figures = {"seconds": round(elapsed), "held_out_samples": int(retrieval.group(1)),
               "caption_retrieval_accuracy": float(retrieval.group(2)), "chance": float(retrieval.group(3)),
               "token_f1": float(token_f1.group(2)), "exact_match": float(token_f1.group(3))}
    (tmp_path / "newcomer_demo.json").write_text(json.dumps(figures, indent=1))
    print(f"\nnewcomer demo: {figures}")
    assert figures["chance"] == pytest.approx(1 / 24, abs=1e-3)
    assert figures["caption_retrieval_accuracy"] >= 0.5, train
    assert 0.0 <= figures["token_f1"] <= 1.0

    status, evaluation, export = (
        subprocess.run([sys.executable, "-m", "pipeline", *command.split()[1:]], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=1200) for command in DEMO_FOLLOW_UP_COMMANDS)
    for command, result in zip(DEMO_FOLLOW_UP_COMMANDS, (status, evaluation, export)):
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    assert status.stdout.startswith(f"run {clone / 'runs' / 'demo'}: finished\n"), status.stdout
    accuracy = re.search(r"stage1 step 100 on 128 samples: .*caption_accuracy ([\d.]+)", evaluation.stdout + evaluation.stderr)
    assert accuracy and float(accuracy.group(1)) >= 0.5, evaluation.stdout + evaluation.stderr
    assert "exported" in export.stdout and any((clone / "out" / "demo-stage2").glob("*.safetensors")), export.stdout
