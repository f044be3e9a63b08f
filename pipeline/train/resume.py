"""What a re-run may change before it resumes a stage: the driver compares the spec a stage's
latest checkpoint was written under with the current one before any worker starts.

A change to a field that shapes the run's math (the model, the data, the stage's losses, batch
size, optimizer, augmentation, the precision, the seed, ...) would break the promise that a
resumed run repeats an uninterrupted one, or silently train something else: it is refused, each
field named, unless ``run.accept_changes`` accepts it. Fields that only change how the run is
carried out (workers, ZeRO stage, logging, checkpoint and evaluation intervals, storage options)
pass. Raising a stage's ``steps`` continues it (its LR schedule then spans the new length).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from fnmatch import fnmatch
from typing import Any

from pipeline.checkpoint.format import METADATA
from pipeline.errors import UsageError
from pipeline.io.storage import Location, exists, read_bytes
from pipeline.spec import JobSpec

SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of a stage's registered checkpoints, in the stage folder."""

HARMLESS = (
    "prep", "prep.*",
    "run.storage_options.*", "run.ray_address", "run.keep_checkpoints", "run.accept_changes",
    "run.lease_stale_after_s", "run.tracking", "run.tracking.*",
    "scaling.workers", "scaling.cpus_per_worker", "scaling.gpus_per_worker", "scaling.max_failures",
    "data.decode_threads", "data.prefetch_batches", "data.storage.*",
    "deepspeed.zero_stage",
    "stages.*.log_every", "stages.*.checkpoint_every", "stages.*.eval", "stages.*.eval.*", "stages.*.steps",
)
"""Field paths (``*`` wildcards) whose change a resumed run honours."""


class SpecChanged(UsageError):
    """The current spec changes fields that a resumed stage cannot honour."""


def latest_checkpoint(stage_dir: Location) -> Location | None:
    """The newest checkpoint Ray Train registered for a stage, or None."""
    snapshot = stage_dir.child(SNAPSHOT)
    if not exists(snapshot):
        return None
    latest = json.loads(read_bytes(snapshot)).get("latest_checkpoint_result")
    return stage_dir.child(latest["checkpoint_dir_name"]) if latest else None


def check_resumable(job: JobSpec, stage_index: int, checkpoint: Location) -> list[str]:
    """Refuse a resume whose spec changed a field that shapes the math; returns the accepted
    changes (harmless ones, and those ``run.accept_changes`` names), described.

    Raises:
        SpecChanged: a field changed that neither is harmless nor accepted; the message names
            each one with both values.
    """
    saved = JobSpec.model_validate(json.loads(read_bytes(checkpoint.child(METADATA)))["spec"])
    before = dict(_flatten(_comparable(saved, stage_index)))
    after = dict(_flatten(_comparable(job, stage_index)))
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    described = {path: f"{path}: {_show(before.get(path))} in the checkpoint, {_show(after.get(path))} now"
                 for path in changed}
    stage_name = job.stages[stage_index].name
    refused = [path for path in changed
               if not _matches(path, HARMLESS) and not _matches(path, job.run.accept_changes)]
    if refused:
        listing = "; ".join(described[path] for path in refused)
        raise SpecChanged(
            f"stage {stage_name} resumes from {checkpoint.url}, but the spec changed what it trains: "
            f"{listing} (start a new run, or accept with run.accept_changes: [{', '.join(refused)}])"
        )
    return [described[path] for path in changed]


def _comparable(job: JobSpec, stage_index: int) -> dict[str, Any]:
    """The job as plain data, with only the stage being resumed under ``stages.N``."""
    data = job.model_dump(mode="json", exclude={"stages"})
    data["stages"] = {str(stage_index): job.stages[stage_index].model_dump(mode="json")}
    return data


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value


def _matches(path: str, patterns) -> bool:
    return any(path == pattern or fnmatch(path, pattern) or path.startswith(pattern + ".")
               for pattern in patterns)


def _show(value: Any) -> str:
    return "absent" if value is None else json.dumps(value)
