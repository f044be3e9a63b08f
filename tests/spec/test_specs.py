"""Job specs: typed validation with field paths, overrides, and every shipped YAML."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.spec import JobSpec, SpecError, load_spec
from tests.helpers import REPO

JOB_FILES = sorted((REPO / "jobs").glob("*.yaml"))

MINIMAL = {
    "prep": {
        "inputs": ["shards/{00000..00009}.tar"],
        "output": "out",
        "tokenizers": {"qformer": {"name": "bert-base-uncased"}},
    }
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _with(path: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


@pytest.mark.parametrize("job", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_every_shipped_job_spec_validates(job):
    """``load_spec`` raises on any invalid field; a valid spec also survives the JSON round trip
    that takes it to Ray Train workers and into checkpoints unchanged."""
    spec = load_spec(job, JobSpec)
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_shipped_job_specs_comment_every_key():
    """Every key has a comment on its line or on the line above (section headings excepted)."""
    for job in JOB_FILES:
        previous = ""
        for number, line in enumerate(job.read_text().splitlines(), 1):
            stripped = line.strip()
            is_key = stripped and not stripped.startswith(("#", "- ")) and not stripped.endswith(":")
            if is_key:
                commented = "#" in line or previous.startswith("#")
                assert commented, f"{job.name}:{number}: key without a comment: {stripped}"
            if stripped:
                previous = stripped


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prep.filters.min_side", -3, "prep.filters.min_side: Input should be greater than or equal to 1"),
        ("prep.filters.colour", 3, "prep.filters.colour: unknown field"),
        ("prep.image.size", "large", "prep.image.size: Input should be a valid integer"),
        ("prep.filters.dedup", "fuzzy", "prep.filters.dedup: Input should be 'none', 'image' or 'image_caption'"),
        ("prep.filters.blocklist", ["(unclosed"], "prep.filters.blocklist"),
        ("prep.tokenizers.qformer.max_length", 0, "prep.tokenizers.qformer.max_length"),
        ("prep.inputs", [], "prep.inputs: List should have at least 1 item"),
    ],
)
def test_bad_fields_are_named(tmp_path, field, value, message):
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, _with(field, value)), JobSpec)
    assert message in str(err.value)


def test_missing_required_field_is_named(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    del data["prep"]["tokenizers"]
    with pytest.raises(SpecError, match=r"prep\.tokenizers: required field is missing"):
        load_spec(_write(tmp_path, data), JobSpec)


def test_impossible_ranges_are_rejected(tmp_path):
    data = _with("prep.filters.min_caption_words", 10)
    data["prep"]["filters"]["max_caption_words"] = 3
    with pytest.raises(SpecError, match="min_caption_words must be <= max_caption_words"):
        load_spec(_write(tmp_path, data), JobSpec)


def test_empty_spec_and_non_mapping_are_rejected(tmp_path):
    with pytest.raises(SpecError, match="needs a prep section, a curate section or a training job"):
        load_spec(_write(tmp_path, {}), JobSpec)
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(path, JobSpec)


def test_overrides_set_nested_fields_and_are_validated(tmp_path):
    path = _write(tmp_path, MINIMAL)
    spec = load_spec(path, JobSpec, ["prep.filters.min_side=64", "prep.image.size=96",
                                      "prep.filters.blocklist=[spam, '(?i)ads']"])
    assert spec.prep.filters.min_side == 64 and spec.prep.image.size == 96
    assert spec.prep.filters.blocklist == ["spam", "(?i)ads"]
    with pytest.raises(SpecError, match="prep.filters.min_side"):
        load_spec(path, JobSpec, ["prep.filters.min_side=0"])
    with pytest.raises(SpecError, match="expected FIELD.PATH=VALUE"):
        load_spec(path, JobSpec, ["prep.filters.min_side"])


def test_specs_are_immutable():
    spec = JobSpec.model_validate(MINIMAL)
    with pytest.raises(Exception):
        spec.prep.image.size = 10


def test_validate_command_exit_codes(tmp_path, capsys):
    assert main(["validate", str(_write(tmp_path, MINIMAL))]) == 0
    assert main(["validate", str(_write(tmp_path, _with("prep.filters.min_side", -1)))]) == 2
    assert "prep.filters.min_side" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2


def test_prep_with_bad_spec_exits_2_before_any_ray_work(tmp_path):
    bad = _write(tmp_path, _with("prep.image.jpeg_quality", 101))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "prep", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "prep.image.jpeg_quality: Input should be less than or equal to 100" in result.stderr
    assert "Traceback" not in result.stderr and "ray" not in result.stderr.lower()
    assert time.monotonic() - started < 30


def test_prep_with_missing_inputs_exits_2(tmp_path):
    spec = _write(tmp_path, _with("prep.inputs", [str(tmp_path / "nothing-{0..3}.tar")]))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "prep", str(spec)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "matches no file" in result.stderr and "Traceback" not in result.stderr


def test_a_spec_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(MINIMAL).encode().replace(b"out", "caf\u00e9".encode("latin-1")))
    with pytest.raises(SpecError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_spec(path, JobSpec)
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr


def test_invalid_yaml_is_one_line_with_its_position(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("prep:\n  inputs: [a.tar\n")
    with pytest.raises(SpecError) as err:
        load_spec(path, JobSpec)
    assert "broken.yaml: not valid YAML (line 3, column 1): expected ','" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, where", [
    ("prep:\n  output: a\n  output: b\n", "prep.output: duplicate key (lines 2 and 3)"),
    ("prep:\n  filters: {min_side: 3, min_side: 5}\n", "prep.filters.min_side: duplicate key (lines 2 and 2)"),
    ("stages:\n  - name: a\n    steps: 1\n    steps: 2\n", "stages.0.steps: duplicate key (lines 3 and 4)"),
    ("prep: {}\nprep: {}\n", "prep: duplicate key (lines 1 and 2)"),
], ids=["nested", "flow", "in-list", "top"])
def test_duplicate_keys_are_refused_with_the_field_path(tmp_path, text, where):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=re.escape(f"dup.yaml: {where}")):
        load_spec(path, JobSpec)


def test_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("prep:\n  inputs: [a.tar]\n  output: out\n"
                    "  tokenizers:\n    qformer: &tok {name: bert-base-uncased, max_length: 16}\n"
                    "    llm:\n      <<: *tok\n      max_length: 24\n")
    spec = load_spec(path, JobSpec)
    assert spec.prep.tokenizers.llm.name == "bert-base-uncased"
    assert spec.prep.tokenizers.llm.max_length == 24


def test_a_single_value_for_a_list_field_is_a_list_of_one(tmp_path):
    path = _write(tmp_path, MINIMAL)
    spec = load_spec(path, JobSpec, ["prep.inputs=/data/*.tar", "prep.filters.blocklist=spam",
                                      "prep.image.size=96"])
    assert spec.prep.inputs == ["/data/*.tar"]
    assert spec.prep.filters.blocklist == ["spam"]
    assert spec.prep.image.size == 96  # not a list field: unchanged
    spec = load_spec(path, JobSpec, ["prep.inputs=[a.tar, b.tar]"])
    assert spec.prep.inputs == ["a.tar", "b.tar"]


@pytest.mark.parametrize("key", ["api_key", "wandb.api_key", "hf_token", "comet.apiKey", "password",
                                 "aws.secret_access_key", "auth.token"])
def test_deepspeed_overrides_refuse_secret_looking_keys(tmp_path, key, capsys):
    path = REPO / "jobs" / "demo_tiny.yaml"
    with pytest.raises(SpecError, match=re.escape(f"deepspeed.overrides: {key}: looks like a secret")):
        load_spec(path, JobSpec, [f"deepspeed.overrides.{key}=abc123"])
    assert main(["validate", str(path), "--set", f"deepspeed.overrides.{key}=abc123"]) == 2
    assert "abc123" not in capsys.readouterr().err


def test_deepspeed_overrides_keep_ordinary_keys():
    spec = load_spec(REPO / "jobs" / "demo_tiny.yaml", JobSpec, [
        "deepspeed.overrides.wandb.enabled=true", "deepspeed.overrides.steps_per_print=10",
        "deepspeed.overrides.data_efficiency.data_routing.random_ltd.total_layer_tokens=5",
        "deepspeed.overrides.data_efficiency.data_routing.random_ltd.layer_token_lr_schedule.enabled=false",
    ])
    assert spec.deepspeed.overrides["steps_per_print"] == 10


def _training_job(held_out_shards, eval_data) -> dict:
    stage = {"name": "s1", "losses": {"itc": 1.0}, "steps": 1, "batch_size": 1,
             "eval": {"data": eval_data, "every": 1}}
    return {"run": {"name": "r"}, "data": {"prepared": "p", "held_out_shards": held_out_shards}, "stages": [stage]}


@pytest.mark.parametrize("held_out_shards, eval_data, message", [
    (-1, "held_out", "data.held_out_shards: Input should be greater than or equal to 0"),
    ("some", "held_out", "data.held_out_shards: Input should be a valid integer"),
    (0, "held_out", "stages.0.eval.data: held_out needs data.held_out_shards > 0"),
    (1, ["held/test", "held_out"], "stages.0.eval.data: held_out names the held-out shards on its own, not in a list"),
    (1, [], "stages.0.eval.data: name a held-out folder or glob, or held_out"),
])
def test_held_out_fields_are_named(tmp_path, held_out_shards, eval_data, message):
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, _training_job(held_out_shards, eval_data)), JobSpec)
    assert message in str(err.value)
    assert "(1 problem(s))" in str(err.value)


def test_held_out_shards_and_eval_data_forms_validate(tmp_path):
    spec = load_spec(_write(tmp_path, _training_job(2, "held_out")), JobSpec)
    assert spec.data.held_out_shards == 2 and spec.stages[0].eval.data == "held_out"
    spec = load_spec(_write(tmp_path, _training_job(0, ["a", "b/*.parquet"])), JobSpec)
    assert spec.stages[0].eval.data == ["a", "b/*.parquet"]
    # the form a worker receives: held_out resolved to the shards' URLs
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_train_with_a_bad_held_out_count_exits_2_before_any_ray_work(tmp_path):
    path = _write(tmp_path, _training_job(-2, "held_out"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "data.held_out_shards: Input should be greater than or equal to 0" in result.stderr
    assert "ray" not in result.stderr.lower() and time.monotonic() - started < 60
