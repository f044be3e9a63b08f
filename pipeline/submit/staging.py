"""The job's working dir: which folder is uploaded, and a copy of it without what must stay here.

Ray uploads the staged copy to the cluster as the job's ``runtime_env`` ``working_dir``, where
anyone who can submit jobs can read it. Never in it: outputs, data, VCS, caches and
virtualenvs; secrets (``.env`` files, keys and certificates, credential folders); and the
contents of symbolic links that point out of the working dir.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.submit.client import SubmitError

# Top-level names only for the first group (pipeline/data/ is code); anywhere for the second.
TOP_LEVEL_EXCLUDES = frozenset({"runs", "data", "out", "build", ".git"})
ANYWHERE_EXCLUDES = frozenset({
    "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",
    ".benchmarks", ".venv", "venv", "node_modules", ".git", ".DS_Store",
})
EXCLUDED_SUFFIXES = (".egg-info", ".pyc")
# Secrets, anywhere (names matched case-insensitively): environment files, private keys and
# certificates, credential files and the folders that hold them.
SECRET_FILES = (
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
    "*.keystore", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc", ".pgpass",
    ".pypirc", ".git-credentials", "auth_token", "credentials.json",
)
SECRET_FOLDERS = frozenset({".ssh", ".aws", ".gnupg", ".docker", ".kube"})
# The same rules in gitignore syntax for runtime_env ``excludes`` (the staging copy already
# applies them; Ray applies them again, and the working dir's .gitignore, when packaging).
RUNTIME_ENV_EXCLUDES = (
    [f"/{name}" for name in sorted(TOP_LEVEL_EXCLUDES)]
    + sorted(ANYWHERE_EXCLUDES | SECRET_FOLDERS) + [f"*{suffix}" for suffix in EXCLUDED_SUFFIXES]
    + list(SECRET_FILES)
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


@dataclass
class Staged:
    """What :func:`stage_working_dir` copied."""

    bytes: int = 0
    """The size of the copy."""
    withheld: list[str] = field(default_factory=list)
    """Paths (relative) left out as secrets or as links out of the working dir."""


def stage_working_dir(source: Path, dest: Path) -> Staged:
    """Copy ``source`` into ``dest`` without the excluded folders, secrets, and links that
    point out of ``source``.

    Symlinked folders are skipped (Ray would follow them past these rules); a symlinked file
    inside ``source`` is copied as a file.

    Raises:
        SubmitError: the copy would exceed ``MAX_UPLOAD_BYTES``.
    """
    source = source.resolve()
    staged, sizes = Staged(), []
    for root, dirs, files in os.walk(source):
        rel = Path(root).relative_to(source)
        kept = []
        for name in dirs:
            if _excluded(rel / name, is_dir=True):
                continue
            if name.lower() in SECRET_FOLDERS or not _inside(Path(root, name), source):
                staged.withheld.append(str(rel / name) + "/")
            elif not os.path.islink(os.path.join(root, name)):
                kept.append(name)
        dirs[:] = kept
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if _excluded(rel / name, is_dir=False):
                continue
            src = Path(root, name)
            if _secret(name) or not _inside(src, source):
                staged.withheld.append(str(rel / name))
                continue
            try:
                size = src.stat().st_size
            except OSError:
                continue  # a dangling link
            staged.bytes += size
            sizes.append((size, rel / name))
            if staged.bytes > MAX_UPLOAD_BYTES:
                largest = ", ".join(f"{path} ({size / 2**20:.0f} MiB)"
                                    for size, path in sorted(sizes, reverse=True)[:3])
                raise SubmitError(
                    f"the working dir {source} holds more than {MAX_UPLOAD_BYTES // 2**20} MiB "
                    f"besides runs/, data/ and caches (largest: {largest}); keep data on shared "
                    "storage or s3:// and give a smaller --working-dir")
            shutil.copy2(src, dest / rel / name)
    return staged


def _excluded(rel: Path, *, is_dir: bool) -> bool:
    name = rel.name
    if len(rel.parts) == 1 and is_dir and name in TOP_LEVEL_EXCLUDES:
        return True
    return name in ANYWHERE_EXCLUDES or name.endswith(EXCLUDED_SUFFIXES)


def _secret(name: str) -> bool:
    return any(fnmatch.fnmatch(name.lower(), pattern) for pattern in SECRET_FILES)


def _inside(path: Path, source: Path) -> bool:
    """Whether ``path``, links followed, is ``source`` or below it."""
    return path.resolve().is_relative_to(source)
