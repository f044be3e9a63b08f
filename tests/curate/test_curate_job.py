"""``qformer curate`` on a real local Ray: every sample accounted for, curated shards training
reads, a rerun that skips, a killed run that resumes to the uninterrupted output, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from pipeline.curate.run import run_curate
from pipeline.data.prepared import shards_from_manifest
from pipeline.data.tokenize import CaptionTokenizer
from pipeline.io.storage import Location
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec
from pipeline.spec.prep import TokenizerSpec
from pipeline.train.loader import BatchStream, LoaderConfig
from tests.curate.helpers import save_tiny_blip, save_tiny_clip, write_checkpoint


@pytest.fixture(scope="module")
def checkpoints(prepared_demo, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("curate-checkpoints")
    return {"stage1": str(write_checkpoint(root / "run" / "stage1" / "step-00000003", prepared_demo, 0).parent),
            "stage2": str(write_checkpoint(root / "run" / "stage2" / "step-00000003", prepared_demo, 1).parent)}


def curate_section(prepared: str, output: str, checkpoints: dict, **select) -> dict:
    return {"curate": {
        "input": prepared, "output": output,
        "near_duplicates": {"enabled": True, "threshold": 4},
        "captioner": {"model": checkpoints["stage2"], "captions": 3, "max_new_tokens": 5, "batch_size": 16},
        "ranker": {"model": checkpoints["stage1"], "batch_size": 16},
        "select": {"keep": 2, "top_fraction": 0.7, **select},
        "execution": {"rows_per_row_group": 20},
    }}


def shard_tables(out: Path) -> dict[str, list[dict]]:
    return {p.relative_to(out).as_posix(): pq.read_table(p).to_pylist()
            for p in sorted(out.glob("*.parquet")) + sorted((out / "provenance").glob("*.parquet"))}


@pytest.fixture(scope="module")
def curated(ray_2cpus, prepared_demo, checkpoints, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("curated") / "out"
    spec = validate_spec(curate_section(prepared_demo, str(out), checkpoints), JobSpec).curate
    return out, run_curate(spec)


def test_every_sample_is_accounted_for_with_its_status_scores_and_captions(prepared_demo, curated):
    out, manifest = curated
    prepared = json.loads((Path(prepared_demo) / "manifest.json").read_text())
    rows = pads.dataset(str(out / "provenance"), format="parquet").to_table().to_pylist()
    assert len(rows) == manifest["totals"]["samples_in"] == prepared["totals"]["samples_out"]
    statuses = Counter(row["status"] for row in rows)
    assert {k: v for k, v in statuses.items() if k != "kept"} == manifest["drops"]
    assert statuses["kept"] == manifest["totals"]["samples_out"]
    assert set(manifest["phases"]) == {"hash", "caption", "rank", "write"}
    assert all(phase["images_per_s_per_cpu"] > 0 for phase in manifest["phases"].values())

    by_key = {row["key"]: row for row in rows}
    near = [row for row in rows if row["status"] == "near_duplicate"]
    assert all(by_key[row["duplicate_of"]]["key"] < row["key"] for row in near)  # demo keys follow corpus order
    cut = manifest["score_cut"]["cut"]
    scored = [row for row in rows if row["best_score"] is not None]
    assert len(scored) == len(rows) - len(near)
    kept = [row for row in scored if row["status"] == "kept"]
    assert all(row["best_score"] >= cut for row in kept)
    assert all(row["best_score"] < cut and row["status"] == "score_not_in_top_fraction"
               for row in scored if row["status"] != "kept")
    assert abs(len(kept) / len(scored) - 0.7) < 0.05
    for row in kept:
        candidates = row["captions"]
        assert candidates[0]["origin"] == "web" and {c["origin"] for c in candidates[1:]} <= {"synthetic"}
        chosen = sorted((c for c in candidates if c["kept"]), key=lambda c: -c["score"])
        assert len(chosen) == min(2, len(candidates))
        assert chosen[0]["score"] == row["best_score"]


def test_curated_shards_hold_every_kept_caption_tokenized_as_prep_does(curated):
    out, manifest = curated
    tokenizer = CaptionTokenizer(TokenizerSpec(**{k: manifest["tokenizers"]["qformer"][k]
                                                  for k in ("name", "max_length")}), append_eos=False)
    provenance = {row["key"]: row for row in pads.dataset(str(out / "provenance"), format="parquet").to_table().to_pylist()}
    for shard in shards_from_manifest(Location.of(str(out / "manifest.json"))):
        for row in pq.read_table(shard.url).to_pylist():
            kept = sorted((c for c in provenance[row["key"]]["captions"] if c["kept"]), key=lambda c: -c["score"])
            assert row["captions"] == [c["text"] for c in kept] and row["caption"] == kept[0]["text"]
            assert row["caption_count"] == len(kept)
            tokens = tokenizer(row["captions"])
            assert np.array_equal(np.array(row["qformer_captions_input_ids"]), tokens.input_ids)
            assert row["qformer_input_ids"] == tokens.input_ids[0].tolist()


def test_training_reads_the_curated_shards(curated):
    out, _ = curated
    shards = shards_from_manifest(Location.of(str(out / "manifest.json")))
    config = LoaderConfig(shards=shards, batch_size=4, image_size=32, text="llm", augment=False)
    with BatchStream(config, 0, 1) as stream:
        batch = next(stream)
    assert batch["llm_input_ids"].shape == (4, 16) and batch["pixel_values"].shape == (4, 3, 32, 32)


def test_a_rerun_skips_the_finished_shards(prepared_demo, checkpoints, curated):
    out, manifest = curated
    before = shard_tables(out)
    spec = validate_spec(curate_section(prepared_demo, str(out), checkpoints), JobSpec).curate
    again = run_curate(spec)
    # Nothing left to do: the phases' figures are those of the run that did the work.
    assert again["phases"] == manifest["phases"] and again["totals"] == manifest["totals"]
    assert shard_tables(out) == before
    other = validate_spec(curate_section(prepared_demo, str(out), checkpoints, keep=1), JobSpec).curate
    with pytest.raises(Exception, match="holds the output of a different curate spec"):
        run_curate(other)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"run ended before the kill point: {process.stderr.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
    process.wait()


def test_a_killed_run_resumes_to_the_uninterrupted_output(prepared_demo, checkpoints, curated, ray_address, tmp_path):
    reference, _ = curated
    out = tmp_path / "out"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(curate_section(prepared_demo, str(out), checkpoints)))
    def start(address: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "curate", str(spec_path)],
                                env={**os.environ, "RAY_ADDRESS": address}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    # Killed once a shard's synthetic captions are written (the others are not yet ranked), with
    # the Ray it started; the run that finishes joins the session's Ray.
    _kill_when(start("local"), lambda: any((out / "_work" / "captions").glob("*.parquet")))
    final = start(ray_address)
    _, stderr = final.communicate(timeout=900)
    assert final.returncode == 0, stderr
    assert shard_tables(out) == shard_tables(reference)
    assert not list(out.rglob("*.tmp-*"))


def test_transformers_captioner_and_ranker_curate_from_and_to_s3(ray_2cpus, s3_endpoint, prepared_demo, tmp_path):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)  # a prefix of its own in the session's bucket
    fs.put(prepared_demo, "test-bucket/curate-input", recursive=True)
    manifest = json.loads(fs.cat_file("test-bucket/curate-input/manifest.json"))
    for entry in manifest["shards"]:  # the copied folder's manifest names its own shards
        entry["output"] = f"s3://test-bucket/curate-input/{entry['name']}.parquet"
    fs.pipe_file("test-bucket/curate-input/manifest.json", json.dumps(manifest).encode())
    raw = {"curate": {
        "input": "s3://test-bucket/curate-input", "output": "s3://test-bucket/curate-output",
        "storage": {"endpoint_url": s3_endpoint},
        "captioner": {"model": str(save_tiny_blip(tmp_path / "blip")), "captions": 2, "max_new_tokens": 4},
        "ranker": {"model": str(save_tiny_clip(tmp_path / "clip"))},
        "select": {"keep": 1},
    }}
    result = run_curate(validate_spec(raw, JobSpec).curate)
    fs.invalidate_cache()
    assert result["totals"]["samples_in"] == manifest["totals"]["samples_out"]
    assert result["drops"] == {} and fs.exists("test-bucket/curate-output/manifest.json")
    with fs.open(result["shards"][0]["output"], "rb") as handle:
        table = pq.read_table(handle)
    assert set(table.column("caption_count").to_pylist()) == {1}
    with fs.open(result["shards"][0]["provenance"], "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    assert all(row["captions"][0]["origin"] == "web" and len(row["captions"]) > 1 for row in rows)
    best = [max(rows[0]["captions"], key=lambda c: c["score"])]
    assert [c for c in rows[0]["captions"] if c["kept"]] == best


def test_the_curate_demo_job_runs_as_readme_shows(prepared_demo, checkpoints, tmp_path, capsys):
    from pipeline.cli import main
    from tests.helpers import REPO

    out = tmp_path / "curated"
    assert main(["curate", str(REPO / "jobs" / "curate_demo.yaml"), "--set", f"curate.input={prepared_demo}",
                 "--set", f"curate.output={out}", "--set", f"curate.captioner.model={checkpoints['stage2']}",
                 "--set", f"curate.ranker.model={checkpoints['stage1']}", "--set", "curate.captioner.captions=2"]) == 0
    printed = capsys.readouterr().out
    assert "curate done" in printed and "caption" in printed and "images/s per CPU" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples_out"] + manifest["totals"]["dropped"] == manifest["totals"]["samples_in"]


def test_training_curates_its_data_first_when_the_job_says_so(prepared_demo, checkpoints, tmp_path):
    from pipeline.train.run import run_training
    from tests.train.helpers import job_spec, tiny_job

    raw = tiny_job("chained", str(tmp_path / "runs"), prepared_demo, stage1_steps=2, stage2_steps=None,
                   checkpoint_every=2)
    raw["data"]["curate"] = {"captioner": {"model": checkpoints["stage2"], "captions": 2, "max_new_tokens": 4},
                             "ranker": {"model": checkpoints["stage1"]}, "select": {"keep": 2}}
    summary = run_training(job_spec(raw))
    curated = tmp_path / "runs" / "chained" / "curated"
    manifest = json.loads((curated / "manifest.json").read_text())
    assert summary["stages"][0]["step"] == 2
    counts = [n for entry in manifest["shards"] for n in pq.read_table(entry["output"]).column("caption_count").to_pylist()]
    assert max(counts) == 2 and len(counts) == manifest["totals"]["samples_out"] > 0
