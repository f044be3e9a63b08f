"""Every seed of a training run, derived from ``run.seed``.

Each is a pure function of where the run is (stage, step, stream), never of how it got there:
a run resumed at step ``s`` draws exactly what an uninterrupted run draws from step ``s`` on.
"""

from __future__ import annotations

_MODULUS = 2**63 - 1


def _mix(base: int, stage_index: int, index: int, lane: int) -> int:
    return (base * 1_000_003 + stage_index * 10_007 + index * 101 + lane) % _MODULUS


def init_seed(run_seed: int) -> int:
    """Seeds the model's initialisation: the same on every rank, so every rank starts from the
    same weights without a broadcast."""
    return run_seed


def data_seed(run_seed: int, stage_index: int) -> int:
    """Seeds a stage's data order and augmentation: a new order for every stage of the curriculum."""
    return run_seed + stage_index


def stream_seed(run_seed: int, stage_index: int, micro_step: int, stream: int) -> int:
    """Seeds torch's global generator (dropout) for one data stream's micro-step. A function of
    the stream, not of the rank that trains it, so a stream moved to another rank when a run
    resumes on fewer workers draws the same dropout."""
    return _mix(run_seed, stage_index, micro_step, stream)


def itm_seed(run_seed: int, stage_index: int, micro_index: int) -> int:
    """Seeds the ITM hard-negative draws of one micro-step (``micro_index`` counts the stage's
    micro-steps of one rank, placeholders included). The same on every rank: every rank draws
    over the gathered batch and keeps its own rows."""
    return _mix(run_seed, stage_index, micro_index, 0)
