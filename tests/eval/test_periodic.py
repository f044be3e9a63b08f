"""Periodic evaluation's checks before training (the records themselves are checked by
tests/train/test_training.py::test_two_stage_curriculum_end_to_end)."""

from __future__ import annotations

import os

import pytest

from pipeline.eval.periodic import resolve_stage_evals
from tests.train.helpers import job_spec, tiny_job


def _job_with_eval(prepared: str, data: str):
    raw = tiny_job("periodic", "runs", prepared)
    raw["stages"][0]["eval"] = {"data": data, "every": 2}
    return job_spec(raw)


def test_held_out_paths_become_absolute_for_the_workers(prepared_demo, monkeypatch):
    parent, name = os.path.split(prepared_demo)
    monkeypatch.chdir(parent)
    job = resolve_stage_evals(_job_with_eval(prepared_demo, name))
    assert job.stages[0].eval.data == prepared_demo
    assert job.stages[1].eval is None


def test_missing_held_out_data_is_named_before_training(prepared_demo, tmp_path):
    with pytest.raises(ValueError, match=r"stages.stage1.eval: data: .*/nowhere has no manifest.json"):
        resolve_stage_evals(_job_with_eval(prepared_demo, str(tmp_path / "nowhere")))
