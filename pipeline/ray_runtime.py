"""Connecting to the Ray cluster in reach."""

from __future__ import annotations

import logging
import os
import sys

_started_here = False


def ensure_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start an embedded local Ray, once per process."""
    global _started_here
    import ray
    from ray.data import DataContext

    # Our own progress display says more than Ray Data's per-operator bars; they stay on only
    # where Ray's output itself reaches a terminal (``-v``), not in a command's log file.
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
    _started_here = True


def stop_ray() -> None:
    """Disconnect from Ray if :func:`ensure_ray` connected (a local Ray it started stops), so
    that no late output of Ray or its workers follows a command's last line."""
    global _started_here
    if _started_here:
        import ray

        ray.shutdown()
        _started_here = False


def cluster_cpus() -> int:
    """CPUs of the whole cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
