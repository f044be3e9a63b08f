"""The working dir ``qformer submit`` uploads: code and job specs, never secrets or data."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.submit.staging import stage_working_dir

SECRETS = [".env", ".env.production", "config/prod.env", ".envrc", "certs/server.pem",
           "certs/server.key", "keys/id_rsa", "keys/id_ed25519.pub", "deploy/site.p12",
           ".netrc", "home/.ray/auth_token", ".ssh/config", ".aws/credentials"]
KEPT = ["pipeline/__init__.py", "jobs/demo.yaml", "README.md", "env.py", "keys/README.md",
        "cluster/kuberay/s3-credentials-secret.example.yaml"]


def _write(root: Path, rel: str, text: str = "x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _staged(dest: Path) -> set[str]:
    return {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}


def test_secrets_are_never_uploaded(tmp_path):
    source, dest = tmp_path / "repo", tmp_path / "staged"
    for rel in SECRETS:
        _write(source, rel, "SECRET=abc123")
    for rel in KEPT:
        _write(source, rel)
    staged = stage_working_dir(source, dest)
    assert _staged(dest) == set(KEPT)
    assert not any("abc123" in p.read_text() for p in dest.rglob("*") if p.is_file())
    # The user is told what stayed behind (folders once, with a slash).
    withheld = set(staged.withheld)
    assert {".ssh/", ".aws/", ".env", "certs/server.key", "keys/id_rsa"} <= withheld
    assert not withheld & set(KEPT)


def test_links_out_of_the_working_dir_are_not_followed(tmp_path):
    source, dest = tmp_path / "repo", tmp_path / "staged"
    outside = tmp_path / "outside"
    _write(outside, "private.txt", "abc123")
    _write(outside, "folder/notes.txt", "abc123")
    _write(source, "pipeline/real.py", "code")
    os.symlink(outside / "private.txt", source / "private.txt")
    os.symlink(outside / "folder", source / "folder")
    os.symlink("../../outside/private.txt", source / "pipeline" / "relative.txt")
    os.symlink("real.py", source / "pipeline" / "alias.py")  # inside: copied as a file
    os.symlink(source / "pipeline", source / "pipeline-link")  # a folder link inside: skipped
    staged = stage_working_dir(source, dest)
    assert _staged(dest) == {"pipeline/real.py", "pipeline/alias.py"}
    assert (dest / "pipeline" / "alias.py").read_text() == "code"
    assert not (dest / "pipeline" / "alias.py").is_symlink()
    assert {"private.txt", "folder/", "pipeline/relative.txt"} <= set(staged.withheld)
    assert staged.bytes == 2 * len("code")
