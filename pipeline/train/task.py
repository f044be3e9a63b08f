"""What a Ray Train worker needs to train one stage: it travels as ``train_loop_config``."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.checkpoint.sources import InitSource
from pipeline.io.storage import Location

FATAL = "_fatal.json"
"""In a stage folder: an error of this attempt that would repeat on every restart."""


@dataclass(frozen=True)
class StageTask:
    """One stage of a run, for the workers.

    Attributes:
        job_json: The whole job spec, as JSON (paths already resolved by the driver).
        stage_index: Which of its stages to train.
        run_dir: The run folder.
        shards: The prepared training shards, in corpus order.
        init_weights: The weights a new stage starts from (``init_from``), or None.
        attempt: Names this ``qformer train`` invocation's run of the stage (a fatal error
            recorded by an earlier invocation does not stop this one).
    """

    job_json: str
    stage_index: int
    run_dir: Location
    shards: tuple[Location, ...]
    init_weights: InitSource | None
    attempt: str = ""

    def to_config(self) -> dict:
        return {
            "job": self.job_json,
            "stage_index": self.stage_index,
            "run_dir": [self.run_dir.url, self.run_dir.options],
            "shards": [[s.url, s.options] for s in self.shards],
            "init_weights": self.init_weights.to_config() if self.init_weights else None,
            "attempt": self.attempt,
        }

    @classmethod
    def from_config(cls, config: dict) -> "StageTask":
        init = config["init_weights"]
        return cls(
            job_json=config["job"],
            stage_index=config["stage_index"],
            run_dir=Location(*config["run_dir"]),
            shards=tuple(Location(url, options) for url, options in config["shards"]),
            init_weights=InitSource.from_config(init) if init else None,
            attempt=config["attempt"],
        )
