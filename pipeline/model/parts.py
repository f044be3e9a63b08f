"""Which trainable parts each objective builds: the one definition of what legitimately differs
between a source's weights and a model that starts from them.

:class:`pipeline.model.blip2.Blip2Pretrainer` builds the Q-Former's query side (``query_tokens``,
the Q-Former's attention and query feed-forward layers, ``ln_vision``) for both objectives. Only
objective 1 builds the caption side: the caption embeddings, each layer's text feed-forward
branch, the ITC projections and temperature, the ITM head and the ITG head. Only objective 2
builds ``language_projection``, whose output width is the LLM's. So a stage-1 result loaded into
stage 2 lacks ``language_projection`` and brings a caption side stage 2 has no place for, and a
stage-2 result (``Blip2ForConditionalGeneration``, LAVIS's ``blip2_opt``) loaded into stage 1
lacks the caption side: these, and nothing else, differ without being asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pipeline.spec.losses import Objective

_OBJECTIVE_ONLY = {
    1: re.compile(
        r"(embeddings|vision_projection|text_projection|itm_head|lm_head)\."
        r"|temp$"
        r"|qformer\.encoder\.layer\.\d+\.(intermediate|output)\."  # the text feed-forward branch
    ),
    2: re.compile(r"language_projection\."),
}

LLM_PROJECTION = "language_projection."
"""The stage-2 projection into the LLM's input width: a source's fits only an LLM as wide."""

FROZEN_TOWERS = ("vision_model.", "language_model.")
"""Name prefixes of the frozen towers; they come from the model spec, never from trained weights."""


def objective_only(name: str, objective: Objective) -> bool:
    """Whether parameter ``name`` belongs to a part that only ``objective`` builds."""
    return _OBJECTIVE_ONLY[objective].match(name) is not None


def is_frozen_tower(name: str) -> bool:
    """Whether ``name`` is a weight of the frozen vision tower or LLM."""
    return name.startswith(FROZEN_TOWERS)


def objective_of_weights(names: Iterable[str]) -> Objective | None:
    """The objective a set of trained weights was built for, judged by the parts only one
    objective builds; None when they hold neither kind, or both."""
    names = list(names)
    found = [objective for objective in (1, 2) if any(objective_only(name, objective) for name in names)]
    return found[0] if len(found) == 1 else None
