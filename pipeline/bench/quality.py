"""``qformer bench quality``: proof that the pipeline learns, on a fixed CPU budget.

Writes the easy-VQA demo corpus (train and test splits) and prepares both if missing, trains the
job spec's curriculum through ``qformer train`` (``run_training``, with periodic held-out
evaluation), evaluates the final stage-1 and stage-2 checkpoints on the whole test split with
``qformer eval`` (``run_eval``), and reports the numbers against the targets, with learning
curves and a results JSON in ``{run}/quality/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.console import console
from pipeline.data.prepared import MANIFEST
from pipeline.io.pictures import write_png
from pipeline.io.storage import Location, exists, write_bytes_atomic
from pipeline.spec import JobSpec, SpecError, load_spec
from pipeline.spec.prep import PrepSpec

log = logging.getLogger("qformer.bench")
SPLITS = ("train", "test")
TARGETS = {"caption_accuracy": 0.90, "exact_match": 0.80}
TIME_BUDGET_S = 30 * 60
REPORTED = {
    1: ("caption_accuracy", "i2t_r1", "t2i_r1", "i2t_itm_r1", "itm_accuracy"),
    2: ("exact_match", "token_f1", "caption_loss", "perplexity"),
}


def split_prep(prep: PrepSpec, split: str) -> PrepSpec:
    """The prep section of ``split``: the ``train`` folder of the inputs and output replaced.

    Raises:
        SpecError: a path has no ``train`` folder to replace.
    """
    def swap(path: str, field: str) -> str:
        parts = path.split("/")
        if "train" not in parts:
            raise SpecError(f"prep.{field}: {path!r} has no `train` folder for the benchmark to "
                            "replace by the test split's")
        return "/".join(split if part == "train" else part for part in parts)

    return prep.model_copy(update={
        "inputs": [swap(path, "inputs") for path in prep.inputs],
        "output": swap(prep.output, "output"),
    })


def load_benchmark_spec(path: str, overrides: list[str]) -> JobSpec:
    """The benchmark's job spec: a prep section (the train split) and a two-stage curriculum.

    Raises:
        SpecError: the spec is invalid or lacks what the benchmark needs.
    """
    job = load_spec(path, JobSpec, overrides)
    if job.prep is None or not job.is_training:
        raise SpecError(f"{path}: the quality benchmark needs a prep section and a training job")
    if sorted({stage.objective for stage in job.stages}) != [1, 2]:
        raise SpecError(f"{path}: stages: the quality benchmark needs a stage-1 and a stage-2 stage")
    for split in SPLITS:
        split_prep(job.prep, split)
    return job


def run_quality_benchmark(spec_path: str, overrides: list[str], *, fresh: bool = False) -> dict:
    """Run the benchmark; prints the numbers and returns the results (also ``quality.json``)."""
    from pipeline.eval.run import EvalRequest, run_eval
    from pipeline.ray_runtime import ensure_ray
    from pipeline.train.run import run_dir_of, run_training

    job = load_benchmark_spec(spec_path, overrides)
    run_dir = run_dir_of(job)
    if fresh and run_dir.is_local and os.path.isdir(run_dir.url):
        log.info("bench quality: --fresh: removing %s", run_dir.url)
        shutil.rmtree(run_dir.url)
    load = LoadMonitor()
    started = time.monotonic()
    ensure_ray(job.run.ray_address)
    _prepare_splits(job)
    prepared_s = time.monotonic() - started

    summary = run_training(job)
    trained_s = time.monotonic() - started - prepared_s

    test = split_prep(job.prep, "test").output
    evals = {}
    for stage, done in zip(job.stages, summary["stages"]):
        log.info("bench quality: evaluating %s on the whole test split", stage.name)
        request = EvalRequest(checkpoint=done["checkpoint"], data=[test], itm_top_k=8, max_new_tokens=8,
                              ray_address=job.run.ray_address)
        evals[stage.objective] = run_eval(request)
    elapsed = time.monotonic() - started

    out = run_dir.child("quality")
    results = _results(job, summary, evals, {"prep_s": prepared_s, "train_s": trained_s,
                                             "eval_s": elapsed - prepared_s - trained_s,
                                             "total_s": elapsed}, load.summary())
    results["curves"] = _plot_curves(job, run_dir, out.child("curves.png"))
    write_bytes_atomic(out.child("quality.json"), json.dumps(results, indent=1).encode())
    results["results_json"] = out.child("quality.json").url
    _print(results)
    return results


def _prepare_splits(job: JobSpec) -> None:
    from pipeline.data.demo_corpus import write_demo_corpus
    from pipeline.data.prep import run_prep

    for split in SPLITS:
        prep = split_prep(job.prep, split)
        raw_folder = prep.inputs[0].rsplit("/", 1)[0]
        if not any(Path(raw_folder).glob("*.tar")):
            log.info("bench quality: writing the %s split of the demo corpus to %s", split, raw_folder)
            write_demo_corpus(raw_folder, split=split)
        if not exists(Location.of(prep.output).child(MANIFEST)):
            log.info("bench quality: preparing the %s split into %s", split, prep.output)
            run_prep(prep, ray_address=job.run.ray_address)


def _results(job: JobSpec, summary: dict, evals: dict, times: dict, load: dict) -> dict:
    metrics = {name: evals[stage]["metrics"][name]
               for stage, names in REPORTED.items() for name in names if name in evals[stage]["metrics"]}
    passed = {name: metrics[name] >= target for name, target in TARGETS.items()}
    passed["time_budget"] = times["total_s"] <= TIME_BUDGET_S
    return {
        "metrics": metrics,
        "targets": {**TARGETS, "total_s": TIME_BUDGET_S},
        "passed": passed,
        "chance": {"caption_accuracy": evals[1]["metrics"]["caption_chance"]},
        "test_samples": evals[1]["samples"],
        "distinct_captions": evals[1]["distinct_captions"],
        "wall_time_s": {name: round(value, 1) for name, value in times.items()},
        "stages": [{"stage": s["stage"], "steps": s["step"], "samples_seen": s["samples_seen"],
                    "wall_time_s": s.get("wall_time_s"), "plot": s["plot"]} for s in summary["stages"]],
        "machine": {"cpus": os.cpu_count(), **load},
        "eval_json": {stage: report["eval_json"] for stage, report in evals.items()},
        "sheets": {stage: report["sheet"]["png"] for stage, report in evals.items()},
        "vision_tower": summary["vision_tower"],
        "spec": job.model_dump(mode="json", exclude_none=True),
    }


def _plot_curves(job: JobSpec, run_dir: Location, target: Location) -> str:
    """One PNG: each stage's training loss and its held-out metrics, with the target lines."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io.storage import read_bytes

    figure, axes = plt.subplots(2, len(job.stages), figsize=(6.5 * len(job.stages), 8), dpi=100,
                                squeeze=False)
    for column, stage in enumerate(job.stages):
        records = [json.loads(line) for line in
                   read_bytes(run_dir.child(stage.name, "metrics.jsonl")).decode().splitlines()]
        losses, metrics = axes[0, column], axes[1, column]
        for name in sorted({k for r in records for k in r if k.startswith("loss")}):
            points = [(r["step"], r[name]) for r in records if name in r]
            losses.plot(*zip(*points), label=name, linewidth=2.2 if name == "loss" else 1.2)
        held_out_loss = [(r["step"], r["eval_caption_loss"]) for r in records if "eval_caption_loss" in r]
        if held_out_loss:
            losses.plot(*zip(*held_out_loss), linestyle="--", marker="o", label="held-out caption_loss")
        losses.set_title(f"{stage.name}: training losses")
        names = REPORTED[stage.objective]
        for name in names:
            points = [(r["step"], r["eval_" + name]) for r in records if "eval_" + name in r]
            if points and name not in ("i2t_r1", "caption_loss", "perplexity"):  # i2t_r1 = caption_accuracy
                metrics.plot(*zip(*points), marker="o", label=name)
        for name, value in TARGETS.items():
            if name in names:
                metrics.axhline(value, linestyle="--", color="gray", linewidth=1)
                metrics.text(0.01, value + 0.01, f"target {name} {value}", color="gray", fontsize=8,
                             transform=metrics.get_yaxis_transform())
        metrics.set_ylim(0, 1.02)
        metrics.set_title(f"{stage.name}: held-out (test split) metrics during training")
        for axis in (losses, metrics):
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.suptitle(f"{job.run.name}: learning curves")
    figure.tight_layout()
    write_png(figure, target)
    return target.url


