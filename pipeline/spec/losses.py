"""The pretraining losses: one registry that spec validation, the model, the logs, the plots and
evaluation all read.

A loss belongs to one *objective*: 1, representation learning between the Q-Former and the frozen
vision tower (BLIP-2's first stage: ITC, ITM, ITG); 2, generative learning through the frozen LLM
(its second stage: LM). A curriculum stage trains one objective, with the weights its ``losses``
give. The model reports each loss under its ``output_field``, and the logs and plots use that
name too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Objective = Literal[1, 2]
"""1: Q-Former representation learning (ITC, ITM, ITG); 2: generative learning with the LLM (LM)."""

TOTAL_LOSS = "loss"
"""Output and log name of the weighted sum of a stage's losses."""


@dataclass(frozen=True)
class LossDef:
    """One pretraining loss.

    Attributes:
        name: Its key in a stage's ``losses`` (``itc``).
        objective: The objective it trains.
        output_field: The model output and log record field holding its value (``loss_itc``).
        description: What it is, for help texts and reports.
    """

    name: str
    objective: Objective
    output_field: str
    description: str


LOSSES: tuple[LossDef, ...] = (
    LossDef("itc", 1, "loss_itc", "image-text contrastive loss"),
    LossDef("itm", 1, "loss_itm", "image-text matching loss with hard negatives"),
    LossDef("itg", 1, "loss_itg", "image-grounded text generation loss"),
    LossDef("lm", 2, "loss_lm", "the frozen LLM's language-modelling loss on the caption"),
)
LOSS_BY_NAME = {loss.name: loss for loss in LOSSES}

LossName = Literal[tuple(loss.name for loss in LOSSES)]  # type: ignore[valid-type]
"""The names a stage's ``losses`` may hold."""


def losses_of(objective: Objective) -> tuple[LossDef, ...]:
    """The losses that train ``objective``, in registry order."""
    return tuple(loss for loss in LOSSES if loss.objective == objective)


def logged_fields(objective: Objective) -> tuple[str, ...]:
    """The loss fields a stage of ``objective`` logs: the total first, then each loss."""
    return (TOTAL_LOSS, *(loss.output_field for loss in losses_of(objective)))


def objective_of(weights: dict[str, float]) -> Objective:
    """The one objective that the losses named in ``weights`` train.

    Raises:
        ValueError: no loss named, or losses of both objectives.
    """
    objectives = {LOSS_BY_NAME[name].objective for name in weights}
    if len(objectives) != 1:
        by_objective = {o: [l.name for l in losses_of(o)] for o in (1, 2)}
        raise ValueError(
            "name at least one loss, all of one objective: "
            f"{'/'.join(by_objective[1])} (objective 1) or {'/'.join(by_objective[2])} (objective 2)"
        )
    return objectives.pop()
