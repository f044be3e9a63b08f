"""``qformer submit`` and ``qformer jobs`` against a real Ray head through its dashboard.

One head (``ray start --head``, token authentication off; ``test_submit_auth.py`` has it on)
serves the file: a prep job prepares a small demo corpus, the tiny demo curriculum trains on it,
is refused a silent re-run and resumed under a new id, and a job with a missing input fails with
its reason in the logs. The tests that need the head are marked slow.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.data.demo_corpus import write_demo_corpus
from pipeline.submit import wait_until_finished
from tests.helpers import REPO, demo_prep_spec, free_port

SECRET = "abc123"
TRAIN_OVERRIDES = ("stages.0.steps=2", "stages.1.steps=2", "scaling.workers=1",
                   "model.qformer.max_text_length=16")


def qformer(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def qformer_process(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the ``qformer`` command in a subprocess (a hung job fails the test, never hangs it)."""
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def client(head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address)


def overrides(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def prep_spec(tmp_path_factory) -> Path:
    """A prep-only spec (absolute paths) over 120 demo samples: 32 px, tokens of length 16."""
    root = tmp_path_factory.mktemp("submit")
    write_demo_corpus(str(root / "raw"), samples=120, shard_size=60)
    spec = demo_prep_spec(root)
    path = root / "prep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def prep_job(ray_head, prep_spec) -> subprocess.CompletedProcess:
    """The prep spec submitted with the ``qformer`` command and followed to its end, with a
    secret for the job's environment."""
    return qformer_process("submit", str(prep_spec), "--address", ray_head.address,
                           "--env", f"SECRET_TOKEN={SECRET}", "--env", "HF_HUB_OFFLINE=1")


def test_spec_error_exits_2_before_contacting_the_cluster(capsys):
    with socket.socket() as listener:  # an address that would notice being contacted
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        code, out, err = qformer(capsys, "submit", str(REPO / "jobs/demo_tiny.yaml"),
                                 "--address", address, "--set", "stages.0.steps=-1")
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()
    assert code == 2
    assert "stages.0.steps" in err and "Traceback" not in err


def test_env_errors_never_show_values(prep_spec, capsys, monkeypatch):
    monkeypatch.delenv("QFORMER_UNSET_VAR", raising=False)
    for env, message in ((f"={SECRET}", "--env: expected KEY=VALUE"),
                         (f"BAD-KEY={SECRET}", "--env: expected KEY=VALUE"),
                         ("QFORMER_UNSET_VAR", "--env QFORMER_UNSET_VAR: not set")):
        code, out, err = qformer(capsys, "submit", str(prep_spec), "--env", env,
                                 "--address", "http://127.0.0.1:1")
        assert code == 2 and message in err and SECRET not in out + err


def test_unreachable_address_is_one_line_error(prep_spec):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["submit", str(prep_spec)], ["jobs", "list"]):
        run = qformer_process(*argv, "--address", address, timeout=120)
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if not line.startswith("submit:")]
        assert lines == [f"error: cannot reach the Ray dashboard at {address}: connection refused"]
        assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_prep_job_succeeds_through_submit(ray_head, prep_spec, prep_job, capsys):
    code, out, err = prep_job.returncode, prep_job.stdout, prep_job.stderr
    assert code == 0, err + out
    job_id = re.search(r"submitted (\S+):", err).group(1)
    assert re.fullmatch(r"qformer-prep-submit\d*-prepared-[0-9a-f]{6}", job_id)
    # The job's own output streamed through the CLI, and its output exists.
    assert "prep done: 120 of 120 samples kept in 2 shards" in out
    assert (prep_spec.parent / "prepared" / "manifest.json").is_file()
    assert f"job {job_id} SUCCEEDED" in err

    code, status, _ = qformer(capsys, "jobs", "status", job_id, "--address", ray_head.address)
    assert code == 0 and "status:     SUCCEEDED" in status and "SECRET_TOKEN" in status

    # The value reached the job's environment and nothing the CLI printed or uploaded; it is
    # where the Jobs API shows it to whoever can list jobs, as submit warns.
    assert ("submit: warning: --env HF_HUB_OFFLINE, SECRET_TOKEN: the values are stored in the "
            "job's runtime_env, which the Ray Jobs API and dashboard show to anyone") in err
    info = client(ray_head).get_job_info(job_id)
    assert info.runtime_env["env_vars"]["SECRET_TOKEN"] == SECRET
    assert SECRET not in out + err + status
    uploaded = [d for d in ray_head.working_dirs() if (d / "_qformer_submit" / f"{job_id}.yaml").is_file()]
    assert len(uploaded) == 1
    spec_text = (uploaded[0] / "_qformer_submit" / f"{job_id}.yaml").read_text()
    assert SECRET not in spec_text
    assert yaml.safe_load(spec_text)["prep"]["output"] == str(prep_spec.parent / "prepared")
    # The uploaded working dir is the repo's code without data, runs, VCS or caches.
    assert (uploaded[0] / "pipeline" / "data" / "prep.py").is_file()
    assert (uploaded[0] / "jobs" / "demo_tiny.yaml").is_file()
    for excluded in ("data", "runs", ".git", "pipeline/__pycache__"):
        assert not (uploaded[0] / excluded).exists(), excluded


