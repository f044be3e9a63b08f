"""The curate benchmark's spec handling and its filter metrics (the benchmark itself trains four
stages for most of an hour: it is run and reported by hand, see README)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.bench.curate import _runs, filter_metrics, load_curate_benchmark_spec
from pipeline.bench.quality import split_prep
from pipeline.cli import main
from pipeline.spec import SpecError
from tests.helpers import REPO

SPEC = REPO / "jobs" / "bench_curate.yaml"


def test_the_runs_train_on_the_noisy_curated_and_clean_splits_with_the_same_stage_one():
    job = load_curate_benchmark_spec(str(SPEC), [])
    runs = _runs(job)
    assert {name: run.data.prepared for name, run in runs.items()} == {
        "noisy": "data/bench-curate/prepared/train-noisy", "curated": "data/bench-curate/curated",
        "clean": "data/bench-curate/prepared/train"}
    assert job.curate.input == split_prep(job.prep, "train-noisy").output
    assert runs["noisy"].stages == runs["curated"].stages == runs["clean"].stages == job.stages
    # CapFilt uses the noisy run's own model: its stage folder (the final checkpoint) ranks with
    # ITC and captions with its ITG head.
    assert job.curate.captioner.model == job.curate.ranker.model == f"{job.run.storage}/{runs['noisy'].run.name}/stage1"


def test_a_stage_two_captioner_is_trained_by_the_noisy_run_only(tmp_path):
    raw = yaml.safe_load(SPEC.read_text())
    raw["stages"].append({"name": "stage2", "losses": {"lm": 1.0}, "steps": 5, "batch_size": 2,
                          "init_from": "stage1", "optimizer": {"lr": 1e-4}})
    raw["curate"]["captioner"]["model"] = "runs/bench-curate-noisy/stage2"
    spec = tmp_path / "with_stage2.yaml"
    spec.write_text(yaml.safe_dump(raw))
    job = load_curate_benchmark_spec(str(spec), [])
    runs = _runs(job)
    assert [s.name for s in runs["noisy"].stages] == ["stage1", "stage2"]
    assert runs["curated"].stages == runs["clean"].stages == job.stages[:1]


def test_a_spec_without_curate_models_or_stages_is_refused(tmp_path, capsys):
    raw = yaml.safe_load(SPEC.read_text())
    del raw["curate"]["captioner"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="the benchmark needs a captioner and a ranker"):
        load_curate_benchmark_spec(str(bad), [])
    assert main(["bench", "curate", "--spec", str(bad)]) == 2
    assert "needs a captioner and a ranker" in capsys.readouterr().err
    with pytest.raises(SpecError, match="needs a stage-1 stage, then at most a stage-2 stage"):
        load_curate_benchmark_spec(str(SPEC), ["stages.0.losses={lm: 1.0}"])
    assert main(["bench", "curate", "--noise", "1.5"]) == 2


def outcome(key: str, wrong: bool, status: str, kept: list[str], web_kept: bool) -> dict:
    true = "a red circle"
    return {"key": key, "true": true, "web": "a blue circle" if wrong else true, "web_is_wrong": wrong,
            "status": status, "kept": kept, "web_filtered": not web_kept, "captions": []}


def test_filter_metrics_count_web_captions_filtered_out_against_the_known_wrong_ones():
    rows = [
        outcome("a", True, "kept", ["a red circle"], web_kept=False),          # wrong, filtered: hit
        outcome("b", True, "kept", ["a red circle", "a blue circle"], True),   # wrong, still kept: miss
        outcome("c", False, "kept", ["a red circle"], True),                   # right, kept
        outcome("d", False, "kept", ["a red square", "a red circle"], False),  # right, filtered: false alarm
        outcome("e", True, "score_too_low", [], False),                        # wrong, sample dropped: hit
    ]
    metrics = filter_metrics(rows)
    assert metrics["filter_precision"] == 2 / 3 and metrics["filter_recall"] == 2 / 3
    assert metrics["right_before"] == 2 / 5
    assert metrics["right_after"] == 3 / 4  # top kept caption of the four kept samples
    assert metrics["kept_captions_right"] == 4 / 6 and metrics["images_kept"] == 4 / 5