class LoadMonitor:
    """Samples the machine's 1-minute load average while the benchmark runs (other work may
    share the machine; the report says how busy it was)."""

    def __init__(self, every_s: float = 10.0):
        import threading

        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"load_average_1m_mean": round(sum(self.samples) / len(self.samples), 2),
                "load_average_1m_max": round(max(self.samples), 2)}


def _print(results: dict) -> None:
    say = console().say
    metrics, chance = results["metrics"], results["chance"]["caption_accuracy"]
    say(f"quality benchmark on the easy-VQA test split ({results['test_samples']} images, "
        f"{results['distinct_captions']} distinct captions; chance accuracy {chance:.3f}):")
    for name, value in metrics.items():
        target = results["targets"].get(name)
        verdict = f"  (target >= {target}: {'PASS' if value >= target else 'FAIL'})" if target else ""
        say(f"  {name:18s} {value:.4f}{verdict}")
    times = results["wall_time_s"]
    verdict = "PASS" if results["passed"]["time_budget"] else "FAIL"
    say(f"  wall time {times['total_s']:.0f}s (prep {times['prep_s']:.0f}s, train {times['train_s']:.0f}s, "
        f"eval {times['eval_s']:.0f}s; budget {TIME_BUDGET_S}s: {verdict}) on {results['machine']['cpus']} "
        f"CPUs, 1-minute load average {results['machine']['load_average_1m_mean']} on average, "
        f"{results['machine']['load_average_1m_max']} at most")
    say(f"  curves: {results['curves']}; stage plots: {', '.join(s['plot'] for s in results['stages'])}")
    say(f"  sheets: {', '.join(results['sheets'].values())}; results: {results['results_json']}")
