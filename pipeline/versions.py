"""The library versions a process runs with, as recorded in checkpoints and exports."""

from __future__ import annotations

import importlib
import platform

CORE_LIBRARIES = ("torch", "transformers", "safetensors")
"""Recorded everywhere; what a model's numerics depend on."""


def library_versions(*extra: str) -> dict[str, str]:
    """Python's and the libraries' versions: :data:`CORE_LIBRARIES` and ``extra`` (imported
    here, so name only libraries the caller already depends on, e.g. ``"ray", "deepspeed"``)."""
    versions = {"python": platform.python_version()}
    for name in (*CORE_LIBRARIES, *extra):
        versions[name] = importlib.import_module(name).__version__
    return versions
