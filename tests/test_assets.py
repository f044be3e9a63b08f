"""Packaged and tiny model names resolve offline, also when many processes ask at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import assets

LOAD = """
from transformers import AutoConfig
from pipeline.assets import resolve_model
print(AutoConfig.from_pretrained(resolve_model("tiny:vit")).model_type)
"""


def test_concurrent_first_use_builds_one_complete_folder(tmp_path):
    env = {**os.environ, "QFORMER_CACHE": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=240) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [err[-800:] for _, err in results]
    assert [out.strip().splitlines()[-1] for out, _ in results] == ["dinov2"] * 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["tiny-vit"]


def test_unknown_packaged_names_are_rejected():
    with pytest.raises(assets.AssetError, match="unknown packaged model"):
        assets.resolve_model("pypi:not-a-model")
    with pytest.raises(assets.AssetError, match="unknown tiny model"):
        assets.resolve_model("tiny:nothing")
    assert assets.resolve_model("facebook/dinov2-small") == "facebook/dinov2-small"
