"""The quality benchmark's spec handling (the benchmark itself runs for ~20 minutes: it is run and
reported by hand, see README)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.bench.quality import load_benchmark_spec, split_prep
from pipeline.cli import main
from pipeline.spec import SpecError
from tests.helpers import REPO

SPEC = REPO / "jobs" / "bench_quality.yaml"


def test_the_test_split_is_prepared_like_the_train_split():
    job = load_benchmark_spec(str(SPEC), [])
    test = split_prep(job.prep, "test")
    assert test.inputs == ["data/bench-quality/raw/test/*.tar"]
    assert test.output == "data/bench-quality/prepared/test"
    assert test.tokenizers == job.prep.tokenizers and test.image == job.prep.image
    # The periodic evaluation reads the split the benchmark prepares.
    assert {stage.eval.data for stage in job.stages} == {test.output}


def test_a_spec_without_a_train_folder_or_without_two_stages_is_refused(tmp_path, capsys):
    raw = yaml.safe_load(SPEC.read_text())
    raw["prep"]["output"] = "data/prepared"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="prep.output: 'data/prepared' has no `train` folder"):
        load_benchmark_spec(str(bad), [])
    assert main(["bench", "quality", "--spec", str(bad)]) == 2
    assert "has no `train` folder" in capsys.readouterr().err
    with pytest.raises(SpecError, match="needs a stage-1 and a stage-2 stage"):
        load_benchmark_spec(str(SPEC), ["stages.1.losses={itc: 1.0}"])
