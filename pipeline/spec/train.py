"""Typed spec of a training job: the run, scaling, data, DeepSpeed settings and stages.

The model section is :class:`pipeline.spec.model.ModelSpec`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.spec.base import SpecModel
from pipeline.spec.curate import CurateSpec
from pipeline.spec.losses import LossName, Objective, objective_of
from pipeline.spec.prep import PrepSpec
from pipeline.spec.storage import StorageSpec
from pipeline.spec.tracking import TrackingSpec

HELD_OUT = "held_out"
"""``eval.data`` naming the prepared shards that ``data.held_out_shards`` keeps out of training."""


class RunSpec(SpecModel):
    """Where a run lives. Running the same job again (same name and storage) resumes it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    """Run name: the folder under ``storage`` that holds checkpoints, metrics and plots."""
    storage: str = "runs"
    """Local folder (shared, e.g. NFS, on multi-node clusters) or ``s3://bucket/prefix``."""
    storage_options: StorageSpec = StorageSpec()
    """Endpoint/region/profile for ``s3://`` storage; credentials come from the environment."""
    ray_address: str | None = None
    """Ray cluster to run on; None joins ``$RAY_ADDRESS`` or starts a local embedded Ray."""
    seed: int = Field(0, ge=0)
    """Seeds model init, data order, augmentation, dropout and ITM negatives (all per step, so a
    resumed run repeats an uninterrupted one)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept per stage (the newest ones)."""
    accept_changes: list[str] = Field(default_factory=list)
    """Spec fields (dotted paths as ``--set`` writes them, ``*`` wildcards) whose change a resumed
    stage accepts although it changes what the run trains, e.g. ``[stages.0.optimizer.lr]``; each
    accepted change is listed when the run resumes."""
    lease_stale_after_s: float = Field(300.0, gt=0)
    """A run holds a lease on its folder (one run at a time) and refreshes it while it runs; a
    lease not refreshed for this long is taken over by the next run."""
    about: str | None = None
    """What the run does and how long it should take, printed when it starts."""
    tracking: TrackingSpec = TrackingSpec()
    """TensorBoard (on by default), MLflow and W&B."""


class ScalingSpec(SpecModel):
    """How many Ray Train workers and what each one gets."""

    workers: int = Field(1, ge=1)
    """Data-parallel workers (one per GPU on GPU clusters)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved for each worker (data decoding threads run inside it)."""
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs per worker; 0 trains on CPU with the gloo backend, otherwise nccl."""
    max_failures: int = Field(3, ge=-1)
    """Worker failures Ray Train recovers from (restarting from the last checkpoint); -1: no limit."""
    data_streams: int | None = Field(None, ge=1)
    """Data streams of a stage, fixed when the stage starts (None: ``workers``). Each step trains
    one batch of every stream; a worker takes several streams (as gradient accumulation) when
    there are fewer workers than streams, so a run resumed on fewer workers trains the same
    samples per step with the same global batch."""

    @model_validator(mode="after")
    def _streams_cover_workers(self) -> "ScalingSpec":
        if self.data_streams is not None and self.data_streams < self.workers:
            raise ValueError(f"data_streams ({self.data_streams}) must be >= workers ({self.workers}): "
                             "a stream cannot be split between workers")
        return self


class DataSpec(SpecModel):
    """Training data: shards prepared by ``qformer prep``, or raw shards prepared first."""

    prepared: str | None = None
    """Output folder of ``qformer prep`` (holding ``manifest.json``), local or ``s3://``."""
    raw: PrepSpec | None = None
    """A prep section: ``qformer train`` first prepares these raw shards into the run's storage
    (``RUN/prepared``; complete shards are skipped on resume), then trains on them."""
    curate: CurateSpec | None = None
    """A curate section without ``input`` and ``output``: ``qformer train`` curates the prepared
    data (``prepared``, or ``RUN/prepared``) into ``RUN/curated`` (complete shards are skipped on
    resume), then trains on the curated shards."""
    storage: StorageSpec = StorageSpec()
    """Endpoint options for ``s3://`` prepared data."""
    decode_threads: int = Field(2, ge=1)
    """Threads per worker decoding and augmenting images ahead of the training step."""
    prefetch_batches: int = Field(4, ge=1)
    """Batches each worker keeps ready."""
    held_out_shards: int = Field(0, ge=0)
    """The last N prepared (or curated) shards, in corpus order, are kept out of training; a
    stage's ``eval.data: held_out`` evaluates on them. Prep's duplicate removal keeps the first
    copy in corpus order, so these shards hold no image that a training shard holds (with
    ``dedup: image``). Must leave at least one shard to train on. 0: every shard trains."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.prepared is None) == (self.raw is None):
            raise ValueError("give exactly one of prepared (a prep output folder) or raw (a prep section)")
        if self.curate is not None and (self.curate.input is not None or self.curate.output is not None):
            raise ValueError("curate: leave out input and output: training curates its own data into RUN/curated")
        return self


class DeepSpeedSpec(SpecModel):
    """DeepSpeed engine settings."""

    zero_stage: int = Field(2, ge=0, le=3)
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision of the trainable parts (frozen towers use the model section's dtypes)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    gradient_clipping: float = Field(1.0, ge=0)
    """Global gradient-norm clip; 0 disables it."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed config entries merged over the generated config (expert use). Copied
    into every checkpoint's metadata and every submitted spec, so values under keys that look
    like secrets (``api_key``, ``token``, ``password``, ...) are refused."""

    @field_validator("overrides")
    @classmethod
    def _no_secrets(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        for path, key, value in _leaves(overrides, [], ""):
            if _looks_secret(key) and value not in (None, "") and not isinstance(value, bool):
                raise ValueError(
                    f"{'.'.join(path)}: looks like a secret; the overrides are copied into every "
                    "checkpoint and submitted spec: give secrets to the job as environment "
                    "variables instead")
        return overrides


# Words of a key (split at _ - . and camelCase) that name a secret, alone or as a pair.
_SECRET_WORDS = frozenset({"token", "password", "passwd", "passphrase", "secret", "credential",
                           "credentials", "apikey"})
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"),
                           ("secret", "key"), ("auth", "key")})


def _looks_secret(key: str) -> bool:
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", key)]
    return bool(_SECRET_WORDS.intersection(words)) or any(
        pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def _leaves(node: Any, path: list[str], key: str):
    """(path, nearest mapping key, value) of every scalar in nested mappings and lists."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _leaves(value, [*path, str(name)], str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, [*path, str(index)], key)
    else:
        yield path, key, node


