"""The job's working dir: which folder is uploaded, and a copy of it without what must stay here.

Ray uploads the staged copy to the cluster as the job's ``runtime_env`` ``working_dir``. Never
in it: outputs, data, VCS, caches and virtualenvs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.submit.client import SubmitError

# Top-level names only for the first group (pipeline/data/ is code); anywhere for the second.
TOP_LEVEL_EXCLUDES = frozenset({"runs", "data", "out", "build", ".git"})
ANYWHERE_EXCLUDES = frozenset({
    "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",
    ".benchmarks", ".venv", "venv", "node_modules", ".git", ".DS_Store",
})
EXCLUDED_SUFFIXES = (".egg-info", ".pyc")
# The same rules in gitignore syntax for runtime_env ``excludes`` (the staging copy already
# applies them; Ray applies them again, and the working dir's .gitignore, when packaging).
RUNTIME_ENV_EXCLUDES = (
    [f"/{name}" for name in sorted(TOP_LEVEL_EXCLUDES)]
    + sorted(ANYWHERE_EXCLUDES) + [f"*{suffix}" for suffix in EXCLUDED_SUFFIXES]
)
MAX_UPLOAD_BYTES = 256 * 2**20
"""Ray refuses working-dir packages of 512 MiB and more; stop well before."""


def resolve_working_dir(working_dir: str | None) -> Path:
    """The folder to upload: ``working_dir``, or the repository (``pipeline/`` + ``jobs/``)
    holding the current directory, or else the one holding this package."""
    if working_dir is not None:
        path = Path(working_dir).expanduser().resolve()
        if not path.is_dir():
            raise SubmitError(f"--working-dir {working_dir}: not a folder")
        return path
    here = Path.cwd().resolve()
    package_repo = Path(__file__).resolve().parents[2]
    for candidate in [here, *here.parents, package_repo]:
        if (candidate / "pipeline" / "__init__.py").is_file() and (candidate / "jobs").is_dir():
            return candidate
    raise SubmitError("no qformer-pipeline repository (a folder holding pipeline/ and jobs/) "
                      "around the current directory; give --working-dir")


def stage_working_dir(source: Path, dest: Path) -> int:
    """Copy ``source`` into ``dest`` without the excluded folders; returns the bytes copied.

    Symlinked folders are skipped (Ray would follow them past these rules).

    Raises:
        SubmitError: the copy would exceed ``MAX_UPLOAD_BYTES``.
    """
    total, sizes = 0, []
    for root, dirs, files in os.walk(source):
        rel = Path(root).relative_to(source)
        dirs[:] = [d for d in dirs if not _excluded(rel / d, is_dir=True)
                   and not os.path.islink(os.path.join(root, d))]
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if _excluded(rel / name, is_dir=False):
                continue
            src = Path(root, name)
            try:
                size = src.stat().st_size
            except OSError:
                continue  # a dangling link
            total += size
            sizes.append((size, rel / name))
            if total > MAX_UPLOAD_BYTES:
                largest = ", ".join(f"{path} ({size / 2**20:.0f} MiB)"
                                    for size, path in sorted(sizes, reverse=True)[:3])
                raise SubmitError(
                    f"the working dir {source} holds more than {MAX_UPLOAD_BYTES // 2**20} MiB "
                    f"besides runs/, data/ and caches (largest: {largest}); keep data on shared "
                    "storage or s3:// and give a smaller --working-dir")
            shutil.copy2(src, dest / rel / name)
    return total


def _excluded(rel: Path, *, is_dir: bool) -> bool:
    name = rel.name
    if len(rel.parts) == 1 and is_dir and name in TOP_LEVEL_EXCLUDES:
        return True
    return name in ANYWHERE_EXCLUDES or name.endswith(EXCLUDED_SUFFIXES)
