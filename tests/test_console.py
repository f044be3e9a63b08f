"""The console shows our own lines; everything else goes to the command's log file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

import pipeline.console as console_module
from pipeline.console import Console
from tests.helpers import REPO, demo_prep_spec, sample_members, write_tar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_a_plain_line_now_and_then_and_always_the_last(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: clock[0])
    err = io.StringIO()
    progress = Console(io.StringIO(), err).progress("[stage1] step", 30)
    for step in range(1, 31):
        clock[0] += 1.0  # one step a second: a line every PLAIN_EVERY_S steps
        progress.update(step, f"loss {1 / step:.3f}")
    progress.write("a note")
    progress.close()
    lines = err.getvalue().splitlines()
    assert lines == ["[stage1] step 1/30 | loss 1.000", "[stage1] step 16/30 | loss 0.062 | ETA 14s",
                     "[stage1] step 30/30 | loss 0.033 | ETA 0s", "a note"]


def test_on_a_terminal_progress_updates_one_bar_in_place():
    err = _Terminal()
    owner = Console(io.StringIO(), err)
    progress = owner.progress("prep: shards", 4)
    for done in range(1, 5):
        progress.update(done, f"{done * 10} samples")
    owner.info("a message above the bar")
    progress.close()
    text = err.getvalue()
    assert "\r" in text and "4/4" in text and "40 samples" in text  # redrawn with carriage returns
    assert text.count("\n") <= 3  # one bar, one message: not a line per update
    assert "a message above the bar\n" in text


_COMMAND = textwrap.dedent("""
    import logging, os, subprocess, sys
    from pipeline.console import command_output, console, setup_logging
    from pipeline.io.storage import Location
    setup_logging(verbose=False)
    with command_output(Location.of(sys.argv[1])):
        console().say("our result")
        logging.getLogger("qformer.test").info("our message")
        logging.getLogger("ray.somewhere").warning("a library warning")
        print("a library print")
        os.write(2, b"a C++ log line\\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"])
    console().say("after the command")
""")


def test_a_command_shows_our_lines_and_logs_everything_else(tmp_path):
    log = tmp_path / "out" / "logs" / "x.log"
    result = subprocess.run([sys.executable, "-c", _COMMAND, str(log)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "our result\nafter the command\n"
    assert result.stderr == "our message\n"
    logged = log.read_text()
    for line in ("our message", "a library warning", "a library print", "a C++ log line", "a child process"):
        assert line in logged


def _prep(tmp_path, inputs: list[str]) -> subprocess.CompletedProcess:
    spec = demo_prep_spec(tmp_path)
    spec["prep"]["inputs"] = inputs
    del spec["prep"]["tokenizers"]["llm"]  # (quicker to load)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "pipeline", "prep", str(path)], cwd=REPO,
                          env={**os.environ, "RAY_ADDRESS": "local"}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # a whole qformer prep process: starts Ray
def test_a_failure_is_one_line_naming_the_log_that_holds_the_rest(tmp_path):
    write_tar(tmp_path / "raw" / "00000.tar", sample_members("a", "a red square"))
    (tmp_path / "raw" / "00001.tar").write_text("not a tar")
    result = _prep(tmp_path, [str(tmp_path / "raw" / "*.tar")])
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: prep: 1 of 2 shards failed (00001: ") and "Traceback" not in result.stderr
    log = lines[-1].rsplit("(full log: ", 1)[1].rstrip(")")
    assert log.startswith(str(tmp_path / "prepared" / "logs" / "prep-"))
    text = open(log).read()
    assert "prep: 2 input shards" in text and "Traceback" in text and "PrepFailed" in text
    assert "Token authentication" in text or "ray" in text.lower(), "Ray's own lines are in the log"


@pytest.mark.slow  # a whole qformer prep process: imports Ray Data, loads a tokenizer
def test_a_usage_error_inside_a_command_is_one_line_without_a_log(tmp_path):
    """A prep output folder of another spec is refused after the log started: exit 2, one line
    that says it all; the log keeps the traceback."""
    (tmp_path / "prepared" / "_work").mkdir(parents=True)
    (tmp_path / "prepared" / "_work" / "plan.json").write_text(json.dumps({"fingerprint": "another spec"}))
    result = _prep(tmp_path, [str(REPO / "tests" / "test_console.py")])  # any existing file
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and line.endswith("use another output folder, or delete it to start over")
    [log] = (tmp_path / "prepared" / "logs").glob("prep-*.log")
    assert "Traceback" in log.read_text()


@pytest.mark.parametrize("argv", [["train", "--help"], ["prep", "--help"], ["eval", "--help"]])
def test_commands_that_log_to_a_file_offer_verbose(argv, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "-v, --verbose" in capsys.readouterr().out
