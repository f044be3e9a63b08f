"""``qformer submit`` and ``qformer jobs`` against a Ray head with token authentication on.

The head is ``ray start --head`` with a token in its ``~/.ray/auth_token`` and ``RAY_AUTH_MODE``
unset, the way Ray 2.60 turns authentication on by itself once ``ray.init()`` has written a
token. Every ``qformer`` runs as its own process with an empty temporary HOME (so the real
``~/.ray/auth_token`` of this machine is never found) and gets the token, or not, the ways
Ray's clients do: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from pipeline.data.demo_corpus import write_demo_corpus
from tests.cluster.conftest import AUTH_AND_ADDRESS_VARS
from tests.helpers import REPO, demo_prep_spec

pytestmark = pytest.mark.slow


def qformer(home: Path, *argv: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """The ``qformer`` command with HOME ``home``, no Ray auth settings but ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in AUTH_AND_ADDRESS_VARS}
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**clean, "HOME": str(home), **env})


@pytest.fixture
def home(tmp_path) -> Path:
    """An empty HOME: no ~/.ray/auth_token."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def prep_spec(tmp_path_factory) -> Path:
    """A prep-only spec over 20 demo samples in one shard, MiniLM tokens only."""
    root = tmp_path_factory.mktemp("auth")
    write_demo_corpus(str(root / "raw"), samples=20, shard_size=20)
    spec = demo_prep_spec(root)
    del spec["prep"]["tokenizers"]["llm"]
    path = root / "prep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_head_refuses_requests_without_its_token(ray_head_with_token):
    """What the rest of this file relies on: authentication is really on."""
    url = f"{ray_head_with_token.address}/api/version"
    assert requests.get(url, timeout=10).status_code == 401
    bearer = {"Authorization": f"Bearer {ray_head_with_token.token}"}
    assert requests.get(url, headers=bearer, timeout=10).json()["ray_version"]


def test_no_token_is_one_line_error(ray_head_with_token, home, prep_spec):
    for argv in (["jobs", "list"], ["submit", str(prep_spec)]):
        run = qformer(home, *argv, "--address", ray_head_with_token.address)
        assert run.returncode == 2, run.stderr
        assert [line for line in run.stderr.splitlines() if not line.startswith("submit:")] == [
            f"error: the Ray dashboard at {ray_head_with_token.address} has token authentication "
            "and no Ray token was found here: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH naming a "
            "file that holds it, or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"]


def test_a_wrong_or_unreadable_token_is_one_line_error(ray_head_with_token, home):
    address = ray_head_with_token.address
    run = qformer(home, "jobs", "list", "--address", address, RAY_AUTH_TOKEN="0" * 64)
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: the Ray dashboard at {address} refused the Ray token "
                                 "found here (HTTP 403): it is not this cluster's token")
    missing = home / "no-such-token"
    run = qformer(home, "jobs", "list", "--address", address, RAY_AUTH_TOKEN_PATH=str(missing))
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"error: cannot read the Ray token: RAY_AUTH_TOKEN_PATH is set but file cannot be opened "
        f"or is empty: {missing}"]


def test_submit_list_logs_and_stop_with_the_token(ray_head_with_token, home, prep_spec, tmp_path):
    """The token from each place Ray's clients look: a file named by RAY_AUTH_TOKEN_PATH,
    RAY_AUTH_TOKEN, ~/.ray/auth_token; none of them is printed."""
    head, token = ray_head_with_token, ray_head_with_token.token
    token_file = tmp_path / "cluster.token"
    token_file.write_text(token + "\n")
    run = qformer(home, "submit", str(prep_spec), "--address", head.address,
                  RAY_AUTH_TOKEN_PATH=str(token_file))
    assert run.returncode == 0, run.stderr + run.stdout
    assert "prep done: 20 of 20 samples kept in 1 shards" in run.stdout
    job_id = run.stderr.split("submitted ", 1)[1].split(":", 1)[0]
    outputs = [run.stdout + run.stderr]

    run = qformer(home, "jobs", "list", "--address", head.address, RAY_AUTH_TOKEN=token)
    assert run.returncode == 0 and f"{job_id} " in run.stdout and "SUCCEEDED" in run.stdout
    outputs.append(run.stdout + run.stderr)

    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    run = qformer(home, "jobs", "logs", job_id, "--address", head.address)
    assert run.returncode == 0 and "prep done: 20 of 20 samples" in run.stdout
    outputs.append(run.stdout + run.stderr)

    # A running job (submitted with Ray's own client, so that it is still running) is stopped.
    from ray.job_submission import JobSubmissionClient

    sleeper = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {token}"}
                                  ).submit_job(entrypoint="sleep 300")
    run = qformer(home, "jobs", "stop", sleeper, "--address", head.address)
    assert run.returncode == 0 and f"stop requested for {sleeper}" in run.stderr, run.stderr
    outputs.append(run.stdout + run.stderr)
    run = qformer(home, "jobs", "logs", sleeper, "--follow", "--address", head.address)
    assert run.returncode == 1 and f"job {sleeper} STOPPED" in run.stderr, run.stderr
    outputs.append(run.stdout + run.stderr)
    assert not any(token in output for output in outputs)
