"""``qformer status RUN``: where a training run stands, read from its run folder (local or
``s3://``) alone, so it works from any machine that reaches the storage, while the run trains,
after it finished, or after it died.

What it reads: ``job.json`` (stages, launches), each stage's ``complete.json``,
``metrics.jsonl`` (last step and held-out records), ``attempts.jsonl`` (starts and restarts)
and Ray Train's record of registered checkpoints, ``summary.json``, and the folder's lease
(``_lease.json``, held by a running ``qformer train``). On object storage ``metrics.jsonl`` is
rewritten at checkpoints, so there the step shown is the last checkpoint's.
"""

from __future__ import annotations

import json
import time

from pipeline.checkpoint.format import ATTEMPTS, COMPLETE, JOB, METRICS, REGISTERED, SUMMARY
from pipeline.errors import UsageError
from pipeline.io.lease import read_lease
from pipeline.io.storage import Location, read_bytes, storage_errors

RECENT = 5
"""Step records averaged for throughput and the ETA."""


class NotARunFolder(UsageError):
    """The folder holds no training run."""


def run_status(run: Location) -> dict:
    """The status of the run folder ``run`` as a JSON-ready mapping.

    Raises:
        NotARunFolder: no ``job.json`` or ``summary.json`` there.
        StorageError: the storage cannot be reached.
    """
    with storage_errors(run.url):
        job = _json(run.child(JOB))
        summary = _json(run.child(SUMMARY))
        if job is None and summary is None:
            raise NotARunFolder(f"{run.url}: not a run folder of qformer train (no {JOB} or {SUMMARY})")
        lease = read_lease(run)
        stages = [_stage_status(run, stage) for stage in _stages(job, summary)]
    running = lease is not None and lease.held
    if summary is not None and all(stage["state"] == "done" for stage in stages):
        state = "finished"
    elif running:
        state = "running"
    elif any(stage["step"] for stage in stages):
        state = "stopped"
    else:
        state = "not started"
    for stage in stages:
        if stage["state"] == "started":
            stage["state"] = "running" if running else "stopped"
            if not running:
                stage["eta_s"] = None
    return {
        "run": run.url,
        "state": state,
        "lease": None if lease is None else {
            "held": lease.held, "owner": lease.record.get("owner"), "purpose": lease.record.get("purpose"),
            "heartbeat_age_s": _round(lease.heartbeat_age_s), "stale_reason": lease.stale_reason,
        },
        "launches": len((job or {}).get("launches", [])),
        "stages": stages,
    }


def _stages(job: dict | None, summary: dict | None) -> list[dict]:
    """Name and steps of every stage, from ``job.json`` (else the finished ``summary.json``)."""
    if job is not None:
        return [{"name": stage["name"], "steps": stage["steps"]} for stage in job["spec"]["stages"]]
    return [{"name": stage["stage"], "steps": stage["step"]} for stage in summary["stages"]]


def _stage_status(run: Location, stage: dict) -> dict:
    folder = run.child(stage["name"])
    complete = _json(folder.child(COMPLETE))
    records = _records(folder.child(METRICS))
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_samples" in r]
    last = steps[-1] if steps else None
    recent = steps[-RECENT:]
    step = complete["step"] if complete else (last["step"] if last else 0)
    step_time = sum(r["step_time_s"] for r in recent) / len(recent) if recent else None
    attempts = _records(folder.child(ATTEMPTS))
    launches = list(dict.fromkeys(a.get("launch", "") for a in attempts))
    status = {
        "name": stage["name"],
        "state": "done" if complete else ("started" if attempts or steps else "pending"),
        "step": step,
        "steps": stage["steps"],
        "samples_seen": complete["samples_seen"] if complete else (last["samples_seen"] if last else 0),
        "losses": {k: v for k, v in (last or {}).items() if k.startswith("loss")},
        "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {},
        "samples_per_s": _round(sum(r["samples_per_s"] for r in recent) / len(recent)) if recent else None,
        "eta_s": None if complete or step_time is None else _round((stage["steps"] - step) * step_time),
        "latest_checkpoint": _registered(folder),
        "final_checkpoint": complete["checkpoint"] if complete else None,
        "starts": len(attempts),
        # Starts beyond the first of one command: Ray Train restarted workers after a failure.
        "worker_restarts": len(attempts) - len(launches),
        # Commands after the first that started the stage: resumed runs.
        "resumes": max(0, len(launches) - 1),
        "updated_s_ago": _round(_age(folder.child(METRICS))),
    }
    return status


def _registered(folder: Location) -> str | None:
    """The newest checkpoint Ray Train has registered (all of it in storage)."""
    snapshot = _json(folder.child(REGISTERED))
    latest = (snapshot or {}).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return folder.child(name).url if name else None


def _json(location: Location) -> dict | None:
    try:
        return json.loads(read_bytes(location))
    except FileNotFoundError:
        return None
    except ValueError:  # being rewritten by another writer: shown as absent this time
        return None


def _records(location: Location) -> list[dict]:
    try:
        text = read_bytes(location).decode()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being appended right now
            break
    return records


def _age(location: Location) -> float | None:
    fs, path = location.filesystem()
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    modified = info.get("mtime") or info.get("LastModified")
    if modified is None:
        return None
    stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
    return max(0.0, time.time() - stamp)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def render(status: dict) -> str:
    """The status as lines for a person."""
    from pipeline.console import duration

    lines = [f"run {status['run']}: {status['state']}"]
    lease = status["lease"]
    if lease is None:
        lines.append("lease: none (no run holds the folder)")
    elif lease["held"]:
        age = lease["heartbeat_age_s"]
        lines.append(f"lease: held by {lease['purpose']} of {lease['owner']} "
                     f"(heartbeat {duration(age) if age is not None else '?'} ago)")
    else:
        lines.append(f"lease: left by {lease['purpose']} of {lease['owner']}, not held ({lease['stale_reason']})")
    for stage in status["stages"]:
        head = f"{stage['name']}: {stage['state']}, step {stage['step']}/{stage['steps']}, {stage['samples_seen']} samples"
        if stage["samples_per_s"] is not None:
            head += f", {stage['samples_per_s']} samples/s"
        if stage["eta_s"] is not None:
            head += f", ETA {duration(stage['eta_s'])}"
        if stage["state"] in ("running", "stopped") and stage["updated_s_ago"] is not None:
            head += f", last record {duration(stage['updated_s_ago'])} ago"
        lines.append(head)
        if stage["losses"]:
            lines.append("  losses: " + " ".join(f"{k[5:] or 'total'} {v:.4f}" for k, v in stage["losses"].items()))
        if stage["eval"]:
            lines.append("  held-out: " + " ".join(f"{k[5:]} {v:.4g}" for k, v in stage["eval"].items()))
        checkpoint = stage["final_checkpoint"] or stage["latest_checkpoint"]
        if checkpoint:
            lines.append(f"  {'final' if stage['final_checkpoint'] else 'latest'} checkpoint: {checkpoint}")
        if stage["starts"] > 1:
            lines.append(f"  started {stage['starts']} times: {stage['worker_restarts']} worker restart(s) "
                         f"after failures, {stage['resumes']} resumed run(s)")
    if status["state"] == "stopped":
        lines.append("not running and not finished: run the same qformer train command again to resume")
    return "\n".join(lines)
