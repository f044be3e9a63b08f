"""Where a training run's metrics go besides ``metrics.jsonl``: TensorBoard event files (on by
default), MLflow and Weights & Biases (optional extras, ``pip install 'qformer-pipeline[mlflow]'``
or ``[wandb]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.spec.base import SpecModel


class MlflowSpec(SpecModel):
    """An MLflow run per ``qformer train`` run folder (a resumed run continues it)."""

    tracking_uri: str | None = None
    """Tracking server or store (``http://host:5000``, ``file:/path/mlruns``); None: MLflow's
    own default (``$MLFLOW_TRACKING_URI``, else a local store)."""
    experiment: str = "qformer"
    """Experiment name (created if missing)."""


class WandbSpec(SpecModel):
    """A Weights & Biases run per ``qformer train`` run folder (a resumed run continues it)."""

    project: str = "qformer"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; None: the logged-in user's default."""
    mode: Literal["online", "offline"] | None = None
    """online, or offline (files under ``dir``, uploaded later with ``wandb sync``); None: W&B's
    own default (``$WANDB_MODE``, else online)."""
    dir: str | None = None
    """Local folder for W&B's files; None: ``$WANDB_DIR``, else the working directory."""


class TrackingSpec(SpecModel):
    """Experiment tracking of a training run. Credentials (``WANDB_API_KEY``, MLflow tokens)
    come from the environment, never from the spec, and are never logged."""

    tensorboard: bool = True
    """TensorBoard event files beside each stage's ``metrics.jsonl`` (``tensorboard --logdir``
    the run's storage, local or ``s3://``)."""
    run_name: str | None = None
    """Run name in MLflow and W&B; None: ``run.name``."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Tags of the MLflow and W&B runs (W&B shows them as ``key:value``)."""
    mlflow: MlflowSpec | None = None
    """Log to MLflow; None: do not."""
    wandb: WandbSpec | None = None
    """Log to Weights & Biases; None: do not."""
