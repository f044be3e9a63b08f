"""Typed spec of model-based curation (the ``curate:`` section of a job YAML).

``qformer curate`` reads prepared shards (a ``qformer prep`` output) and writes curated prepared
shards: near-duplicate images removed, BLIP's CapFilt (synthetic captions from a captioner,
every caption ranked by image-text similarity, the best ones kept), and optionally a score
filter (a threshold, or the top fraction of the corpus as DataComp does).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.spec.base import SpecModel
from pipeline.spec.model import DType
from pipeline.spec.prep import NearDupSpec
from pipeline.spec.storage import StorageSpec

ModelKind = Literal["auto", "checkpoint", "transformers"]
"""Where a curation model comes from: one of our training checkpoints, or a transformers model;
``auto`` takes a folder holding ``metadata.json``, ``complete.json`` or ``summary.json`` (a
checkpoint, stage or run folder written by ``qformer train``) as a checkpoint."""


class ActorSpec(SpecModel):
    """The Ray Data actor pool a model runs in: each actor loads the model once."""

    actors: int | None = Field(None, ge=1)
    """Actors; None: one per CPU of the cluster (``num_cpus`` each), or per GPU with ``num_gpus``."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per actor (also its torch threads)."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per actor; 0 runs the model on CPU."""
    batch_size: int = Field(16, ge=1)
    """Images per model call."""
    dtype: DType = "float32"
    """Precision of a transformers model's weights (bfloat16 or float16 on GPUs)."""


class CaptionerSpec(ActorSpec):
    """Synthetic captions, K per image, by nucleus sampling (BLIP's CapFilt: K = 10, top-p 0.9)."""

    model: str = Field(min_length=1)
    """A training checkpoint (checkpoint, stage or run folder; local or ``s3://``) of stage 2,
    which captions through its LLM, or of stage 1, which captions with the Q-Former's ITG head
    (BLIP's captioner is such an image-grounded text decoder; no LLM to run), or a
    transformers image-to-text model by hub id or folder (``Blip2ForConditionalGeneration``,
    ``BlipForConditionalGeneration``, or any model ``AutoModelForImageTextToText`` loads)."""
    kind: ModelKind = "auto"
    """What ``model`` is (see ``ModelKind``)."""
    stage: str | None = None
    """Of a run folder: the stage whose final checkpoint captions (default: its last stage)."""
    captions: int = Field(10, ge=1, le=64)
    """Synthetic captions per image (K)."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of the sampling."""
    max_new_tokens: int = Field(30, ge=1)
    """Longest synthetic caption, in tokens."""
    prompt: str = ""
    """Text the captions continue (BLIP: ``a picture of``); removed from the kept captions."""
    seed: int = Field(0, ge=0)
    """With the sample key, seeds each image's sampling: a rerun writes the same captions."""


class RankerSpec(ActorSpec):
    """Scores every candidate caption of an image by image-text similarity."""

    model: str = Field(min_length=1)
    """A stage-1 training checkpoint (checkpoint, stage or run folder), or a transformers CLIP or
    SigLIP model by hub id or folder (cosine similarity of its image and text embeddings)."""
    kind: ModelKind = "auto"
    """What ``model`` is (see ``ModelKind``)."""
    stage: str | None = None
    """Of a run folder: the stage whose final checkpoint ranks (default: its last stage)."""
    score: Literal["itc", "itm"] = "itc"
    """Our checkpoints: ``itc``, the best query's cosine similarity (BLIP-2's ITC); ``itm``, the
    ITM head's match probability (BLIP's filter keeps a caption when it is > 0.5)."""


class SelectSpec(SpecModel):
    """Which captions, and which samples, are kept once ranked."""

    keep: int = Field(2, ge=1)
    """Captions kept per image, the best first (BLIP-2: the top two; training draws one of them
    at each step)."""
    web_margin: float = Field(0.0, ge=0)
    """The web caption ranks as if it scored this much more: a synthetic caption displaces it only
    when it scores higher by more than this. A ranker that is unsure between two captions then
    keeps the one written with the image (on 1,024 noisy demo images, a margin of 0.03 in ITC
    cosine cut the right web captions replaced from 62 to 11 for 2.4 points of recall)."""
    min_score: float | None = None
    """A caption scoring below this is never kept; a sample with no caption left is dropped as
    ``score_too_low``."""
    top_fraction: float | None = Field(None, gt=0, le=1)
    """Keep only the samples whose best score is among this top fraction of the corpus (DataComp's
    CLIP-score baseline: 0.3); the cut is computed once over the whole corpus and kept for every
    later run. Others are dropped as ``score_not_in_top_fraction``."""


class CurateExecutionSpec(SpecModel):
    """How the curation is spread over the Ray cluster."""

    workers: int | None = Field(None, ge=1)
    """Actors of the hashing and writing phases; None uses every CPU of the cluster."""
    rows_per_row_group: int = Field(256, ge=1)
    """Parquet row-group size of the curated shards."""
    tokenize_batch_size: int = Field(256, ge=1)
    """Captions tokenized per call."""
    near_duplicate_partitions: int = Field(16, ge=1)
    """Hash partitions of the distributed near-duplicate search (large corpora)."""
    driver_max_rows: int = Field(2_000_000, ge=0)
    """Corpora with at most this many samples are searched for near duplicates in the driver
    process; larger ones by a Ray Data shuffle."""
    max_failed_shards: int = Field(0, ge=0)
    """Shards that may fail with the run still succeeding; they are named and retried next time."""
    lease_stale_after_s: float = Field(300.0, gt=0)
    """Another run's lease on the output folder is taken over when its heartbeat is older."""


class CurateSpec(SpecModel):
    """Prepared shards in, curated prepared shards out (the same contract; training reads both)."""

    input: str | None = None
    """A ``qformer prep`` output folder (with ``manifest.json``), local or ``s3://``. Left out in a
    training job's ``data.curate``, which curates the job's own prepared data."""
    output: str | None = None
    """Output folder: per input shard a curated shard, its provenance table and stats. Left out
    in ``data.curate``: ``RUN/curated``."""
    storage: StorageSpec = StorageSpec()
    """Endpoint options of ``s3://`` input, output and checkpoints."""
    near_duplicates: NearDupSpec = NearDupSpec()
    """Near-duplicate images, found first: their captions are neither generated nor ranked."""
    captioner: CaptionerSpec | None = None
    """Synthetic captions; None keeps only the web captions (still ranked if a ranker is set)."""
    ranker: RankerSpec | None = None
    """Caption ranking; None keeps every sample's web caption, unscored."""
    select: SelectSpec = SelectSpec()
    """What is kept once ranked."""
    execution: CurateExecutionSpec = CurateExecutionSpec()
    """How the work is spread."""

    @model_validator(mode="after")
    def _consistent(self) -> "CurateSpec":
        if self.ranker is None:
            if self.captioner is not None:
                raise ValueError("captioner: synthetic captions need a ranker to choose among them")
            if self.select.min_score is not None or self.select.top_fraction is not None:
                raise ValueError("select: a score filter needs a ranker")
            if not self.near_duplicates.enabled:
                raise ValueError("nothing to do: enable near_duplicates or set a ranker")
        return self
