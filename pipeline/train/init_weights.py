"""What each stage starts from (``init_from``), resolved by the driver.

Sources outside the run (checkpoint folders, transformers Blip2 folders and hub ids, LAVIS
``.pth`` files) are checked against the stage's model before any Ray work, so that a missing
path or weights that do not fit are one ``error:`` line (exit 2), not a failed Ray Train run.
An earlier stage's result is resolved when its stage starts; it fits by construction (the same
model spec), and the workers load every source with the same strictness.
"""

from __future__ import annotations

import json
import logging

import torch

from pipeline.assets import AssetError
from pipeline.checkpoint.format import COMPLETE
from pipeline.checkpoint.initial import check_initial_weights
from pipeline.checkpoint.sources import InitError, InitSource, resolve_init_source
from pipeline.io.storage import Location, exists, read_bytes
from pipeline.model import Blip2Pretrainer
from pipeline.spec import JobSpec
from pipeline.spec.train import StageSpec

log = logging.getLogger("qformer.train")


def check_init_sources(job: JobSpec, run_dir: Location) -> dict[int, InitSource]:
    """Resolve and check the ``init_from`` of every unfinished stage that names no earlier stage.

    Each such stage's model is built in the driver on the meta device (its names and shapes,
    the towers' widths included, without reading a weight), the source is read and matched
    against it, and the report's summary logged.

    Returns:
        The checked sources by stage index.

    Raises:
        InitError: A source is missing, unreadable or does not fit, named by its field.
    """
    checked = {}
    earlier: list[str] = []
    for index, stage in enumerate(job.stages):
        external = stage.init_from is not None and stage.init_from not in earlier
        earlier.append(stage.name)
        if not external or exists(run_dir.child(stage.name, COMPLETE)):
            continue
        field = f"stages.{index}.init_from"
        try:
            source = resolve_init_source(stage.init_from, job.run.storage_options, **_allowed(stage))
            report = check_initial_weights(_model_of(job, stage), source)
        except InitError as err:
            raise InitError(f"{field}: {err}") from None
        log.info("train: stage %s: %s", stage.name, report.summary())
        checked[index] = source
    return checked


def stage_init_source(job: JobSpec, index: int, run_dir: Location, previous: Location | None,
                      checked: dict[int, InitSource]) -> InitSource | None:
    """What stage ``index`` starts from: its checked external source, the earlier stage it
    names, or the previous stage's result (``previous``); None for a first stage without one."""
    stage = job.stages[index]
    if index in checked:
        return checked[index]
    if stage.init_from is not None:
        marker = json.loads(read_bytes(run_dir.child(stage.init_from, COMPLETE)))
        previous = Location(marker["checkpoint"], run_dir.options)
    if previous is None:
        return None
    return InitSource("checkpoint", previous.url, previous.options, **_allowed(stage))


def _allowed(stage: StageSpec) -> dict[str, tuple[str, ...]]:
    return {"allow_missing": tuple(stage.init_from_allow_missing),
            "allow_unexpected": tuple(stage.init_from_allow_unexpected)}


def _model_of(job: JobSpec, stage: StageSpec) -> Blip2Pretrainer:
    """The stage's model on the meta device: its names and shapes, no weights read or made."""
    qformer = job.model.qformer.model_copy(update={"init": "random"})
    spec = job.model.model_copy(update={"qformer": qformer})
    try:
        with torch.device("meta"):
            return Blip2Pretrainer(spec, objective=stage.objective, loss_weights=stage.losses,
                                   tower_weights=False)
    except (OSError, ValueError, AssetError, RuntimeError) as err:
        raise InitError(f"cannot build the stage's model to check the source against: "
                        f"{str(err).splitlines()[0] if str(err) else err!r}") from err
