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


def test_held_out_names_the_shards_kept_out_of_training(prepared_demo):
    from pipeline.data.prepared import shards_from_manifest
    from pipeline.io.storage import Location
    from pipeline.train.run import _split_held_out

    raw = tiny_job("periodic", "runs", prepared_demo)
    raw["data"]["held_out_shards"] = 1
    raw["stages"][1]["eval"] = {"data": "held_out", "every": 2}
    job = job_spec(raw)
    training, held_out = _split_held_out(job, shards_from_manifest(Location.of(prepared_demo).child("manifest.json")))
    assert [s.url for s in held_out] == [f"{prepared_demo}/00003.parquet"] and len(training) == 3
    job = resolve_stage_evals(job, held_out)
    assert job.stages[1].eval.data == [f"{prepared_demo}/00003.parquet"]


def test_fewer_held_out_samples_than_workers_are_refused_before_training(prepared_demo):
    raw = tiny_job("periodic", "runs", prepared_demo)
    raw["scaling"]["workers"] = 61
    raw["stages"][0]["eval"] = {"data": f"{prepared_demo}/00000.parquet", "every": 2}
    with pytest.raises(ValueError, match=r"^stages.stage1.eval: 60 held-out samples cannot be shared by 61 workers$"):
        resolve_stage_evals(job_spec(raw))
