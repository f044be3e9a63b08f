"""Freezing towers, holding them beside the trainable model, and counting what trains.

A frozen tower is in eval mode (no dropout, fixed norm statistics) with ``requires_grad=False``
on every parameter, and stays in eval mode when ``.train()`` is called on a module containing it
(training loops and DeepSpeed call ``model.train()`` on the whole model every step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.spec.model import DType


def torch_dtype(name: DType) -> torch.dtype:
    """The ``torch.dtype`` a spec's dtype name stands for."""
    return getattr(torch, name)


def _train_stays_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    del mode
    return nn.Module.train(module, False)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place: no gradients, eval mode, and eval mode kept on ``.train()``.

    Args:
        module: The tower to freeze.

    Returns:
        The same module, for chaining.
    """
    module.requires_grad_(False)
    # An instance attribute shadows nn.Module.train for this module only; parents call it when
    # they switch modes. A partial of a module-level function keeps the module picklable.
    module.train = functools.partial(_train_stays_eval, module)
    module.eval()
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` was frozen with :func:`freeze` and none of its parameters trains."""
    stays_eval = isinstance(module.__dict__.get("train"), functools.partial)
    return stays_eval and not any(p.requires_grad for p in module.parameters())


class FrozenTowers:
    """The frozen towers of a model, held beside its trainable modules, not inside them.

    The towers are not submodules of the model, so nothing that works on a module's parameters
    sees them: DeepSpeed neither casts them to its training precision nor partitions them under
    ZeRO-3, optimizers and gradient clipping skip them, and state dicts and checkpoints leave them
    out (a tied output embedding included). Each tower stays in the dtype its spec names, on every
    rank whole. :meth:`to` moves them to a device without changing their dtype.

    Args:
        vision: The frozen vision tower.
        language_model: The frozen LLM (objective 2), or None.
    """

    def __init__(self, vision: nn.Module, language_model: nn.Module | None = None):
        self.vision, self.language_model = vision, language_model

    def modules(self) -> list[nn.Module]:
        """The towers held."""
        return [tower for tower in (self.vision, self.language_model) if tower is not None]

    def to(self, device: torch.device | str) -> None:
        """Move every tower to ``device``; dtypes stay as they are."""
        for tower in self.modules():
            tower.to(device)

    def dtypes(self) -> dict[str, str]:
        """The dtype of each tower held, by role (``vision``, ``llm``)."""
        names = {"vision": self.vision, "llm": self.language_model}
        return {role: str(next(tower.parameters()).dtype).removeprefix("torch.")
                for role, tower in names.items() if tower is not None}

    def parameter_count(self) -> int:
        """Parameters of all towers (a tied weight counted once)."""
        return sum(count_parameters(tower).frozen for tower in self.modules())


@dataclass(frozen=True)
class ParameterCounts:
    """Numbers of trainable and frozen parameters (elements, shared tensors counted once)."""

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        """All parameters."""
        return self.trainable + self.frozen

    def __str__(self) -> str:
        return (
            f"{self.trainable / 1e6:.2f}M trainable, {self.frozen / 1e6:.2f}M frozen, "
            f"{self.total / 1e6:.2f}M total"
        )


def count_parameters(module: nn.Module) -> ParameterCounts:
    """Count the trainable and frozen parameters of ``module``."""
    trainable = frozen = 0
    for param in module.parameters():
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return ParameterCounts(trainable=trainable, frozen=frozen)
