"""A real Ray head started with ``ray start --head`` (dashboard and Job Submission API on),
with Ray's token authentication off or on."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from tests.helpers import free_port

START_TIMEOUT_S = 90
PORT_OPTIONS = (
    "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
    "--metrics-export-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)
AUTH_AND_ADDRESS_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE",
                         "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
"""Never passed on from this process to a head or a client process: each test sets its own."""


@dataclass(frozen=True)
class RayHead:
    address: str
    """The dashboard's http://127.0.0.1:PORT (the Job Submission API)."""
    temp_dir: Path
    """The head's private Ray temp dir (sessions, logs, unpacked runtime envs)."""
    token: str | None = None
    """The cluster's Ray token when token authentication is on."""

    def working_dirs(self) -> list[Path]:
        """The job working dirs unpacked on this node."""
        root = self.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
        return sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def ray_head():
    """A head with token authentication off (``RAY_AUTH_MODE=disabled``), 2 CPUs; stopped
    when the module's tests are done, so that it does not idle beside the rest of the suite."""
    with start_ray_head({"RAY_AUTH_MODE": "disabled"}) as head:
        yield head


@pytest.fixture(scope="module")
def ray_head_with_token():
    """A head with token authentication on, as ``ray start --head`` turns it on by itself:
    ``RAY_AUTH_MODE`` unset and a token in ``~/.ray/auth_token``, here that of a temporary HOME
    (the real ``~/.ray`` is never read or written; the head's jobs run with that HOME too)."""
    home = Path(tempfile.mkdtemp(prefix="rayhome", dir="/tmp"))
    token = secrets.token_hex(32)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    try:
        with start_ray_head({"HOME": str(home)}, token=token) as head:
            yield head
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def start_ray_head(env_updates: dict[str, str], token: str | None = None) -> Iterator[RayHead]:
    """``ray start --head --block`` on free ports with its own temp dir and 2 CPUs, in an
    environment without this process's Ray auth settings, plus ``env_updates``.

    ``ray stop`` is not used to end it: it kills every Ray process of the machine, including
    other test sessions' clusters. This head runs in its own session; at the end its whole
    process tree (snapshotted first, since workers are re-parented once the raylet exits) gets
    SIGTERM (``ray start --block`` then stops its node), then SIGKILL if still alive.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead", dir="/tmp"))  # short: socket paths
    gcs, dashboard = free_port(), free_port()
    command = [
        "ray", "start", "--head", "--block", f"--port={gcs}",
        f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
        *(f"{option}={free_port()}" for option in PORT_OPTIONS),
    ]
    env = {k: v for k, v in os.environ.items() if k not in AUTH_AND_ADDRESS_VARS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env_updates)
    # No outside RAY_ADDRESS reaches the head; its own address does reach the processes it
    # starts, because some Ray internals (Ray Train's placement-group cleaner) look a cluster up
    # with ray.init's auto-detection, which picks the newest of all the Ray instances running
    # on this machine, not necessarily this one.
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM: stop now, no node draining
    log_path = temp_dir / "ray_start.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(address, process, log_path, token)
        yield RayHead(address, temp_dir, token)
    finally:
        _stop_tree(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, process: subprocess.Popen, log_path: Path,
                        token: str | None) -> None:
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    deadline = time.monotonic() + START_TIMEOUT_S
    error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            JobSubmissionClient(address, headers=headers).list_jobs()
            return
        except Exception as exc:  # not up yet
            error = exc
            time.sleep(0.5)
    pytest.fail(f"the Ray dashboard at {address} did not answer within {START_TIMEOUT_S} s "
                f"({error}):\n{log_path.read_text()[-3000:]}")


def _stop_tree(process: subprocess.Popen) -> None:
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    root.terminate()  # `ray start --block` stops its node's processes on SIGTERM
    psutil.wait_procs([root], timeout=10)
    alive = [proc for proc in tree if proc.is_running()]
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    process.wait(timeout=10)
