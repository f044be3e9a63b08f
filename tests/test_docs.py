"""The README and docs/ cannot rot: every ``qformer`` command in a ``bash`` block is run, here
(the cheap ones: ``--help``, ``validate``), by a test (``NEWCOMER_COMMANDS``, the newcomer test: the README's main job and
``DEMO_FOLLOW_UP_COMMANDS``) or by ``.ci/run``."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.helpers import REPO
from tests.train.helpers import DEMO_FOLLOW_UP_COMMANDS, NEWCOMER_COMMANDS, readme_main_job

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^[ \t]*```bash\n(.*?)^[ \t]*```", re.S | re.M)  # in list items too


def documented_commands(path: Path) -> list[str]:
    """The ``qformer`` commands of the ``bash`` blocks of ``path``: continuation lines joined,
    ``&&``/``;`` chains split, comments and leading ``VAR=value`` assignments dropped."""
    commands = []
    for block in _BLOCK.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line.split(" #")[0]):
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words.pop(0)
                if words and words[0] == "qformer":
                    commands.append(" ".join(words))
    return commands


def _ci_commands() -> set[str]:
    lines = (line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines())
    return {" ".join(shlex.split(line)) for line in lines if line.startswith("qformer ")}


def _cheap(command: str) -> bool:
    words = command.split()
    return "--help" in words or words[1] == "validate"


ALL = [(path.relative_to(REPO).as_posix(), command) for path in DOCS for command in documented_commands(path)]


def test_the_docs_have_commands_and_the_readme_its_main_job():
    assert {"qformer demo-corpus data/demo/raw", "qformer prep jobs/prep_demo.yaml",
            "qformer train jobs/demo.yaml"} <= {command for _, command in ALL}
    assert documented_commands(REPO / "docs" / "train.md"), "docs/train.md shows commands"


@pytest.mark.parametrize("where, command", ALL, ids=[f"{w}: {c}" for w, c in ALL])
def test_every_documented_command_is_run(where, command, monkeypatch, capsys):
    if _cheap(command):
        monkeypatch.chdir(REPO)
        try:
            status = main(shlex.split(command)[1:])
        except SystemExit as exit_:  # --help
            status = exit_.code
        assert status == 0, capsys.readouterr().err
        return
    assert command in _ci_commands() | set(NEWCOMER_COMMANDS) | set(readme_main_job()) | set(DEMO_FOLLOW_UP_COMMANDS), (
        f"{where}: `{command}` is run by no test and not by .ci/run: run it there, or change the docs")


def test_the_extraction_sees_chains_continuations_comments_and_assignments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```bash\nbash .ci/install && qformer prep a.yaml  # why\n"
                    "HF_HUB_OFFLINE=1 qformer train \\\n  b.yaml --set x=1\n```\n"
                    "```text\nqformer not-a-command\n```\n")
    assert documented_commands(page) == ["qformer prep a.yaml", "qformer train b.yaml --set x=1"]
