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
        launch: Which ``qformer train`` command started the stage (an id per command): restarts
            of its workers are told from resumes by a later command, and an error that repeats on
            every restart, recorded under this id, stops only this command's restarts.
    """

    job_json: str
    stage_index: int
    run_dir: Location
    shards: tuple[Location, ...]
    init_weights: InitSource | None
    launch: str = ""

    def to_config(self) -> dict:
        return {
            "job": self.job_json,
            "stage_index": self.stage_index,
            "run_dir": [self.run_dir.url, self.run_dir.options],
            "shards": [[s.url, s.options] for s in self.shards],
            "init_weights": self.init_weights.to_config() if self.init_weights else None,
            "launch": self.launch,
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
            launch=config.get("launch", ""),
        )
