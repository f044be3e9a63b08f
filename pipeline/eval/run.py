"""``qformer eval``: evaluate a training checkpoint on a held-out set with Ray Data.

An actor pool (each actor builds the model once from the checkpoint) scores batches of held-out
samples with :mod:`pipeline.eval.scoring`; the driver collects the per-sample outputs, computes
the metrics (:mod:`pipeline.eval.summary`) and writes ``eval.json`` and a sheet of examples.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.checkpoint.format import load_trainable_weights
from pipeline.checkpoint.lookup import TrainedCheckpoint, find_checkpoint, read_checkpoint
from pipeline.checkpoint.rebuild import load_trained_model
from pipeline.console import console
from pipeline.data.prepared import CAPTION, IMAGE, KEY, TOKEN_COLUMNS, read_rows, text_kind
from pipeline.eval.heldout import (
    CaptionGallery,
    EvalError,
    HeldOutData,
    check_tokens,
    EvalInputs,
    resolve_data,
)
from pipeline.eval.scoring import ScoringSpec, Stage1Scorer, Stage2Scorer
from pipeline.eval.sheet import write_sheet
from pipeline.eval.summary import DEFINITIONS, examples, stage1_metrics, stage2_metrics
from pipeline.io.storage import Location, read_bytes, write_bytes_atomic
from pipeline.io.tensorboard import EventLog
from pipeline.model.generate import DecodingSpec
from pipeline.spec.storage import StorageSpec

log = logging.getLogger("qformer.eval")
HEADLINE = ("caption_accuracy", "i2t_r1", "t2i_r1", "i2t_itm_r1", "itm_accuracy", "exact_match",
            "beam_exact_match", "token_f1", "caption_loss", "perplexity")


@dataclass(frozen=True)
class EvalRequest:
    """What ``qformer eval`` is asked to do.

    Attributes:
        checkpoint: A checkpoint, stage or run folder (local or ``s3://``).
        data: Prep output folders or ``.parquet`` paths/globs of the held-out set.
        split: Sub-folder of each ``data`` folder holding that split's prep output.
        out: Output folder; None: ``RUN/eval/STAGE-step-N`` beside the run's stage folders (not
            inside the checkpoint, which training's keep-last-N deletion may remove).
        max_samples: Evaluate only the first N held-out samples.
        batch_size: Samples per actor batch.
        actors: Scoring actors (one CPU each); None: every CPU of the cluster.
        itm_top_k: Stage 1: ITC candidates per image re-scored by ITM (0: no ITM).
        num_beams: Stage 2: beams of a second, beam-searched caption (1: greedy only).
        max_new_tokens: Stage 2: longest generated caption.
        examples: Samples shown on the sheet.
        ray_address: Ray cluster to use (None: ``$RAY_ADDRESS`` or a local one).
        storage: Endpoint options of ``s3://`` checkpoints and data (None: the environment's;
            data then takes the training job's ``data.storage``).
    """

    checkpoint: str
    data: list[str]
    split: str | None = None
    out: str | None = None
    max_samples: int | None = None
    batch_size: int = 32
    actors: int | None = None
    itm_top_k: int = 8
    num_beams: int = 1
    max_new_tokens: int = 30
    examples: int = 16
    ray_address: str | None = None
    storage: StorageSpec | None = None

    def scoring(self) -> ScoringSpec:
        greedy = DecodingSpec(num_beams=1, max_new_tokens=self.max_new_tokens)
        beam = None
        if self.num_beams > 1:
            beam = DecodingSpec(num_beams=self.num_beams, max_new_tokens=self.max_new_tokens)
        return ScoringSpec(itm_top_k=self.itm_top_k, decoding=greedy, beam_decoding=beam)


class ScoringActor:
    """Ray Data actor: builds the checkpoint's model once, then scores batches of held-out rows."""

    def __init__(self, checkpoint: list, gallery: dict | None, scoring: ScoringSpec):
        import torch

        from pipeline.model import build_llm_tokenizer, image_preprocessing

        torch.set_grad_enabled(False)
        source = read_checkpoint(Location(*checkpoint))
        model = load_trained_model(source)
        spec = source.model_spec
        self.builder = EvalInputs(image_preprocessing(spec.vision), model.objective)
        if model.objective == 1:
            self.scorer = Stage1Scorer(model, CaptionGallery.from_json(gallery), scoring.itm_top_k)
        else:
            self.scorer = Stage2Scorer(model, build_llm_tokenizer(spec.llm), scoring)

    def __call__(self, rows) -> dict[str, np.ndarray]:
        captions = rows.column(CAPTION).to_pylist()
        inputs = self.builder(rows)
        if isinstance(self.scorer, Stage1Scorer):
            out = self.scorer(inputs, captions)
        else:
            out = self.scorer(inputs)
        return {"key": np.array(rows.column(KEY).to_pylist(), dtype=object),
                "caption": np.array(captions, dtype=object), **out}


def eval_folder(request: EvalRequest, checkpoint: TrainedCheckpoint | None = None) -> Location:
    """Where :func:`run_eval` writes: ``request.out``, or ``RUN/eval/STAGE-step-N`` beside the
    run's stage folders (not inside the checkpoint, which keep-last-N deletion may remove).

    Raises:
        CheckpointNotFound: no checkpoint at ``request.checkpoint`` (when ``out`` is not given).
    """
    if request.out:
        return Location.of(request.out, request.storage)
    checkpoint = checkpoint or find_checkpoint(Location.of(request.checkpoint, request.storage))
    step = checkpoint.location.url.rsplit("/", 1)[-1]
    return checkpoint.run_folder.child("eval", f"{checkpoint.stage.name}-{step}")


def run_eval(request: EvalRequest) -> dict:
    """Evaluate ``request.checkpoint`` on ``request.data``; returns what ``eval.json`` holds.

    Raises:
        EvalError: missing checkpoint or data, or data the model cannot read.
    """
    started = time.monotonic()
    checkpoint = find_checkpoint(Location.of(request.checkpoint, request.storage))
    load_trainable_weights(checkpoint.location)  # an unreadable file is one error here, not one per actor
    data = resolve_data(request.data, request.split, request.storage or checkpoint.job.data.storage)
    objective = checkpoint.objective
    check_tokens(data, objective, checkpoint.job.model.qformer.max_text_length)
    gallery = CaptionGallery.read(data.shards) if objective == 1 else None
    log.info("eval: %s (stage %s, step %d) on %s: %d shard(s)%s", checkpoint.location.url,
             checkpoint.stage.name, checkpoint.step, data.source, len(data.shards),
             f", {len(gallery.captions)} distinct captions" if gallery else "")
    outputs = _score(request, checkpoint, data, gallery)
    captions = list(outputs["caption"])
    metrics = stage1_metrics(outputs, gallery) if objective == 1 else stage2_metrics(outputs, captions)

    out = eval_folder(request, checkpoint)
    sample_rows = read_rows(data.shards, [KEY, IMAGE], request.examples)  # evaluated first
    keys = sample_rows.column(KEY).to_pylist()
    shown = examples(outputs, keys, gallery)[: request.examples]
    images = dict(zip(keys, sample_rows.column(IMAGE).to_pylist()))
    headline = " | ".join(f"{name} {metrics[name]:.3f}" for name in HEADLINE if name in metrics)
    sheet = write_sheet(
        shown, images, out,
        f"{checkpoint.job.run.name} / {checkpoint.stage.name} step {checkpoint.step} on {data.source}",
        f"{len(captions)} samples | {headline}",
    )
    elapsed = time.monotonic() - started
    report = {
        "checkpoint": checkpoint.location.url,
        "stage": checkpoint.stage.name,
        "objective": objective,
        "step": checkpoint.step,
        "data": data.source,
        "shards": [s.url for s in data.shards],
        "samples": len(captions),
        "distinct_captions": len(gallery.captions) if gallery else len(set(captions)),
        "metrics": {k: round(v, 6) for k, v in metrics.items()},
        "definitions": {k: v for k, v in DEFINITIONS.items() if _defined(k, metrics)},
        "settings": {k: v for k, v in asdict(request).items() if k != "storage"},
        "spec": spec_summary(checkpoint),
        "wall_time_s": round(elapsed, 1),
        "samples_per_s": round(len(captions) / elapsed, 2),
        "examples": shown,
        "sheet": sheet,
    }
    write_bytes_atomic(out.child("eval.json"), json.dumps(report, indent=1).encode())
    report["eval_json"] = out.child("eval.json").url
    _tensorboard(out, checkpoint.step, metrics)
    return report


def _tensorboard(out: Location, step: int, metrics: dict[str, float]) -> None:
    """The metrics and the sheet as TensorBoard events beside ``eval.json``, at the checkpoint's step."""
    events = EventLog(out)
    events.scalars(step, {f"eval/{name}": value for name, value in metrics.items()})
    events.image("eval/sheet", read_bytes(out.child("sheet.png")), step)
    events.close()


def _score(request: EvalRequest, checkpoint: TrainedCheckpoint, data: HeldOutData,
           gallery: CaptionGallery | None) -> dict[str, np.ndarray]:
    """Run the actor pool over the held-out rows; the outputs, concatenated and sorted by key.

    The driver reads the rows (a held-out set is small) and hands them to Ray Data in blocks of
    one batch: no read tasks compete with the actors for CPUs, and ``max_samples`` always
    takes the same first rows.
    """
    import ray.data

    from pipeline.ray_runtime import cluster_cpus, ensure_ray

    ensure_ray(request.ray_address)
    text = text_kind(checkpoint.objective)
    rows = read_rows(data.shards, [KEY, CAPTION, IMAGE, *TOKEN_COLUMNS[text]], request.max_samples)
    total, size = rows.num_rows, request.batch_size
    if total == 0:
        raise EvalError(f"data: {data.source} holds no sample")
    actors = max(1, min(request.actors or cluster_cpus(), -(-total // size)))
    dataset = ray.data.from_arrow([rows.slice(i, size) for i in range(0, total, size)])
    dataset = dataset.map_batches(
        ScoringActor,
        fn_constructor_kwargs={
            "checkpoint": [checkpoint.location.url, checkpoint.location.options],
            "gallery": gallery.to_json() if gallery else None,
            "scoring": request.scoring(),
        },
        batch_size=size,
        batch_format="pyarrow",
        concurrency=actors,
        num_cpus=1,
    )
    log.info("eval: scoring %d samples with %d actor(s), batches of %d", total, actors, size)
    parts: list[dict[str, np.ndarray]] = []
    done, started = 0, time.monotonic()
    progress = console().progress("eval: samples", total)
    progress.update(0)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(batch)
        done += len(batch["key"])
        progress.update(done, f"{done / max(time.monotonic() - started, 1e-9):.1f} samples/s")
    progress.close()
    outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    order = np.argsort(outputs["key"].astype(str), kind="stable")
    return {name: values[order] for name, values in outputs.items()}


def _defined(name: str, metrics: dict) -> bool:
    return any(key == name or key.startswith(name.split("{")[0]) for key in metrics)


def spec_summary(checkpoint: TrainedCheckpoint) -> dict:
    """The parts of the job spec that say what was evaluated."""
    model, stage = checkpoint.job.model, checkpoint.stage
    summary = {
        "run": checkpoint.job.run.name,
        "vision": {"name": model.vision.name, "image_size": model.vision.image_size},
        "qformer": {"bert": model.qformer.bert, "num_query_tokens": model.qformer.num_query_tokens,
                    "embed_dim": model.qformer.embed_dim},
        "stage": {"name": stage.name, "losses": stage.losses, "steps": stage.steps,
                  "batch_size": stage.batch_size, "lr": stage.optimizer.lr},
        "workers": checkpoint.job.scaling.workers,
    }
    if checkpoint.objective == 2:
        summary["llm"] = model.llm.name
    return summary
