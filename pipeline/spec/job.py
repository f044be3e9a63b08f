"""The top-level job spec: the sections a job YAML may hold."""

from __future__ import annotations

from pydantic import model_validator

from pipeline.spec.base import SpecModel
from pipeline.spec.curate import CurateSpec
from pipeline.spec.model import ModelSpec
from pipeline.spec.prep import PrepSpec
from pipeline.spec.train import HELD_OUT, DataSpec, DeepSpeedSpec, RunSpec, ScalingSpec, StageSpec


class JobSpec(SpecModel):
    """A job YAML. ``qformer prep`` runs its ``prep`` section; ``qformer curate`` its ``curate``
    section; ``qformer train`` its run, scaling, model, data, deepspeed and stages sections."""

    prep: PrepSpec | None = None
    """The preprocessing job."""
    curate: CurateSpec | None = None
    """The curation job (prepared shards in, curated prepared shards out)."""
    run: RunSpec | None = None
    """Name and storage of a training run."""
    scaling: ScalingSpec = ScalingSpec()
    """Ray Train workers."""
    model: ModelSpec = ModelSpec()
    """The BLIP-2 model."""
    data: DataSpec | None = None
    """Training data."""
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    """DeepSpeed engine settings."""
    stages: list[StageSpec] = []
    """The curriculum, run in order."""

    @property
    def is_training(self) -> bool:
        return self.run is not None

    @model_validator(mode="after")
    def _sections(self) -> "JobSpec":
        training = [self.run is not None, self.data is not None, bool(self.stages)]
        if self.prep is None and self.curate is None and not any(training):
            raise ValueError("a job spec needs a prep section, a curate section or a training job (run, data, stages)")
        if any(training) and not all(training):
            missing = [n for n, present in zip(("run", "data", "stages"), training) if not present]
            raise ValueError(f"a training job needs run, data and stages; missing: {', '.join(missing)}")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stages: stage names must be unique")
        for index, stage in enumerate(self.stages):
            source = stage.init_from
            if source and "/" not in source and not source.endswith(".pth") and source not in names[:index]:
                raise ValueError(
                    f"stages.{index}.init_from: {source!r} is neither an earlier stage nor a path "
                    "(a folder, a hub id or a .pth file)"
                )
            if stage.eval is not None and stage.eval.data == HELD_OUT and not self.data.held_out_shards:
                raise ValueError(f"stages.{index}.eval.data: {HELD_OUT} needs data.held_out_shards > 0 "
                                 "(the prepared shards kept out of training)")
            allowed = stage.init_from_allow_missing or stage.init_from_allow_unexpected
            if index == 0 and source is None and allowed:
                raise ValueError(
                    "stages.0.init_from_allow_missing/unexpected: the first stage loads no "
                    "weights without init_from"
                )
        return self
