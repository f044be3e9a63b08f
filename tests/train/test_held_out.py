"""``data.held_out_shards``: the last prepared shards kept out of training for ``eval.data:
held_out``; a count that leaves nothing to train on is one line, exit 2, before any cluster work.
(A run that trains and evaluates on held-out shards: tests/train/test_training.py end to end, and
the README's main job: tests/train/test_newcomer_demo.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.eval.summary import held_out_line
from pipeline.io.storage import Location
from pipeline.train import run as train_run
from pipeline.train.run import TrainError, _split_held_out, run_training
from tests.train.helpers import job_spec, tiny_job


def _prepared_folder(tmp_path: Path, shards: int) -> str:
    """A prep output folder whose manifest lists ``shards`` shards (only the manifest is read
    before cluster work)."""
    folder = tmp_path / "prepared"
    folder.mkdir(parents=True)
    entries = [{"output": str(folder / f"{i:05d}.parquet")} for i in range(shards)]
    (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return str(folder)


def _job(tmp_path: Path, held_out: int, shards: int = 4) -> dict:
    raw = tiny_job("held", str(tmp_path / "runs"), _prepared_folder(tmp_path, shards))
    raw["data"]["held_out_shards"] = held_out
    raw["stages"][0]["eval"] = {"data": "held_out", "every": 2}
    return raw


def test_the_last_shards_in_corpus_order_are_held_out(tmp_path):
    shards = tuple(Location.of(str(tmp_path / f"{i:05d}.parquet")) for i in range(5))
    assert _split_held_out(job_spec(_job(tmp_path, 2)), shards) == (shards[:3], shards[3:])
    raw = _job(tmp_path / "none", 0)
    del raw["stages"][0]["eval"]
    assert _split_held_out(job_spec(raw), shards) == (shards, ())
    with pytest.raises(TrainError, match=r"^data\.held_out_shards: 5 would hold out all 5 prepared shards; "
                                         r"at most 4 can be held out") as raised:
        _split_held_out(job_spec(_job(tmp_path / "all", 5)), shards)
    assert raised.value.exit_status == 2


@pytest.mark.parametrize("held_out", [4, 9])
def test_holding_out_every_shard_stops_before_any_cluster_work(tmp_path, monkeypatch, held_out):
    started = []
    monkeypatch.setattr(train_run, "ensure_ray", lambda *args: started.append(args))
    with pytest.raises(TrainError, match=rf"^data\.held_out_shards: {held_out} would hold out all 4 "):
        run_training(job_spec(_job(tmp_path, held_out)))
    assert started == []


def test_raw_data_is_counted_by_its_input_shards_before_prep(tmp_path, monkeypatch):
    raw = _job(tmp_path, 2)
    for i in range(2):
        (tmp_path / f"{i}.tar").write_bytes(b"")
    raw["data"] = {"raw": {"inputs": [str(tmp_path / "*.tar")], "output": "ignored",
                           "tokenizers": {"qformer": {"name": "tiny:bert"}}}, "held_out_shards": 2}
    started = []
    monkeypatch.setattr(train_run, "ensure_ray", lambda *args: started.append(args))
    with pytest.raises(TrainError, match=r"^data\.held_out_shards: 2 would hold out all 2 prepared shards"):
        run_training(job_spec(raw))
    assert started == []


def test_the_command_says_it_in_one_line_with_exit_status_2(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_job(tmp_path, 4)))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.held_out_shards: 4 would hold out all 4 prepared shards; at most 3 "
                          "can be held out, leaving one to train on"), err
    assert len(err.strip().splitlines()) == 1


def test_the_summary_line_gives_each_objectives_figures():
    stage1 = {"step": 100, "samples": 181, "caption_accuracy": 0.6243, "caption_chance": 1 / 24,
              "t2i_r1": 0.5, "itm_accuracy": 0.71}
    assert held_out_line("stage1", stage1) == (
        "stage stage1: held out at step 100, 181 samples: caption retrieval accuracy 0.624 (chance 0.042), "
        "text->image R@1 0.500, ITM accuracy 0.710")
    stage2 = {"step": 60, "samples": 181, "token_f1": 0.8, "exact_match": 0.5, "caption_loss": 1.25}
    assert held_out_line("stage2", stage2) == (
        "stage stage2: held out at step 60, 181 samples: caption token F1 0.800, exact match 0.500, "
        "caption loss 1.250")
