"""The command line's one error path: every error a user can act on is one line and its status."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from tests.helpers import free_port


@pytest.mark.parametrize("argv, status, message", [
    (["validate", "{tmp}/missing.yaml"], 2, "error: {tmp}/missing.yaml: cannot read: No such file"),
    (["eval", "{tmp}/none", "--data", "{tmp}/none"], 2, "error: {tmp}/none: no such folder"),
    (["export", "{tmp}/none", "{tmp}/out"], 2, "error: {tmp}/none: no such folder"),
    (["jobs", "list", "--address", "http://127.0.0.1:{port}"], 2,
     "error: cannot reach the Ray dashboard at http://127.0.0.1:{port}: connection refused"),
], ids=["spec", "eval", "export", "jobs"])
def test_errors_are_one_line_with_the_commands_exit_status(argv, status, message, tmp_path, capsys):
    """SpecError, EvalError, ExportError and SubmitError all reach the user the same way."""
    port = free_port()  # nothing listens there
    argv = [arg.format(tmp=tmp_path, port=port) for arg in argv]
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path, port=port)), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
