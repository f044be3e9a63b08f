"""``qformer bench curate``: proof that curation helps, BLIP's bootstrapping on the demo corpus.

1. The easy-VQA train split is written twice, clean and with a known fraction of its captions
   replaced by wrong ones (another colour or shape; ``demo_corpus.wrong_caption``), and both are
   prepared, with the test split.
2. Stage 1 (and, for a captioner through the LLM, stage 2) trains on the noisy corpus
   (``qformer train``).
3. That model is the ranker (stage 1) and the captioner (stage 1's ITG head, or stage 2): CapFilt
   over the noisy corpus (``qformer curate``: the model trained on noisy data cleans its own data).
4. Stage 1 trains again, with the same steps, on the curated corpus, and on the clean one.
5. The three stage-1 models are evaluated on the test split (``qformer eval``).

Reported: the filter's precision and recall on the known-wrong captions (a web caption is
filtered out when its sample is dropped or the caption is not among those kept), the fraction of
images whose kept caption is right before and after, the three accuracies and how much of the
gap between noisy and clean the curated corpus closes, the curation's throughput, with curves
and a sheet of examples in ``{run}-curate-bench/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.bench.quality import LoadMonitor, split_prep
from pipeline.console import console
from pipeline.data.prepared import KEPT, MANIFEST, WEB, read_rows
from pipeline.io.pictures import write_png
from pipeline.io.storage import Location, exists, read_bytes, write_bytes_atomic
from pipeline.spec import JobSpec, SpecError, load_spec
from pipeline.spec.train import DataSpec

log = logging.getLogger("qformer.bench")
NOISY, CLEAN, TEST = "train-noisy", "train", "test"
TARGETS = {"filter_precision": 0.90, "filter_recall": 0.90, "gap_closed": 0.5}
TIME_BUDGET_S = 45 * 60
DEFAULT_NOISE = 0.5


def load_curate_benchmark_spec(path: str, overrides: list[str]) -> JobSpec:
    """The benchmark's job spec: a prep section (the clean train split), a curate section, and a
    curriculum of a stage-1 stage and, when the captioner is a stage-2 model, a stage-2 stage.

    Raises:
        SpecError: the spec is invalid or lacks what the benchmark needs.
    """
    job = load_spec(path, JobSpec, overrides)
    if job.prep is None or job.curate is None or not job.is_training:
        raise SpecError(f"{path}: the curate benchmark needs prep and curate sections and a training job")
    if [stage.objective for stage in job.stages] not in ([1], [1, 2]):
        raise SpecError(f"{path}: stages: the curate benchmark needs a stage-1 stage, then at most a "
                        "stage-2 stage (for a captioner that captions through the LLM)")
    if job.curate.captioner is None or job.curate.ranker is None:
        raise SpecError(f"{path}: curate: the benchmark needs a captioner and a ranker")
    for split in (NOISY, TEST):
        split_prep(job.prep, split)
    return job


def _runs(job: JobSpec) -> dict[str, JobSpec]:
    """The three training jobs: ``noisy`` (every stage), ``curated`` and ``clean`` (stage 1)."""
    data = {"noisy": split_prep(job.prep, NOISY).output, "curated": job.curate.output,
            "clean": job.prep.output}
    return {
        name: job.model_copy(update={
            "prep": None, "curate": None,
            "run": job.run.model_copy(update={"name": f"{job.run.name}-{name}"}),
            "data": DataSpec(prepared=folder, decode_threads=job.data.decode_threads,
                             prefetch_batches=job.data.prefetch_batches),
            "stages": job.stages if name == "noisy" else job.stages[:1],
        })
        for name, folder in data.items()
    }


def run_curate_benchmark(spec_path: str, overrides: list[str], *, noise: float = DEFAULT_NOISE,
                         fresh: bool = False) -> dict:
    """Run the benchmark; prints the numbers and returns the results (also ``curate_bench.json``)."""
    from pipeline.curate.run import run_curate
    from pipeline.ray_runtime import ensure_ray
    from pipeline.train.run import run_dir_of, run_training

    job = load_curate_benchmark_spec(spec_path, overrides)
    runs = _runs(job)
    out = Location.of(job.run.storage).child(f"{job.run.name}-report")
    if fresh:
        _remove_outputs(job, runs)
    load = LoadMonitor()
    times: dict[str, float] = {}
    started = time.monotonic()
    ensure_ray(job.run.ray_address)
    _prepare(job, noise)
    times["prep_s"] = time.monotonic() - started

    summaries = {}
    for name in ("noisy", "curated", "clean"):
        if name == "curated":
            mark = time.monotonic()
            console().say("bench curate: CapFilt over the noisy corpus with the noisy run's own models")
            curate_manifest = run_curate(job.curate, ray_address=job.run.ray_address)
            times["curate_s"] = time.monotonic() - mark
        mark = time.monotonic()
        console().say(f"bench curate: training on the {name} corpus")
        summaries[name] = run_training(runs[name])
        times[f"train_{name}_s"] = time.monotonic() - mark

    mark = time.monotonic()
    accuracies, evals = _evaluate(job, summaries)
    times["eval_s"] = time.monotonic() - mark
    times["total_s"] = time.monotonic() - started

    noisy_data = Location.of(split_prep(job.prep, NOISY).output)
    outcome = filter_outcome(noisy_data, Location.of(job.curate.output))
    results = _results(job, noise, accuracies, outcome, curate_manifest, times, load.summary(), evals)
    results["curves"] = _plot(runs, run_dir_of, accuracies, outcome, out.child("curves.png"))
    results["sheet"] = _sheet(outcome, noisy_data, out)
    write_bytes_atomic(out.child("curate_bench.json"), json.dumps(results, indent=1).encode())
    results["results_json"] = out.child("curate_bench.json").url
    _print(results)
    return results


def _remove_outputs(job: JobSpec, runs: dict[str, JobSpec]) -> None:
    """--fresh: the runs, the curated corpus and the noisy corpus go; the clean corpus stays."""
    from pipeline.train.run import run_dir_of

    folders = [run_dir_of(run).url for run in runs.values()] + [job.curate.output]
    noisy = split_prep(job.prep, NOISY)
    folders += [noisy.output, noisy.inputs[0].rsplit("/", 1)[0]]
    for folder in folders:
        if os.path.isdir(folder):
            log.info("bench curate: --fresh: removing %s", folder)
            shutil.rmtree(folder)


def _prepare(job: JobSpec, noise: float) -> None:
    """Write and prepare the clean and noisy train splits and the test split, where missing."""
    from pipeline.data.demo_corpus import write_demo_corpus
    from pipeline.data.prep import run_prep

    for split, source, caption_noise in ((CLEAN, "train", 0.0), (NOISY, "train", noise), (TEST, "test", 0.0)):
        prep = split_prep(job.prep, split)
        raw = prep.inputs[0].rsplit("/", 1)[0]
        marker = Path(raw) / "caption_noise.json"
        if not any(Path(raw).glob("*.tar")):
            log.info("bench curate: writing the %s split (caption noise %.2f) to %s", split, caption_noise, raw)
            write_demo_corpus(raw, split=source, caption_noise=caption_noise)
            marker.write_text(json.dumps({"caption_noise": caption_noise}))
        written = json.loads(marker.read_text())["caption_noise"] if marker.exists() else caption_noise
        if written != caption_noise:
            raise SpecError(f"--noise {caption_noise}: {raw} was written with caption noise {written}; "
                            "add --fresh to write it again")
        if not exists(Location.of(prep.output).child(MANIFEST)):
            log.info("bench curate: preparing %s into %s", split, prep.output)
            run_prep(prep, ray_address=job.run.ray_address)


def _evaluate(job: JobSpec, summaries: dict[str, dict]) -> tuple[dict[str, float], dict[str, str]]:
    from pipeline.eval.run import EvalRequest, run_eval

    test = split_prep(job.prep, TEST).output
    accuracies, evals = {}, {}
    for name, summary in summaries.items():
        console().say(f"bench curate: evaluating the {name} run's stage 1 on the whole test split")
        report = run_eval(EvalRequest(checkpoint=summary["stages"][0]["checkpoint"], data=[test], itm_top_k=0,
                                      ray_address=job.run.ray_address))
        accuracies[name] = report["metrics"]["caption_accuracy"]
        evals[name] = report["eval_json"]
    return accuracies, evals


def filter_outcome(noisy: Location, curated: Location) -> list[dict]:
    """Per noisy sample: the truth (from the corpus's JSON), its web caption and what curation did
    with it (from the curated provenance tables)."""
    import pyarrow.dataset as pads

    from pipeline.data.prepared import PROVENANCE_DIR, shards_from_manifest

    rows = read_rows(shards_from_manifest(noisy.child(MANIFEST)), ["key", "caption", "metadata"])
    truth = {}
    for key, caption, metadata in zip(*(rows.column(c).to_pylist() for c in ("key", "caption", "metadata"))):
        meta = json.loads(metadata)
        truth[key] = {"true": f"a {meta['color']} {meta['shape']}", "web": caption,
                      "web_is_wrong": bool(meta.get("caption_is_wrong"))}
    fs, path = curated.child(PROVENANCE_DIR).filesystem()
    provenance = pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()
    outcome = []
    for row in provenance:
        captions = row["captions"] or []
        kept = [c for c in captions if c["kept"]]
        web_kept = row["status"] == KEPT and any(c["origin"] == WEB for c in kept)
        outcome.append({**truth[row["key"]], "key": row["key"], "status": row["status"], "captions": captions,
                        "kept": [c["text"] for c in sorted(kept, key=lambda c: -(c["score"] or 0))],
                        "web_filtered": not web_kept})
    return sorted(outcome, key=lambda r: r["key"])


def filter_metrics(outcome: list[dict]) -> dict[str, float]:
    """The filter's precision and recall on the known-wrong web captions, and how right the kept
    captions are before and after curation."""
    wrong = [r for r in outcome if r["web_is_wrong"]]
    filtered = [r for r in outcome if r["web_filtered"]]
    hits = sum(r["web_is_wrong"] for r in filtered)
    kept = [r for r in outcome if r["status"] == KEPT]
    captions = [(text, r["true"]) for r in kept for text in r["kept"]]
    return {
        "filter_precision": hits / len(filtered) if filtered else 0.0,
        "filter_recall": hits / len(wrong) if wrong else 0.0,
        "right_before": sum(not r["web_is_wrong"] for r in outcome) / len(outcome),
        "right_after": sum(r["kept"][0] == r["true"] for r in kept) / len(kept) if kept else 0.0,
        "kept_captions_right": sum(text == true for text, true in captions) / len(captions) if captions else 0.0,
        "images_kept": len(kept) / len(outcome),
        "mean_captions_kept": len(captions) / len(kept) if kept else 0.0,
        "samples": len(outcome),
        "wrong_web_captions": len(wrong),
    }


def _results(job: JobSpec, noise: float, accuracies: dict, outcome: list[dict], manifest: dict, times: dict,
             load: dict, evals: dict) -> dict:
    metrics = filter_metrics(outcome)
    gap = accuracies["clean"] - accuracies["noisy"]
    metrics["gap_closed"] = (accuracies["curated"] - accuracies["noisy"]) / gap if gap > 0 else 0.0
    passed = {name: metrics[name] >= target for name, target in TARGETS.items()}
    passed["time_budget"] = times["total_s"] <= TIME_BUDGET_S
    return {
        "noise": noise,
        "accuracy": accuracies,
        "metrics": metrics,
        "targets": {**TARGETS, "total_s": TIME_BUDGET_S},
        "passed": passed,
        "curation": {"phases": manifest["phases"], "totals": manifest["totals"], "drops": manifest["drops"]},
        "wall_time_s": {name: round(value, 1) for name, value in times.items()},
        "machine": {"cpus": os.cpu_count(), **load},
        "eval_json": evals,
        "spec": job.model_dump(mode="json", exclude_none=True),
    }


def _plot(runs: dict[str, JobSpec], run_dir_of, accuracies: dict, outcome: list[dict], target: Location) -> str:
    """One PNG: stage-1 training loss and held-out accuracy of the three runs, the final
    accuracies, and the kept captions' correctness before and after."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, curves, bars) = plt.subplots(1, 3, figsize=(18, 5), dpi=100)
    for name, run in runs.items():
        stage = run.stages[0].name
        records = [json.loads(line) for line in
                   read_bytes(run_dir_of(run).child(stage, "metrics.jsonl")).decode().splitlines()]
        points = [(r["step"], r["loss"]) for r in records if "loss" in r]
        losses.plot(*zip(*points), label=f"{name} corpus")
        held_out = [(r["step"], r["eval_caption_accuracy"]) for r in records if "eval_caption_accuracy" in r]
        if held_out:
            curves.plot(*zip(*held_out), marker="o", label=f"{name} corpus")
    losses.set(title="stage 1: training loss", xlabel="step")
    curves.set(title="stage 1: held-out caption accuracy (periodic, subset)", xlabel="step", ylim=(0, 1.02))
    metrics = filter_metrics(outcome)
    names = ["noisy", "curated", "clean"]
    bars.bar(names, [accuracies[n] for n in names], color=["#c0262d", "#2b6cb0", "#13803b"])
    for index, name in enumerate(names):
        bars.text(index, accuracies[name] + 0.01, f"{accuracies[name]:.3f}", ha="center")
    bars.set(title=f"test caption accuracy | kept caption right: {metrics['right_before']:.2f} -> "
                   f"{metrics['right_after']:.2f}", ylim=(0, 1.05))
    for axis in (losses, curves):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    write_png(figure, target)
    return target.url


def _sheet(outcome: list[dict], noisy: Location, out: Location, count: int = 16) -> dict[str, str]:
    """Examples: half with a wrong web caption, half with a right one; each line a candidate
    caption with its origin and score, green when right, kept ones marked."""
    from pipeline.data.prepared import IMAGE, shards_from_manifest
    from pipeline.eval.sheet import write_sheet

    chosen = [r for r in outcome if r["web_is_wrong"]][: count // 2] + \
        [r for r in outcome if not r["web_is_wrong"]][: count - count // 2]
    wanted = {r["key"] for r in chosen}
    rows = read_rows(shards_from_manifest(noisy.child(MANIFEST)), ["key", IMAGE])
    images = {k: v for k, v in zip(rows.column("key").to_pylist(), rows.column(IMAGE).to_pylist()) if k in wanted}
    examples = []
    for r in chosen:
        lines = [(f"{r['status']} | truth: {r['true']}", None)]
        for c in sorted(r["captions"], key=lambda c: -(c["score"] if c["score"] is not None else -1)):
            mark = "KEPT " if c["kept"] else "     "
            score = f"{c['score']:.3f}" if c["score"] is not None else "-"
            lines.append((f"{mark}{c['origin'][:3]} {c['text']} ({score})", c["text"] == r["true"]))
        examples.append({"key": r["key"], "lines": lines})
    return write_sheet(examples, images, out, "CapFilt on the noisy demo corpus",
                       "first line: status and true caption; then each candidate (web/synthetic), best first")


def _print(results: dict) -> None:
    say = console().say
    metrics, accuracy = results["metrics"], results["accuracy"]
    say(f"curate benchmark: easy-VQA train split with {results['noise']:.0%} of captions wrong "
        f"({metrics['wrong_web_captions']} of {metrics['samples']}), CapFilt by the noisy run's own models:")
    for name in ("filter_precision", "filter_recall"):
        target = results["targets"][name]
        say(f"  {name:22s} {metrics[name]:.4f}  (target >= {target}: {'PASS' if metrics[name] >= target else 'FAIL'})")
    say(f"  kept caption right     {metrics['right_before']:.4f} before -> {metrics['right_after']:.4f} after "
        f"(all kept captions: {metrics['kept_captions_right']:.4f}; {metrics['mean_captions_kept']:.2f} per image; "
        f"{metrics['images_kept']:.3f} of the images kept)")
    say(f"  test caption accuracy  noisy {accuracy['noisy']:.4f} | curated {accuracy['curated']:.4f} | "
        f"clean {accuracy['clean']:.4f}")
    target = results["targets"]["gap_closed"]
    say(f"  gap closed             {metrics['gap_closed']:.3f}  (target >= {target}: "
        f"{'PASS' if metrics['gap_closed'] >= target else 'FAIL'})")
    phases = results["curation"]["phases"]
    say("  curation throughput    " + ", ".join(
        f"{name} {p['images_per_s_per_cpu']} images/s per CPU core ({p['images']} images)"
        for name, p in phases.items() if p.get("images_per_s_per_cpu")))
    times = results["wall_time_s"]
    verdict = "PASS" if results["passed"]["time_budget"] else "FAIL"
    say(f"  wall time {times['total_s']:.0f}s (" + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in times.items()
                                                       if k != "total_s") +
        f"; budget {TIME_BUDGET_S}s: {verdict}) on {results['machine']['cpus']} CPUs, 1-minute load average "
        f"{results['machine']['load_average_1m_mean']} on average, {results['machine']['load_average_1m_max']} at most")
    say(f"  curves: {results['curves']}; sheet: {results['sheet']['html']}, {results['sheet']['png']}; "
        f"results: {results['results_json']}")
