"""Connecting to the Ray cluster in reach."""

from __future__ import annotations

import logging
import os
import sys


def ensure_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start an embedded local Ray, once per process."""
    import ray
    from ray.data import DataContext

    # Our own per-shard progress lines say more than Ray Data's per-operator log lines when
    # the output is not a terminal; on a terminal Ray Data's live bars stay on as well.
    context = DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or None,
        log_to_driver=True,
        logging_level="WARNING",
        configure_logging=True,
    )


def cluster_cpus() -> int:
    """CPUs of the whole cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
