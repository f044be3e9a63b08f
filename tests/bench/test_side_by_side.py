"""``qformer bench train`` end to end: alternating rounds, median and spread, a quiet console."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_bench_train_reports_each_round_and_the_spread_on_a_quiet_console(ray_address, tmp_path):
    result = subprocess.run(  # joins the session's Ray rather than starting one
        [sys.executable, "-m", "pipeline", "bench", "train", "--rounds", "2", "--steps", "8",
         "--batch-size", "4", "--workdir", str(tmp_path / "work")],
        cwd=REPO, env={**os.environ, "RAY_ADDRESS": ray_address}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.splitlines()
    rounds = [line for line in out if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1", "round 2"], out
    ratios = [float(line.split("ratio ")[1].split(";")[0]) for line in rounds]
    summary = [line for line in out if line.startswith("ratio: median")]
    assert len(summary) == 1, out
    assert f"over 2 rounds ({min(ratios):.3f}-{max(ratios):.3f}" in summary[0]
    assert summary[0].split("target <= 1.15: ")[1] in ("met", "missed", "spread too wide to judge")
    # The quiet console: the workers' output and Ray's are in the log, not on the console.
    console = result.stdout + result.stderr
    assert "RayTrainWorker" not in console and "pid=" not in console, console[-3000:]
    logs = list((tmp_path / "work" / "logs").glob("bench-train-*.log"))
    assert len(logs) == 1 and "RayTrainWorker" in logs[0].read_text()
    assert f"other programs' output: {logs[0]}" in result.stderr
