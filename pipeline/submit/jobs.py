"""Following and managing submitted jobs: ``qformer jobs list|status|logs|stop``.

Exit status of the functions here: 0 done; 1 a followed job FAILED or was STOPPED; 130 the
user stopped following (the job keeps running).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from pipeline.errors import EXIT_FAILED
from pipeline.submit.client import SubmitError, connect, sdk_errors

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


@dataclass
class _Printed:
    """How much of a job's log has been written out (survives a dropped log stream)."""

    chars: int = 0


def follow(client: "JobSubmissionClient", job_id: str, out: TextIO, err: TextIO) -> int:
    """Stream ``job_id``'s logs to ``out`` until it ends; 0 if it SUCCEEDED, 1 if it FAILED or
    was STOPPED, 130 on Ctrl-C (the job keeps running)."""
    printed = _Printed()
    try:
        try:
            asyncio.run(_tail(client, job_id, out, printed))
        except KeyboardInterrupt:
            raise
        except Exception:  # the log stream dropped (proxy, network): poll the log instead
            _poll_logs(client, job_id, out, printed)
        info = wait_until_finished(client, job_id)
    except KeyboardInterrupt:
        print(f"stopped following; {job_id} keeps running on the cluster (stop it: qformer jobs "
              f"stop {job_id} --address {client.get_address()})", file=err)
        return 130
    with sdk_errors(client, job_id):
        rest = client.get_job_logs(job_id)[printed.chars:]
    if rest:
        out.write(rest)
        out.flush()
    print(f"job {job_id} {info.status}: {info.message or ''}".rstrip(": "), file=err)
    return 0 if str(info.status) == "SUCCEEDED" else EXIT_FAILED


async def _tail(client: "JobSubmissionClient", job_id: str, out: TextIO, printed: _Printed):
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        printed.chars += len(chunk)


def _poll_logs(client: "JobSubmissionClient", job_id: str, out: TextIO, printed: _Printed):
    while True:
        with sdk_errors(client, job_id):
            status = str(client.get_job_status(job_id))
            logs = client.get_job_logs(job_id)
        if len(logs) > printed.chars:
            out.write(logs[printed.chars:])
            out.flush()
            printed.chars = len(logs)
        if status in TERMINAL:
            return
        time.sleep(1.0)


def wait_until_finished(client: "JobSubmissionClient", job_id: str,
                        timeout_s: float | None = None) -> "JobDetails":
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns its details.

    Raises:
        SubmitError: still running after ``timeout_s`` (exit status 1).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        with sdk_errors(client, job_id):
            info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"{job_id} is still {info.status} after {timeout_s:.0f} s",
                              exit_status=EXIT_FAILED)
        time.sleep(0.5)


def list_jobs(address: str | None, out: TextIO | None = None) -> int:
    """Print the cluster's submitted jobs, oldest first."""
    out = out or sys.stdout
    client = connect(address)
    with sdk_errors(client):
        jobs = [job for job in client.list_jobs() if job.submission_id]
    jobs.sort(key=lambda job: job.start_time or 0)
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")]
    rows += [(job.submission_id, str(job.status), _time(job.start_time), _duration(job),
              job.entrypoint) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4] + "\n")
    return 0


def job_status(address: str | None, job_id: str, out: TextIO | None = None) -> int:
    """Print one job's status and details (environment variable names, never values)."""
    out = out or sys.stdout
    client = connect(address)
    with sdk_errors(client, job_id):
        info = client.get_job_info(job_id)
    env_names = sorted((info.runtime_env or {}).get("env_vars") or {})
    metadata = info.metadata or {}
    lines = [
        ("id", info.submission_id or job_id), ("status", str(info.status)),
        ("message", info.message or ""), ("entrypoint", info.entrypoint),
        ("started", _time(info.start_time)), ("ended", _time(info.end_time)),
        ("duration", _duration(info)), ("run", metadata.get("qformer_run", "")),
        ("progress", _status_command(metadata.get("qformer_run_dir", ""))),
        ("env vars", ", ".join(env_names)),
    ]
    for key, value in lines:
        if value:
            out.write(f"{key + ':':<12}{value}\n")
    return 0


def _status_command(run_dir: str) -> str:
    """The ``qformer status`` command of a training job's run folder."""
    if not run_dir:
        return ""
    where = "" if "://" in run_dir else " (on the cluster's storage: a path relative to the job's working dir)"
    return f"qformer status {run_dir}{where}"


def job_logs(address: str | None, job_id: str, *, follow_logs: bool = False,
             out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print a job's logs; with ``follow_logs`` stream them and return the job's result."""
    out, err = out or sys.stdout, err or sys.stderr
    client = connect(address)
    if follow_logs:
        with sdk_errors(client, job_id):
            client.get_job_info(job_id)  # an unknown id fails here, plainly
        return follow(client, job_id, out, err)
    with sdk_errors(client, job_id):
        out.write(client.get_job_logs(job_id))
    return 0


def stop_job(address: str | None, job_id: str, err: TextIO | None = None) -> int:
    """Ask Ray to stop a job (SIGTERM, then SIGKILL after Ray's grace period)."""
    err = err or sys.stderr
    client = connect(address)
    with sdk_errors(client, job_id):
        stopped = client.stop_job(job_id)
        status = client.get_job_status(job_id)
    if stopped:
        print(f"stop requested for {job_id} (now {status})", file=err)
    else:
        print(f"{job_id} was not running ({status})", file=err)
    return 0


def _time(millis: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(millis / 1000)) if millis else ""


def _duration(job: "JobDetails") -> str:
    if not job.start_time:
        return ""
    seconds = int(((job.end_time or time.time() * 1000) - job.start_time) / 1000)
    return f"{seconds // 60}m{seconds % 60:02d}s"
