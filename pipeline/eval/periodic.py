"""Evaluation during training: every ``eval.every`` steps each Ray Train worker scores its share
of the held-out samples (no Ray Data inside a training worker), the outputs are gathered on rank
0, and the same metrics as ``qformer eval`` become an ``eval_*`` record of the stage's metrics.

The training loop hands over a plain module (under ZeRO-3 it gathers the weights into one first)
and logs the record; all ranks must call :meth:`PeriodicEval.run` at the same steps (it gathers
across ranks).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.data.prepared import CAPTION, IMAGE, KEY, TOKEN_COLUMNS, count_rows, read_rows, text_kind
from pipeline.eval.heldout import CaptionGallery, EvalError, EvalInputs, check_tokens, resolve_data
from pipeline.eval.scoring import ScoringSpec, Stage1Scorer, Stage2Scorer
from pipeline.eval.summary import stage1_metrics, stage2_metrics
from pipeline.io.storage import Location
from pipeline.model import build_llm_tokenizer, image_preprocessing
from pipeline.model.generate import DecodingSpec
from pipeline.spec import JobSpec
from pipeline.spec.train import HELD_OUT, StageSpec

PREFIX = "eval_"
SHOWN = ("caption_accuracy", "t2i_r1", "itm_accuracy", "exact_match", "token_f1", "caption_loss", "query_cosine")


class PeriodicEval:
    """The held-out share of one worker and the scorer settings of one stage.

    Args:
        job: The training job.
        stage: The stage, whose ``eval`` section is set.
        rank: This worker's rank.
        world: Number of workers.

    Raises:
        ValueError: the held-out data is missing or unusable, or holds fewer samples than workers.
    """

    def __init__(self, job: JobSpec, stage: StageSpec, *, rank: int, world: int):
        self.spec, self.stage, self.rank, self.world = stage.eval, stage, rank, world
        self.objective = stage.objective
        model_spec = job.model
        try:
            data = resolve_data(_entries(self.spec.data), None, job.data.storage)
            check_tokens(data, self.objective, model_spec.qformer.max_text_length)
        except EvalError as err:
            raise ValueError(f"stages.{stage.name}.eval: {err}") from None
        columns = [KEY, CAPTION, IMAGE, *TOKEN_COLUMNS[text_kind(self.objective)]]
        rows = read_rows(data.shards, columns, self.spec.max_samples)
        share = rows.num_rows // world
        if share == 0:
            raise ValueError(f"stages.{stage.name}.eval: {rows.num_rows} held-out samples cannot be "
                             f"shared by {world} workers")
        # Equal shares: every rank runs the same number of batches.
        self.rows = rows.take(np.arange(rank, share * world, world))
        self.samples = share * world
        self.gallery = CaptionGallery.read(data.shards) if self.objective == 1 else None
        self.builder = EvalInputs(image_preprocessing(model_spec.vision), self.objective)
        self.tokenizer = build_llm_tokenizer(model_spec.llm) if self.objective == 2 else None

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based, completed steps) is an evaluation step."""
        return step % self.spec.every == 0 or step == self.stage.steps

    def run(self, model: torch.nn.Module, step: int) -> dict | None:
        """Evaluate ``model`` (a plain module holding the trained weights); rank 0 gets the
        ``eval_*`` record of ``step``, other ranks None. The model's train/eval modes are kept."""
        started = time.monotonic()
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            outputs = self._score(model)
        finally:
            for module, mode in modes.items():
                module.training = mode
        gathered = _gather(outputs, self.world)
        if self.rank != 0:
            return None
        merged = {name: np.concatenate([part[name] for part in gathered]) for name in gathered[0]}
        if self.objective == 1:
            metrics = stage1_metrics(merged, self.gallery)
        else:
            metrics = stage2_metrics(merged, list(merged["caption"]))
        return {
            "step": step,
            **{PREFIX + name: round(value, 6) for name, value in metrics.items()},
            PREFIX + "samples": self.samples,
            PREFIX + "time_s": round(time.monotonic() - started, 2),
        }

    @torch.no_grad()
    def _score(self, model) -> dict[str, np.ndarray]:
        size = self.spec.batch_size
        if self.objective == 1:
            scorer = Stage1Scorer(model, self.gallery, self.spec.itm_top_k)
        else:
            decoding = DecodingSpec(max_new_tokens=self.spec.max_new_tokens)
            scorer = Stage2Scorer(model, self.tokenizer, ScoringSpec(decoding=decoding))
        parts = []
        device = next(model.parameters()).device
        for start in range(0, self.rows.num_rows, size):
            rows = self.rows.slice(start, size)
            inputs = self.builder(rows, device)
            captions = rows.column(CAPTION).to_pylist()
            out = scorer(inputs, captions) if self.objective == 1 else scorer(inputs)
            parts.append({"caption": np.array(captions, dtype=object), **out})
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def stage_evaluator(job: JobSpec, stage: StageSpec, *, rank: int, world: int) -> PeriodicEval | None:
    """The stage's periodic evaluation, or None when its spec has no ``eval`` section."""
    if stage.eval is None:
        return None
    return PeriodicEval(job, stage, rank=rank, world=world)


def resolve_stage_evals(job: JobSpec, held_out: tuple[Location, ...] = ()) -> JobSpec:
    """Check every stage's held-out data before training starts; returns the job with
    ``eval.data: held_out`` replaced by the ``held_out`` shards and local held-out paths made
    absolute (Ray Train workers run in another working directory).

    Raises:
        ValueError: missing held-out data, tokens the model cannot use, or fewer samples than
            workers.
    """
    stages = []
    for stage in job.stages:
        if stage.eval is not None:
            if stage.eval.data == HELD_OUT:
                resolved = [shard.url for shard in held_out]
            elif isinstance(stage.eval.data, str):
                resolved = Location.of(stage.eval.data, job.data.storage).url
            else:
                resolved = [Location.of(entry, job.data.storage).url for entry in stage.eval.data]
            try:
                data = resolve_data(_entries(resolved), None, job.data.storage)
                check_tokens(data, stage.objective, job.model.qformer.max_text_length)
            except EvalError as err:
                raise ValueError(f"stages.{stage.name}.eval: {err}") from None
            samples = count_rows(data.shards, up_to=job.scaling.workers)
            if samples < job.scaling.workers:
                raise ValueError(f"stages.{stage.name}.eval: {samples} held-out samples cannot be shared "
                                 f"by {job.scaling.workers} workers")
            stage = stage.model_copy(update={"eval": stage.eval.model_copy(update={"data": resolved})})
        stages.append(stage)
    return job.model_copy(update={"stages": stages})


def _entries(data: str | list[str]) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


def _gather(outputs: dict[str, np.ndarray], world: int) -> list[dict[str, np.ndarray]]:
    if world == 1:
        return [outputs]
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, outputs)
    return gathered


def progress_line(stage: StageSpec, record: dict) -> str:
    """A one-line summary of an evaluation record."""
    shown = " | ".join(f"{name} {record[PREFIX + name]:.3f}" for name in SHOWN if PREFIX + name in record)
    return (f"[{stage.name}] eval at step {record['step']} on {record[PREFIX + 'samples']} held-out "
            f"samples: {shown} ({record[PREFIX + 'time_s']:.1f}s)")
