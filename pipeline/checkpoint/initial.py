"""Starting a stage's model from a source's weights (``init_from``), strictly, and saying what loaded.

Every trainable tensor of the model either loads from the source (same name under our naming,
same shape) or starts from the model's initialisation (``model.qformer.init``); every tensor of
the source either loads or is left out. Starting from the initialisation, or leaving out, is
fine without being asked for only where the source legitimately differs (:mod:`pipeline.model.parts`):
the parts only the source's objective builds, the parts only the model's objective builds, and
an LLM projection for an LLM of another width. Anything else must be listed in the stage's
``init_from_allow_missing`` / ``init_from_allow_unexpected``, or it is an :class:`InitError`
naming the tensors. The frozen towers never load from a source: they come from the model spec.

The driver runs :func:`check_initial_weights` before any Ray work; each worker then
:func:`load_initial_weights`; rank 0 puts the counts on the console and every tensor in the log.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipeline.checkpoint.sources import InitError, InitSource, read_source_weights
from pipeline.model.blip2 import Blip2Pretrainer
from pipeline.model.parts import LLM_PROJECTION, is_frozen_tower, objective_of_weights, objective_only

_NAMED = 4
"""Tensors named in an error, per kind of problem."""


@dataclass(frozen=True)
class InitReport:
    """What a model took from a source.

    Attributes:
        source: The source, described.
        loaded: Shape of every tensor loaded, by name.
        fresh: The model's tensors that start from its initialisation, each with the reason.
        left_out: The source's tensors the model has no place for, each with the reason.
        frozen: Number of the source's frozen-tower tensors (never loaded).
    """

    source: str
    loaded: dict[str, tuple[int, ...]]
    fresh: dict[str, str]
    left_out: dict[str, str]
    frozen: int

    def summary(self) -> str:
        """One line: the counts."""
        if not self.loaded:
            return (f"init_from {self.source}: nothing in it fits this model (allowed by the spec): "
                    f"the stage starts from model.qformer.init")
        return (f"init_from {self.source}: {len(self.loaded)} tensors loaded, {len(self.fresh)} start "
                f"from model.qformer.init, {len(self.left_out)} of the source left out, {self.frozen} "
                "frozen-tower tensors not loaded (the towers come from the model section)")

    def tensor_lines(self) -> list[str]:
        """One line per tensor loaded, starting fresh or left out."""
        return [
            *(f"  loaded {name} {tuple(shape)}" for name, shape in self.loaded.items()),
            *(f"  starts from init: {name} ({why})" for name, why in self.fresh.items()),
            *(f"  left out: {name} ({why})" for name, why in self.left_out.items()),
        ]


def match_initial_weights(
    model: Blip2Pretrainer,
    weights: Mapping[str, torch.Tensor],
    *,
    source: str,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> InitReport:
    """Decide which of ``weights`` (under our names) load into ``model``'s trainable tensors.

    Args:
        model: The stage's model.
        weights: The source's tensors under our names.
        source: The source, described (for the report and errors).
        allow_missing: Glob patterns of the model's tensors that may start from its init.
        allow_unexpected: Glob patterns of the source's tensors that may be left out.

    Returns:
        The report; nothing is copied.

    Raises:
        InitError: Tensors differ beyond what the objectives explain and the patterns allow.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    given = {name: t for name, t in weights.items() if not is_frozen_tower(name)}
    source_objective = objective_of_weights(given)
    # The parts only one of the two objectives builds differ legitimately, and only then.
    other = source_objective if source_objective not in (None, model.objective) else None
    loaded, fresh, left_out = {}, {}, {}
    missing, reshaped, unexpected = [], [], []
    for name, param in params.items():
        tensor = given.get(name)
        if tensor is not None and tensor.shape == param.shape:
            loaded[name] = tuple(param.shape)
        elif tensor is None and other is not None and objective_only(name, model.objective):
            fresh[name] = f"objective {other}, which the source was built for, has no such part"
        elif tensor is not None and _other_llm_width(name, tensor, param):
            fresh[name] = f"the source's LLM takes width {tensor.shape[0]}, this one {param.shape[0]}"
        elif _matches(name, allow_missing):
            fresh[name] = ("allowed; not in the source" if tensor is None else
                           f"allowed; shape {tuple(tensor.shape)} in the source")
        elif tensor is None:
            missing.append(name)
        else:
            reshaped.append(f"{name} {tuple(tensor.shape)} in the source, {tuple(param.shape)} here")
    for name in sorted(given.keys() - params.keys()):
        if other is not None and objective_only(name, other):
            left_out[name] = f"objective {model.objective} has no such part"
        elif _matches(name, allow_unexpected):
            left_out[name] = "allowed"
        else:
            unexpected.append(name)
    if missing or reshaped or unexpected:
        raise InitError(_mismatch(source, sorted(missing), sorted(reshaped), unexpected))
    return InitReport(source, loaded, fresh, left_out, frozen=len(weights) - len(given))


def check_initial_weights(model: Blip2Pretrainer, source: InitSource) -> InitReport:
    """Read ``source`` and match it against ``model`` (see :func:`match_initial_weights`)."""
    return _read_and_match(model, source)[0]


def load_initial_weights(model: Blip2Pretrainer, source: InitSource) -> InitReport:
    """Load ``source``'s weights into ``model``'s trainable tensors, strictly (see the module).

    Args:
        model: The stage's freshly built model (before DeepSpeed wraps it).
        source: What the stage starts from.

    Returns:
        What loaded and what did not.

    Raises:
        InitError: The source cannot be read, or does not fit the model.
    """
    report, weights = _read_and_match(model, source)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in report.loaded:
            params[name].copy_(weights[name])
    return report


def _read_and_match(model: Blip2Pretrainer, source: InitSource) -> tuple[InitReport, dict[str, torch.Tensor]]:
    weights = read_source_weights(source)
    report = match_initial_weights(model, weights, source=source.describe(),
                                   allow_missing=source.allow_missing,
                                   allow_unexpected=source.allow_unexpected)
    return report, weights


def _other_llm_width(name: str, tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """An LLM projection that differs only in its output width, the LLM's."""
    return (name.startswith(LLM_PROJECTION) and tensor.shape[0] != param.shape[0]
            and tensor.shape[1:] == param.shape[1:])


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _mismatch(source: str, missing: list[str], reshaped: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's trainable tensors are not in it ({_head(missing)})")
    if reshaped:
        parts.append(f"{len(reshaped)} have another shape there ({_head(reshaped)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its tensors have no place in the model ({_head(unexpected)})")
    return (f"{source} does not fit this stage's model: {'; '.join(parts)}. If that is intended, list "
            "them (glob patterns) in the stage's init_from_allow_missing / init_from_allow_unexpected")


def _head(names: list[str]) -> str:
    more = f", ... {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return ", ".join(names[:_NAMED]) + more