class OptimizerSpec(SpecModel):
    """AdamW with linear warm-up and cosine decay to ``min_lr``."""

    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(1e-5, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up from 0 to ``lr`` over these optimizer steps."""
    weight_decay: float = Field(0.05, ge=0)
    """Decoupled weight decay; never applied to 1-D parameters (biases, norms, temperature)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""

    @model_validator(mode="after")
    def _ranges(self) -> "OptimizerSpec":
        if self.min_lr > self.lr:
            raise ValueError("min_lr must be <= lr")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError("betas must be in [0, 1)")
        return self


class AugmentSpec(SpecModel):
    """Train-time augmentation of the prepared images."""

    enabled: bool = True
    """Random resized crop + horizontal flip; off: the prepared image, resized."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Area fraction range of the random crop (LAVIS: 0.5-1.0)."""
    hflip: bool = True
    """Flip horizontally with probability 0.5."""

    @model_validator(mode="after")
    def _scale(self) -> "AugmentSpec":
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        return self


class EvalSpec(SpecModel):
    """Evaluation on a held-out set during a stage (the metrics of ``qformer eval``, logged as
    ``eval_*`` records in the stage's ``metrics.jsonl`` and plotted in its ``loss.png``)."""

    data: str | list[str]
    """Held-out ``qformer prep`` output folder (with ``manifest.json``) or ``.parquet`` glob,
    prepared with the training data's image and tokenizer settings; ``data.storage`` applies.
    A list: several such folders or globs. ``held_out`` (alone, not in a list): the prepared
    shards that ``data.held_out_shards`` keeps out of training."""
    every: int = Field(ge=1)
    """Evaluate every this many steps, and at the end of the stage."""
    max_samples: int = Field(256, ge=1)
    """Evaluate on the first N held-out samples (split between the workers)."""
    batch_size: int = Field(32, ge=1)
    """Samples per evaluation batch on each worker."""
    itm_top_k: int = Field(4, ge=0)
    """Stage 1: ITC candidates per image re-ranked by ITM, and ITM accuracy (0: no ITM)."""
    max_new_tokens: int = Field(20, ge=1)
    """Stage 2: longest greedily generated caption."""

    @field_validator("data")
    @classmethod
    def _held_out_alone(cls, data: str | list[str]) -> str | list[str]:
        if not data:
            raise ValueError("name a held-out folder or glob, or held_out")
        if isinstance(data, list) and HELD_OUT in data:
            raise ValueError(f"{HELD_OUT} names the held-out shards on its own, not in a list")
        return data


class StageSpec(SpecModel):
    """One stage of a curriculum."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Stage name (a folder of the run, and what ``init_from`` refers to)."""
    losses: dict[LossName, float]
    """Loss weights, all of one objective (``pipeline.spec.losses``): any of itc, itm, itg
    (objective 1, the Q-Former against the frozen vision tower), or lm (objective 2, through the
    frozen LLM). The stage's total loss is their weighted sum."""
    steps: int = Field(ge=1)
    """Optimizer steps of the stage."""
    batch_size: int = Field(ge=1)
    """Micro-batch size per worker."""
    optimizer: OptimizerSpec = OptimizerSpec()
    augmentation: AugmentSpec = AugmentSpec()
    qformer_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """Dropout of the Q-Former's hidden states and attention in this stage; None keeps its BERT's
    (0.1). Stage 2 with a Q-Former whose queries give one vector per image (measured on the demo
    corpus after stage 1) learns with 0: with dropout, the LLM is trained on prompts that the
    noise makes diverse and is evaluated on identical ones (held-out caption loss 9.0 after 80
    steps, 3.1 without dropout)."""
    checkpoint_every: int = Field(1000, ge=1)
    """Checkpoint every this many steps (and always at the end of the stage)."""
    log_every: int = Field(1, ge=1)
    """Log metrics every this many steps."""
    init_from: str | None = None
    """Trained weights the stage starts from (loaded over ``model.qformer.init``; the optimizer
    and the step count start fresh), one of:

    - the name of an earlier stage: its final checkpoint;
    - a checkpoint folder written by training, a finished stage folder, or an own-format
      ``qformer export`` folder (local or ``s3://``, read with ``run.storage_options``);
    - a transformers Blip2 model folder or hub id (``Blip2ForImageTextRetrieval``,
      ``Blip2ForConditionalGeneration``, ``Blip2Model``, e.g. ``Salesforce/blip2-opt-2.7b``, or a
      transformers ``qformer export`` folder);
    - a LAVIS checkpoint, a ``.pth`` file with LAVIS's key names (``blip2_pretrained.pth``).

    What loads: the query tokens, the Q-Former, ``ln_vision``, the ITC projections and
    temperature, the ITM and ITG heads and (stage 2) the LLM projection, each listed on the
    console; the frozen towers always come from the model section. The spec's model must have
    the source's shapes (e.g. ``qformer.bert: bert-base-uncased`` and 32 queries for Salesforce's
    weights). A source of the other objective legitimately differs: a stage-1 result has a
    caption side (caption embeddings, text feed-forward, ITC/ITM/ITG heads, temperature) stage 2
    does not build and lacks the ``language_projection`` it does, and the reverse; so does an LLM
    projection for an LLM of another width (it starts fresh). Any other tensor of the model that
    the source lacks (or holds in another shape) and any tensor of the source the model has no
    place for is an error unless ``init_from_allow_missing``/``init_from_allow_unexpected`` list
    it: the driver checks this before any Ray work. None: the previous stage's result (the first
    stage starts from ``model.qformer.init``)."""
    init_from_allow_missing: list[str] = []
    """Glob patterns (``fnmatch``) of this stage's trainable tensors that may start from
    ``model.qformer.init`` because the source lacks them or holds them in another shape, e.g.
    ``["lm_head.*", "temp"]`` for a hub ``Blip2ForImageTextRetrieval`` (transformers' classes
    have no ITG head or temperature; a ``qformer export`` folder keeps both). ``["*"]`` accepts
    any source, even one that fits nothing: the stage then starts from the model's
    initialisation, said in one console line. They are listed on the console either way."""
    init_from_allow_unexpected: list[str] = []
    """Glob patterns of the source's tensors (under our names, e.g. ``qformer.*``) this stage's
    model has no place for, which are then left out and listed instead of refused."""
    eval: EvalSpec | None = None
    """Periodic evaluation on a held-out set; None: none."""

    @property
    def objective(self) -> Objective:
        """1 for representation learning (itc/itm/itg), 2 for generative learning (lm)."""
        return objective_of(self.losses)

    @model_validator(mode="after")
    def _losses(self) -> "StageSpec":
        try:
            objective_of(self.losses)
        except ValueError as err:
            raise ValueError(f"losses: {err}") from None
        if any(weight < 0 for weight in self.losses.values()):
            raise ValueError("losses: weights must be >= 0")
        return self
