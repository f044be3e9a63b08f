"""MLflow and Weights & Biases runs of a training run, written by the driver.

The driver sees every record rank 0 logs (``pipeline.train.watch``), holds the user's
credentials (``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``: the environment's, never the spec's)
and lives for the whole curriculum, so one tracker run covers every stage: metrics are named
``STAGE/loss/total``, ``STAGE/eval/t2i_r1``, ... and logged at the stage's step. The tracker
run ids are kept in ``RUN/tracking.json``, so running the same job again continues the same
MLflow and W&B runs. Parameters are the job spec, flattened, with every URL stripped of
credentials and query strings; W&B's git and console capture are off.

A tracker that fails while training runs is reported once and dropped: tracking never stops
training.
"""

from __future__ import annotations

import json
import logging
import os
import time

from pipeline.checkpoint.format import LOSS_PLOT, TRACKING
from pipeline.errors import UsageError
from pipeline.io.redact import redact_text
from pipeline.io.storage import Location, exists, read_bytes, write_bytes_atomic
from pipeline.spec import JobSpec
from pipeline.train.metrics import scalars

log = logging.getLogger("qformer.train")


class Trackers:
    """The MLflow and W&B runs the job's ``run.tracking`` asks for (possibly none)."""

    def __init__(self, backends: list):
        self.backends = backends

    @classmethod
    def open(cls, job: JobSpec, run_dir: Location) -> "Trackers":
        """Start (or, with ids in ``RUN/tracking.json``, continue) the runs.

        Raises:
            UsageError: a tracker's package is not installed.
        """
        spec = job.run.tracking
        if spec.mlflow is None and spec.wandb is None:
            return cls([])
        state_file = run_dir.child(TRACKING)
        state = json.loads(read_bytes(state_file)) if exists(state_file) else {}
        name = spec.run_name or job.run.name
        params = flat_params(job)
        backends = []
        if spec.mlflow is not None:
            backends.append(_Mlflow(spec.mlflow, name, spec.tags, params, state.get("mlflow_run_id")))
            state["mlflow_run_id"] = backends[-1].run_id
        if spec.wandb is not None:
            backends.append(_Wandb(spec.wandb, name, spec.tags, params, state.get("wandb_run_id")))
            state["wandb_run_id"] = backends[-1].run_id
        write_bytes_atomic(state_file, json.dumps(state, indent=1).encode())
        for backend in backends:
            log.info("train: tracking with %s", backend.describe())
        return cls(backends)

    def log(self, stage: str, record: dict) -> None:
        """A step or evaluation record of ``stage``."""
        values = {f"{stage}/{name}": value for name, value in scalars(record).items()}
        self._each("log", stage, record["step"], values)

    def stage_done(self, done: dict, run_dir: Location) -> None:
        """A finished stage: its final checkpoint as a link, its loss plot as an artifact."""
        plot = run_dir.child(done["stage"], LOSS_PLOT)
        self._each("stage_done", done["stage"], done["checkpoint"],
                   plot.filesystem()[1] if plot.is_local and exists(plot) else None)

    def close(self, *, failed: bool = False) -> None:
        self._each("close", failed)
        self.backends = []

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as err:
                log.warning("train: %s failed (%s); tracking there stops, training goes on",
                            backend.describe(), redact_text(" ".join(str(err).split()))[:300])
                self.backends.remove(backend)


def flat_params(job: JobSpec) -> dict[str, str]:
    """The job spec as ``section.field: value`` strings, URLs without credentials or queries."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and value and any(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):  # stages.0.steps, as --set names them
                walk(f"{prefix}.{index}", item)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[prefix] = redact_text(text)

    walk("", job.model_dump(mode="json", exclude={"run": {"tracking"}}))
    return flat


class _Mlflow:
    def __init__(self, spec, name: str, tags: dict[str, str], params: dict[str, str], run_id: str | None):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise UsageError("run.tracking.mlflow: MLflow is not installed; "
                             "pip install 'qformer-pipeline[mlflow]'") from None
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=spec.tracking_uri)
        self.where = self.client.tracking_uri
        if run_id is None:
            experiment = self.client.get_experiment_by_name(spec.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(spec.experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            logged: dict[str, str] = {}
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            logged = self.client.get_run(run_id).data.params
        # MLflow parameters cannot change: a resumed run adds only the ones it did not have.
        new = [Param(key[:250], value[:6000]) for key, value in params.items() if key[:250] not in logged]
        for start in range(0, len(new), 100):  # at most 100 per request
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def describe(self) -> str:
        return f"MLflow run {self.run_id} at {redact_text(self.where)}"

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def stage_done(self, stage: str, checkpoint: str, plot: str | None) -> None:
        self.client.set_tag(self.run_id, f"{stage}.checkpoint", redact_text(checkpoint))
        if plot is not None:
            self.client.log_artifact(self.run_id, plot, artifact_path=stage)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class _Wandb:
    def __init__(self, spec, name: str, tags: dict[str, str], params: dict[str, str], run_id: str | None):
        try:
            import wandb
        except ImportError:
            raise UsageError("run.tracking.wandb: wandb is not installed; "
                             "pip install 'qformer-pipeline[wandb]'") from None

        self.wandb = wandb
        if spec.dir:
            os.makedirs(spec.dir, exist_ok=True)
        self.run = wandb.init(
            project=spec.project, entity=spec.entity, name=name, id=run_id,
            resume="allow" if run_id else None, mode=spec.mode, dir=spec.dir,
            tags=[f"{key}:{value}" if value else key for key, value in tags.items()],
            config=params, allow_val_change=True,
            # No console capture (our console is ours), no git metadata (remotes can hold tokens).
            settings=wandb.Settings(console="off", save_code=False, disable_git=True, silent=True),
        )
        self.run_id = self.run.id
        self._stages: set[str] = set()

    def describe(self) -> str:
        mode = self.run.settings.mode
        return f"W&B run {self.run_id} ({mode}{', files in ' + self.run.dir if mode == 'offline' else ''})"

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        if stage not in self._stages:  # each stage's metrics against its own step
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        self.run.log({f"{stage}/step": step, **values})

    def stage_done(self, stage: str, checkpoint: str, plot: str | None) -> None:
        self.run.summary[f"{stage}/checkpoint"] = redact_text(checkpoint)
        if plot is not None:
            self.run.log({f"{stage}/loss_plot": self.wandb.Image(plot)})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