@pytest.mark.slow
def test_tiny_demo_trains_through_submit_then_resumes_only_when_asked(
        ray_head, prep_spec, prep_job, tmp_path, capsys):
    assert prep_job.returncode == 0
    argv = ["submit", str(REPO / "jobs/demo_tiny.yaml"), "--address", ray_head.address,
            *overrides(*TRAIN_OVERRIDES, f"data.prepared={prep_spec.parent / 'prepared'}",
                       f"run.storage={tmp_path}")]
    run = qformer_process(*argv)
    code, out, err = run.returncode, run.stdout, run.stderr
    assert code == 0, err + out
    assert "stage stage1: 2 steps" in out and "stage stage2: 2 steps" in out
    assert (tmp_path / "demo-tiny" / "stage2" / "complete.json").is_file()
    code, status, _ = qformer(capsys, "jobs", "status", "qformer-demo-tiny", "--address", ray_head.address)
    assert "status:     SUCCEEDED" in status
    assert f"progress:   qformer status {tmp_path}/demo-tiny" in status  # the run's own status command

    # A finished run is not submitted again silently...
    code, out, err = qformer(capsys, *argv)
    assert code == 1
    assert "submitted before as qformer-demo-tiny (SUCCEEDED)" in err and "--resume" in err
    # ...but resumed when asked, under a new id; while that runs, nothing duplicates it.
    code, out, err = qformer(capsys, *argv, "--resume", "--no-wait")
    assert code == 0 and out == "qformer-demo-tiny-r1\n"
    code, _, refused = qformer(capsys, *argv, "--resume")
    info = wait_until_finished(client(ray_head), "qformer-demo-tiny-r1", timeout_s=120)
    assert code == 1 and "qformer-demo-tiny-r1 of this run is" in refused, refused
    assert str(info.status) == "SUCCEEDED"
    logs = client(ray_head).get_job_logs("qformer-demo-tiny-r1")
    assert "stage stage1 finished earlier" in logs and "stage stage2 finished earlier" in logs

    code, listing, _ = qformer(capsys, "jobs", "list", "--address", ray_head.address)
    assert "qformer-demo-tiny " in listing and "qformer-demo-tiny-r1 " in listing
    code, _, err = qformer(capsys, "jobs", "stop", "qformer-demo-tiny-r1", "--address", ray_head.address)
    assert code == 0 and "was not running (SUCCEEDED)" in err


@pytest.mark.slow
def test_failing_job_reports_failed_with_its_reason(ray_head, tmp_path, capsys):
    empty = tmp_path / "no-manifest"
    empty.mkdir()
    run = qformer_process(
        "submit", str(REPO / "jobs/demo_tiny.yaml"), "--address", ray_head.address,
        *overrides(*TRAIN_OVERRIDES, "run.name=broken", f"data.prepared={empty}",
                   f"run.storage={tmp_path}"))
    code, out, err = run.returncode, run.stdout, run.stderr
    assert code == 1, err + out
    assert "not found; run `qformer prep`" in out
    assert "job qformer-broken FAILED" in err
    code, status, _ = qformer(capsys, "jobs", "status", "qformer-broken", "--address", ray_head.address)
    assert "status:     FAILED" in status
    code, logs, _ = qformer(capsys, "jobs", "logs", "qformer-broken", "--address", ray_head.address)
    assert code == 0 and "not found; run `qformer prep`" in logs


@pytest.mark.slow
def test_unknown_job_id_is_one_line_error(ray_head, capsys):
    for action in ("status", "logs", "stop"):
        code, out, err = qformer(capsys, "jobs", action, "no-such-job", "--address", ray_head.address)
        assert code == 2
        assert err.strip().splitlines() == [
            f"error: no job no-such-job on the cluster at {ray_head.address} (qformer jobs list shows them)"]


def test_a_curate_spec_is_named_after_its_output_and_its_relative_paths_are_flagged():
    from pipeline.spec import JobSpec
    from pipeline.spec.loader import validate_spec
    from pipeline.submit.submission import relative_path_warnings, run_name

    spec = validate_spec({"curate": {"input": "data/prepared", "output": "s3://bucket/curated/demo",
                                     "near_duplicates": {"enabled": True}}}, JobSpec)
    assert re.fullmatch(r"curate-curated-demo-[0-9a-f]{6}", run_name(spec))
    assert [w.split(" ", 1)[0] for w in relative_path_warnings(spec)] == ["curate.input"]
