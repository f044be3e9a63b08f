"""Learning guards: each stage of `jobs/bench_quality.yaml` must still learn (issue 21).

Shape and equality tests did not notice when stage 2 stopped learning to caption. These run the
benchmark's curriculum for real (Ray Train, DeepSpeed ZeRO-2, DINOv2-S, MiniLM, SmolLM2), made
small: 960 training images at 56 px, 60 steps a stage, and a held-out evaluation at each stage's
end. The bounds were measured on this spec (seed 0): see each test. About 4.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.bench.quality import split_prep
from pipeline.checkpoint.status import render, run_status
from pipeline.data.demo_corpus import write_demo_corpus
from pipeline.data.prep import run_prep
from pipeline.io.storage import Location
from pipeline.spec import JobSpec, load_spec
from pipeline.train.run import run_training
from tests.helpers import REPO

SPEC = REPO / "jobs" / "bench_quality.yaml"
STEPS = 60


@pytest.fixture(scope="module")
def guard_run(ray_2cpus, tmp_path_factory) -> Path:
    """The small curriculum's run folder, trained once for both guards."""
    root = tmp_path_factory.mktemp("guard")
    for split, samples in (("train", 960), ("test", 96)):
        write_demo_corpus(str(root / "raw" / split), samples=samples, shard_size=480, split=split)
    test_data = str(root / "prepared" / "test")
    overrides = [
        f"prep.inputs={root}/raw/train/*.tar", f"prep.output={root}/prepared/train",
        "prep.image.size=56", "model.vision.image_size=56",
        f"run.storage={root}/runs", "run.name=guard", f"data.prepared={root}/prepared/train",
    ]
    for stage in (0, 1):
        overrides += [f"stages.{stage}.steps={STEPS}", f"stages.{stage}.checkpoint_every={STEPS}",
                      f"stages.{stage}.eval.every={STEPS}", f"stages.{stage}.eval.max_samples=96",
                      f"stages.{stage}.eval.data={test_data}"]
    job = load_spec(SPEC, JobSpec, overrides)
    for split in ("train", "test"):
        run_prep(split_prep(job.prep, split))
    run_training(job)
    return root / "runs" / "guard"


def _held_out(run: Path, stage: str) -> dict:
    records = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_samples" in r][-1]


def test_stage1_learns_to_retrieve_captions(guard_run):
    held_out = _held_out(guard_run, "stage1")
    records = [json.loads(line) for line in (guard_run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    itc = [r["loss_itc"] for r in records if "loss_itc" in r]
    # Measured (seed 0): ITC 2.85 -> 2.36 (ln 16 = 2.77 is chance for 16 pairs), caption
    # accuracy 0.177 (chance 1/24 = 0.042). A stage 1 that learns nothing across modalities
    # (issue 18's random tower: ITC 2.77-2.80 throughout) fails both.
    assert itc[-1] < math.log(16) - 0.15, itc
    assert held_out["eval_caption_accuracy"] >= 2 * held_out["eval_caption_chance"], held_out
    # How alike an image's query outputs are, in metrics.jsonl and in qformer status.
    assert 0.0 < held_out["eval_query_cosine"] <= 1.0 + 1e-6
    shown = render(run_status(Location.of(str(guard_run))))
    assert f"query_cosine {held_out['eval_query_cosine']:.4g}" in shown


def test_stage2_learns_to_caption(guard_run):
    held_out = _held_out(guard_run, "stage2")
    # The LLM alone, without an image, scores ~10 on these captions; a stage 2 that learns nothing
    # stays there. Measured after 60 steps (seed 0): 1.72 here. At the spec's former peak lr of
    # 5e-4 this same draw diverged after the warm-up and stayed at 10.07, failing this guard,
    # while another draw reached 2.58: see docs/eval.md (issue 21).
    assert held_out["eval_caption_loss"] <= 6.0, held_out
