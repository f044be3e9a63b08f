"""``qformer submit`` and ``qformer jobs``: job specs as Ray Jobs on a (remote) Ray cluster.

``submit`` validates the spec here, with the loader every command uses, before the cluster is
contacted. It then copies the working dir (by default this repository) without data, runs, VCS
and caches into a staging folder, writes the resolved spec (overrides applied) into it as
``_qformer_submit/<submission id>.yaml``, and submits ``python -m pipeline train|prep <that
relative path>`` with the staging folder as the job's ``runtime_env`` ``working_dir``; Ray
uploads it to the cluster, so a remote cluster needs nothing from this machine's disk.

Submission ids are derived from the run (``qformer-<run.name>``; a prep-only spec is named
after its output folder), so a run is never submitted twice by accident: a job of the same run
that is still pending or running is never duplicated, and a finished one is continued only with
``resume=True``, under a new id ``qformer-<name>-r<N>`` (the run resumes from its own
checkpoints or complete shards because name and storage are unchanged).

Secrets travel only as ``runtime_env`` environment variables; they are never written into the
spec and never printed (only their names are). Ray shows ``runtime_env`` to whoever can reach
the cluster's dashboard, as for any Ray job.

Exit status (see ``pipeline.cli``): 0 success; 1 the job FAILED or was STOPPED, or the
submission was refused (a job of the run is active, or finished and ``--resume`` not given);
2 bad spec or arguments, unreachable or non-Ray address, unknown job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, TextIO

import yaml

from pipeline.spec import JobSpec, SpecError, load_spec
from pipeline.spec.loader import validate_spec

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

EXIT_FAILED = 1
EXIT_USAGE = 2

SPEC_DIR = "_qformer_submit"
"""Folder of the uploaded working dir holding the submitted specs."""
ID_PREFIX = "qformer-"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
"""Read when no address is given; Ray's own ``ray job`` command reads it too. (``RAY_ADDRESS``
is not read: in this project it names the GCS address that ``ray.init`` joins.)"""
CONNECT_TIMEOUT_S = 10.0

# Never uploaded: outputs, data, VCS, caches and virtualenvs. Top-level names only for the
# first group (pipeline/data/ is code); anywhere for the second.
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


class SubmitError(Exception):
    """A one-line, user-facing error; ``exit_code`` is the command's exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class SubmitRequest:
    """What ``qformer submit`` was asked to do."""

    spec_path: str
    """The job spec YAML on this machine."""
    address: str | None = None
    """The Ray dashboard (``http://HEAD:8265``); None reads ``$RAY_API_SERVER_ADDRESS``."""
    overrides: Sequence[str] = ()
    """``a.b=value`` spec overrides, applied before validation."""
    working_dir: str | None = None
    """Folder uploaded as the job's working dir; None: the repository holding ``pipeline/``."""
    wait: bool = True
    """Stream the job's logs and return its result; False: return once submitted."""
    pip: Sequence[str] = ()
    """Extra pip requirements installed into the job's runtime env."""
    env: Sequence[str] = ()
    """``KEY=VALUE`` (or ``KEY``, taken from this environment) for the job's environment."""
    resume: bool = False
    """Continue a finished run under a new submission id."""


@dataclass
class _Printed:
    """How much of a job's log has been written out (survives a dropped log stream)."""

    chars: int = 0


# ---------------------------------------------------------------------------------------------
# qformer submit


