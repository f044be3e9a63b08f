"""``qformer export`` on the command line: what it accepts, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.cli import main
from pipeline.errors import EXIT_USAGE

from tests.export.helpers import model_section, train_and_checkpoint


@pytest.fixture(scope="module")
def run(towers, tmp_path_factory):
    """A run folder holding a finished stage 1 on a Dinov2 tower (exported in our own format)."""
    trained = train_and_checkpoint(tmp_path_factory.mktemp("runs") / "cli", model_section(
        towers.dinov2_vision, towers.bert, towers.llm), objective=1, steps=1)
    return trained.run_dir


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("Blip2ForImageTextRetrieval", "Blip2ForConditionalGeneration", "load_exported",
                   "--format", "--stage", "s3://"):
        assert phrase in text


def test_checkpoint_stage_and_run_folders_all_export(run, tmp_path, capsys):
    checkpoint = run / "stage1" / "step-00000001"
    for n, args in enumerate(([str(checkpoint)], [str(run / "stage1")], [str(run), "--stage", "stage1"])):
        out = tmp_path / f"out{n}"
        assert main(["export", *args, str(out)]) == 0
        assert "exported in our own format" in capsys.readouterr().out
        assert json.loads((out / "qformer_export.json").read_text())["checkpoint"] == str(checkpoint)


def test_bad_requests_are_one_line_errors(run, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing"), out], "no such folder"),
        ([str(run), out], "--stage (stage1)"),
        ([str(run), out, "--stage", "stage2"], "stage 'stage2' has not finished"),
        ([str(run / "stage1"), out, "--format", "transformers"], "Dinov2Model"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == EXIT_USAGE
        assert message in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_invalid_checkpoints_are_one_line_errors(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run / "stage1" / "step-00000001", broken)
    (broken / "trainable.safetensors").write_bytes(b"not safetensors")
    assert main(["export", str(broken), str(tmp_path / "a")]) == EXIT_USAGE
    assert "unreadable" in _error(capsys)

    (broken / "metadata.json").write_text(json.dumps({"stage": "stage1", "step": 1}))
    assert main(["export", str(broken), str(tmp_path / "b")]) == EXIT_USAGE
    assert "not the metadata of a training checkpoint" in _error(capsys)


def test_out_dir_is_replaced_only_when_asked_and_only_if_an_export(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(run / "stage1"), str(out)]) == 0
    assert main(["export", str(run / "stage1"), str(out)]) == EXIT_USAGE
    assert "exists and is not empty" in _error(capsys)
    assert main(["export", str(run / "stage1"), str(out), "--overwrite"]) == 0

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", str(run / "stage1"), str(other), "--overwrite"]) == EXIT_USAGE
    assert "not an earlier export" in _error(capsys)
    assert (other / "notes.txt").read_text() == "keep me"


def test_exports_from_s3(run, tmp_path, s3_endpoint, capsys):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.put(str(run / "stage1" / "step-00000001"), "test-bucket/export/stage1/step-00000001", recursive=True)
    url = "s3://test-bucket/export/stage1/step-00000001"
    (tmp_path / "complete.json").write_text(json.dumps({"checkpoint": url}))
    fs.put(str(tmp_path / "complete.json"), "test-bucket/export/stage1/complete.json")

    out = tmp_path / "out"
    assert main(["export", "s3://test-bucket/export", str(out), "--stage", "stage1",
                 "--endpoint-url", s3_endpoint]) == 0
    record = json.loads((out / "qformer_export.json").read_text())
    assert record["checkpoint"] == url
    assert (out / "trainable.safetensors").read_bytes() == (
        run / "stage1" / "step-00000001" / "trainable.safetensors").read_bytes()
