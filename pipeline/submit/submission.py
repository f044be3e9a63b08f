"""``qformer submit``: validate a job spec here, then run it as a Ray Job on the cluster.

Submission ids are derived from the run (``qformer-<run.name>``; a prep-only spec is named
after its output folder), so a run is never submitted twice by accident: a job of the same run
that is still pending or running is never duplicated, and a finished one is continued only with
``resume=True``, under a new id ``qformer-<name>-r<N>`` (the run resumes from its own
checkpoints or complete shards because name and storage are unchanged).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TextIO

import yaml

from pipeline.errors import EXIT_FAILED
from pipeline.spec import JobSpec, load_spec
from pipeline.spec.loader import validate_spec
from pipeline.submit.client import SubmitError, connect, sdk_errors
from pipeline.submit.jobs import TERMINAL, follow
from pipeline.submit.staging import (
    RUNTIME_ENV_EXCLUDES, TOP_LEVEL_EXCLUDES, resolve_working_dir, stage_working_dir,
)

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ENV_EXPOSURE = ("the values are stored in the job's runtime_env, which the Ray Jobs API and "
                "dashboard show to anyone who can reach the cluster; prefer credentials from the "
                "cluster's own identity (instance roles, Kubernetes Secrets)")
"""What ``--env`` exposes (said on the console and in the command's help)."""
SPEC_DIR = "_qformer_submit"
"""Folder of the uploaded working dir holding the submitted specs."""
ID_PREFIX = "qformer-"


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
    command = "train" if spec.is_training else "prep" if spec.prep is not None else "curate"
    name = run_name(spec)
    spec_yaml = resolved_spec_yaml(spec)
    for warning in relative_path_warnings(spec):
        print(f"submit: warning: {warning}", file=err)

    client = connect(request.address)
    submission_id = choose_submission_id(client, name, resume=request.resume)
    spec_file = f"{SPEC_DIR}/{submission_id}.yaml"
    entrypoint = f"python -m pipeline {command} {shlex.quote(spec_file)}"
    with tempfile.TemporaryDirectory(prefix="qformer-submit-") as staging:
        staged = stage_working_dir(source, Path(staging))
        target = Path(staging, spec_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(spec_yaml)
        runtime_env: dict = {"working_dir": staging, "excludes": list(RUNTIME_ENV_EXCLUDES)}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        if request.pip:
            runtime_env["pip"] = list(request.pip)
        print(f"submit: uploading {source} ({staged.bytes / 2**20:.1f} MiB without "
              f"{', '.join(sorted(TOP_LEVEL_EXCLUDES))} and caches) as the job's working dir",
              file=err)
        if staged.withheld:
            print(f"submit: not uploaded (secrets, or links out of the working dir): "
                  f"{', '.join(staged.withheld)}", file=err)
        if env_vars:
            print(f"submit: warning: --env {', '.join(sorted(env_vars))}: {ENV_EXPOSURE}", file=err)
        with sdk_errors(client, submission_id):
            client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                metadata={"qformer_run": name, "qformer_command": command,
                          "qformer_spec": spec_file, "qformer_run_dir": run_folder(spec)},
            )
    print(f"submit: submitted {submission_id}: {entrypoint}", file=err)
    if not request.wait:
        print(submission_id, file=out)
        return 0
    return follow(client, submission_id, out, err)


def run_folder(spec: JobSpec) -> str:
    """The run folder a training job writes, as its spec names it ("" for a prep-only job)."""
    return f"{spec.run.storage.rstrip('/')}/{spec.run.name}" if spec.is_training else ""


def run_name(spec: JobSpec) -> str:
    """``run.name``; for a prep (or curate) spec, ``prep-<last folders of the output>-<hash>``
    (``curate-...``)."""
    if spec.is_training:
        return spec.run.name
    kind = "prep" if spec.prep is not None else "curate"
    output = (spec.prep.output if spec.prep is not None else spec.curate.output or "").rstrip("/")
    parts = [p for p in re.split(r"[/\\]+", output.split("://", 1)[-1]) if p not in ("", ".", "..")]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts[-2:])).strip("-._")[:60]
    digest = hashlib.sha1(output.encode()).hexdigest()[:6]
    return f"{kind}-{readable or 'output'}-{digest}"


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
    if spec.curate is not None:
        paths += [(f"curate.{field}", getattr(spec.curate, field)) for field in ("input", "output")
                  if getattr(spec.curate, field) is not None]
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
    with sdk_errors(client):
        jobs = [job for job in client.list_jobs() if job.submission_id]
    previous = [job for job in jobs if job.submission_id == base
                or (job.metadata or {}).get("qformer_run") == name]
    active = [job for job in previous if str(job.status) not in TERMINAL]
    if active:
        job = active[0]
        raise SubmitError(
            f"{job.submission_id} of this run is {job.status} on the cluster; a run is never "
            f"submitted twice (follow it: qformer jobs logs {job.submission_id} --follow, or "
            f"stop it: qformer jobs stop {job.submission_id})", exit_status=EXIT_FAILED)
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
            exit_status=EXIT_FAILED)
    return new_id