def submit(request: SubmitRequest, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate, submit and (unless ``request.wait`` is False) follow a job; returns the exit
    status. Job logs go to ``out``, progress lines to ``err``.

    Raises:
        SpecError: the spec is invalid (nothing was contacted).
        SubmitError: bad arguments, unreachable cluster, unknown job, refused submission.
    """
    out, err = out or sys.stdout, err or sys.stderr
    spec = load_spec(request.spec_path, JobSpec, request.overrides)
    env_vars = parse_env(request.env)
    source = resolve_working_dir(request.working_dir)
    command = "train" if spec.is_training else "prep"
    name = run_name(spec)
    spec_yaml = resolved_spec_yaml(spec)
    for warning in relative_path_warnings(spec):
        print(f"submit: warning: {warning}", file=err)

    client = connect(request.address)
    submission_id = choose_submission_id(client, name, resume=request.resume)
    spec_file = f"{SPEC_DIR}/{submission_id}.yaml"
    entrypoint = f"python -m pipeline {command} {shlex.quote(spec_file)}"
    with tempfile.TemporaryDirectory(prefix="qformer-submit-") as staging:
        size = stage_working_dir(source, Path(staging))
        target = Path(staging, spec_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(spec_yaml)
        runtime_env: dict = {"working_dir": staging, "excludes": list(RUNTIME_ENV_EXCLUDES)}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        if request.pip:
            runtime_env["pip"] = list(request.pip)
        print(f"submit: uploading {source} ({size / 2**20:.1f} MiB without "
              f"{', '.join(sorted(TOP_LEVEL_EXCLUDES))} and caches) as the job's working dir",
              file=err)
        if env_vars:
            print(f"submit: env vars for the job (values not shown): {', '.join(sorted(env_vars))}",
                  file=err)
        with _sdk_errors(client, submission_id):
            client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                metadata={"qformer_run": name, "qformer_command": command,
                          "qformer_spec": spec_file},
            )
    print(f"submit: submitted {submission_id}: {entrypoint}", file=err)
    if not request.wait:
        print(submission_id, file=out)
        return 0
    return follow(client, submission_id, out, err)


def run_name(spec: JobSpec) -> str:
    """``run.name``; for a prep-only spec, ``prep-<last folders of the output>-<hash>``."""
    if spec.is_training:
        return spec.run.name
    output = spec.prep.output.rstrip("/")
    parts = [p for p in re.split(r"[/\\]+", output.split("://", 1)[-1]) if p not in ("", ".", "..")]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts[-2:])).strip("-._")[:60]
    digest = hashlib.sha1(output.encode()).hexdigest()[:6]
    return f"prep-{readable or 'output'}-{digest}"


def resolved_spec_yaml(spec: JobSpec) -> str:
    """The spec as YAML that loads back into exactly ``spec`` (checked)."""
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    if validate_spec(yaml.safe_load(text), JobSpec) != spec:
        raise SubmitError("internal error: the resolved spec does not load back unchanged")
    return "# Resolved by `qformer submit` (overrides applied).\n" + text


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` or ``KEY`` (its value taken from this process's environment).

    Error messages name the key only, never a value.
    """
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SubmitError("--env: expected KEY=VALUE or KEY with KEY an environment "
                              "variable name (letters, digits, _)")
        if not sep:
            if key not in os.environ:
                raise SubmitError(f"--env {key}: not set in this environment; give {key}=VALUE")
            value = os.environ[key]
        env[key] = value
    return env


def resolve_working_dir(working_dir: str | None) -> Path:
    """The folder to upload: ``working_dir``, or the repository (``pipeline/`` + ``jobs/``)
    holding the current directory, or else the one holding this package."""
    if working_dir is not None:
        path = Path(working_dir).expanduser().resolve()
        if not path.is_dir():
            raise SubmitError(f"--working-dir {working_dir}: not a folder")
        return path
    here = Path.cwd().resolve()
    package_repo = Path(__file__).resolve().parent.parent
    for candidate in [here, *here.parents, package_repo]:
        if (candidate / "pipeline" / "__init__.py").is_file() and (candidate / "jobs").is_dir():
            return candidate
    raise SubmitError("no qformer-pipeline repository (a folder holding pipeline/ and jobs/) "
                      "around the current directory; give --working-dir")


def relative_path_warnings(spec: JobSpec) -> list[str]:
    """Spec fields that will not mean on the cluster what they mean here: local relative data,
    storage and model-folder paths (in the job they resolve inside the unpacked working dir, a
    temporary copy without runs/ and data/ whose outputs do not persist), and a fixed
    ``run.ray_address`` (the job's driver should join the cluster it runs on)."""
    paths: list[tuple[str, str]] = []
    for prefix, prep in (("prep", spec.prep), ("data.raw", spec.data.raw if spec.data else None)):
        if prep is not None:
            paths += [(f"{prefix}.inputs.{i}", path) for i, path in enumerate(prep.inputs)]
            paths.append((f"{prefix}.output", prep.output))
    if spec.data is not None and spec.data.prepared is not None:
        paths.append(("data.prepared", spec.data.prepared))
    if spec.run is not None:
        paths.append(("run.storage", spec.run.storage))
    models = [("model.vision.name", spec.model.vision.name),
              ("model.qformer.bert", spec.model.qformer.bert), ("model.llm.name", spec.model.llm.name)]
    # Hub names look like relative paths; only folders that exist here (or ./, ../) are paths.
    paths += [(where, name) for where, name in models
              if name.startswith(("./", "../")) or os.path.isdir(name)]
    warnings = [
        f"{where} {path!r} is relative: on the cluster it resolves inside the job's unpacked "
        "working dir (a temporary copy without runs/ and data/); use an absolute path on "
        "storage every node shares, or s3://"
        for where, path in paths if "://" not in path and not os.path.isabs(path)
    ]
    if spec.run is not None and spec.run.ray_address:
        warnings.append(f"run.ray_address {spec.run.ray_address!r} is set: the job's driver joins "
                        "that address instead of the cluster it runs on")
    return warnings


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


def choose_submission_id(client: "JobSubmissionClient", name: str, *, resume: bool) -> str:
    """``qformer-<name>`` for a new run; ``qformer-<name>-r<N>`` to resume a finished one.

    The jobs of a run are those submitted with its name (metadata ``qformer_run``) and any job
    holding its base id.

    Raises:
        SubmitError: a job of this run is pending or running (never duplicated), or the run
            was submitted before and ``resume`` is False (exit status 1).
    """
    base = ID_PREFIX + name
    pattern = re.compile(re.escape(base) + r"(?:-r(\d+))?")
    with _sdk_errors(client):
        jobs = [job for job in client.list_jobs() if job.submission_id]
    previous = [job for job in jobs if job.submission_id == base
                or (job.metadata or {}).get("qformer_run") == name]
    active = [job for job in previous if str(job.status) not in TERMINAL]
    if active:
        job = active[0]
        raise SubmitError(
            f"{job.submission_id} of this run is {job.status} on the cluster; a run is never "
            f"submitted twice (follow it: qformer jobs logs {job.submission_id} --follow, or "
            f"stop it: qformer jobs stop {job.submission_id})", EXIT_FAILED)
    if not previous:
        return base
    latest = max(previous, key=lambda job: job.start_time or 0)
    rounds = [int(m.group(1) or 0) if (m := pattern.fullmatch(job.submission_id)) else 0
              for job in previous]
    taken, round_ = {job.submission_id for job in jobs}, max(rounds) + 1
    while f"{base}-r{round_}" in taken:  # held by another run whose name ends in -r<N>
        round_ += 1
    new_id = f"{base}-r{round_}"
    if not resume:
        raise SubmitError(
            f"this run was submitted before as {latest.submission_id} ({latest.status}); "
            f"to continue it from its checkpoints submit again with --resume (new id {new_id})",
            EXIT_FAILED)
    return new_id


# ---------------------------------------------------------------------------------------------
# Following a job


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
    with _sdk_errors(client, job_id):
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
        with _sdk_errors(client, job_id):
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
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns its details."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        with _sdk_errors(client, job_id):
            info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"{job_id} is still {info.status} after {timeout_s:.0f} s", EXIT_FAILED)
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# qformer jobs list|status|logs|stop


def list_jobs(address: str | None, out: TextIO | None = None) -> int:
    """Print the cluster's submitted jobs, oldest first."""
    out = out or sys.stdout
    client = connect(address)
    with _sdk_errors(client):
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
    with _sdk_errors(client, job_id):
        info = client.get_job_info(job_id)
    env_names = sorted((info.runtime_env or {}).get("env_vars") or {})
    lines = [
        ("id", info.submission_id or job_id), ("status", str(info.status)),
        ("message", info.message or ""), ("entrypoint", info.entrypoint),
        ("started", _time(info.start_time)), ("ended", _time(info.end_time)),
        ("duration", _duration(info)), ("run", (info.metadata or {}).get("qformer_run", "")),
        ("env vars", ", ".join(env_names)),
    ]
    for key, value in lines:
        if value:
            out.write(f"{key + ':':<12}{value}\n")
    return 0


def job_logs(address: str | None, job_id: str, *, follow_logs: bool = False,
             out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print a job's logs; with ``follow_logs`` stream them and return the job's result."""
    out, err = out or sys.stdout, err or sys.stderr
    client = connect(address)
    if follow_logs:
        with _sdk_errors(client, job_id):
            client.get_job_info(job_id)  # an unknown id fails here, plainly
        return follow(client, job_id, out, err)
    with _sdk_errors(client, job_id):
        out.write(client.get_job_logs(job_id))
    return 0


def stop_job(address: str | None, job_id: str, err: TextIO | None = None) -> int:
    """Ask Ray to stop a job (SIGTERM, then SIGKILL after Ray's grace period)."""
    err = err or sys.stderr
    client = connect(address)
    with _sdk_errors(client, job_id):
        stopped = client.stop_job(job_id)
        status = client.get_job_status(job_id)
    if stopped:
        print(f"stop requested for {job_id} (now {status})", file=err)
    else:
        print(f"{job_id} was not running ({status})", file=err)
    return 0


# ---------------------------------------------------------------------------------------------
# Connection and errors


def dashboard_url(address: str | None) -> str:
    """``http://HOST:PORT`` of the Ray dashboard from ``address`` or ``$RAY_API_SERVER_ADDRESS``."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise SubmitError(f"no cluster address: give --address http://HEAD:8265 (the Ray "
                          f"dashboard) or set {ADDRESS_ENV}")
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address}: expected the Ray dashboard's http(s)://HOST:PORT")
    return address


def connect(address: str | None) -> "JobSubmissionClient":
    """A Job Submission client for the dashboard at ``address``, checked to answer.

    Raises:
        SubmitError: nothing answers there, or it is not a Ray dashboard (exit status 2).
    """
    import requests

    url = dashboard_url(address)
    try:
        reply = requests.get(f"{url}/api/version", timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.Timeout:
        raise SubmitError(f"no answer from the Ray dashboard at {url} within "
                          f"{CONNECT_TIMEOUT_S:.0f} s") from None
    except requests.exceptions.RequestException as error:
        raise SubmitError(f"cannot reach the Ray dashboard at {url}: {_reason(error)}") from None
    try:
        version = reply.json()["ray_version"] if reply.ok else None
    except (ValueError, KeyError, TypeError):
        version = None
    if version is None:
        raise SubmitError(f"{url} is not a Ray dashboard (GET /api/version: HTTP "
                          f"{reply.status_code}); give the dashboard's address, port 8265 by default")
    import logging

    from ray.job_submission import JobSubmissionClient

    # Our own lines say what is uploaded and when the log stream ends; the SDK's INFO lines
    # (and its DEBUG lines, which would show runtime_env values) stay quiet.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The SDK lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override an explicit address; the
    # address given here must win.
    with _without_env("RAY_ADDRESS", ADDRESS_ENV), _sdk_errors(url):
        return JobSubmissionClient(url)


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _sdk_errors(client: "JobSubmissionClient | str", job_id: str | None = None) -> Iterator[None]:
    """Turn the SDK's exceptions (whose text can hold a server traceback) into one line."""
    import requests

    where = client if isinstance(client, str) else client.get_address()
    try:
        yield
    except SubmitError:
        raise
    except (requests.exceptions.RequestException, ConnectionError) as error:
        raise SubmitError(f"lost the Ray dashboard at {where}: {_reason(error)}") from None
    except RuntimeError as error:
        text = str(error)
        if job_id is not None and "status code 404" in text:
            raise SubmitError(f"no job {job_id} on the cluster at {where} "
                              "(qformer jobs list shows them)") from None
        if "already exists" in text:
            raise SubmitError(f"a job {job_id} already exists on the cluster at {where}; "
                              "submit again to get the next id", EXIT_FAILED) from None
        raise SubmitError(f"the cluster at {where} refused the request: {_last_line(text)}",
                          EXIT_FAILED) from None
    except (ValueError, TypeError) as error:  # the SDK checks runtime_env (pip, sizes) locally
        raise SubmitError(f"cannot submit to {where}: {_last_line(str(error))}") from None


def _reason(error: Exception) -> str:
    text = str(error)
    for hint in ("Connection refused", "Name or service not known", "No route to host",
                 "timed out", "Temporary failure in name resolution"):
        if hint in text:
            return hint.lower()
    return _last_line(text)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip(" .")]
    return (lines[-1] if lines else text.strip())[:300]


def _time(millis: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(millis / 1000)) if millis else ""


def _duration(job: "JobDetails") -> str:
    if not job.start_time:
        return ""
    seconds = int(((job.end_time or time.time() * 1000) - job.start_time) / 1000)
    return f"{seconds // 60}m{seconds % 60:02d}s"


__all__ = [
    "SpecError", "SubmitError", "SubmitRequest", "choose_submission_id", "connect", "follow",
    "job_logs", "job_status", "list_jobs", "run_name", "stop_job", "submit",
]
