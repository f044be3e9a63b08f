"""The GPU tier's report: every test's figures in one JSON file, and on the terminal.

The file is ``$QFORMER_GPU_REPORT`` if set, else ``gpu-tier.json`` in pytest's base temporary
folder; its path is printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

REPORT_ENV = "QFORMER_GPU_REPORT"
_KEY = pytest.StashKey[dict]()


class TierReport:
    """Figures by test name, written to one JSON file when the session ends."""

    def __init__(self, path: Path):
        self.path = path
        self.tests: dict[str, dict] = {}

    def add(self, name: str, figures: dict) -> None:
        """Record ``figures`` under ``name`` and print them (seen with ``-s``; the terminal
        summary repeats them)."""
        self.tests[name] = figures
        print(f"[gpu tier] {name}: {json.dumps(figures, default=str)[:4000]}")

    def write(self) -> None:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
                                         "torch": torch.__version__, "tests": self.tests}, indent=1, default=str))


@pytest.fixture(scope="session")
def tier_report(request, tmp_path_factory) -> TierReport:
    path = Path(os.environ.get(REPORT_ENV) or tmp_path_factory.getbasetemp() / "gpu-tier.json")
    report = TierReport(path)
    request.config.stash[_KEY] = {"report": report}
    yield report
    report.write()


def pytest_terminal_summary(terminalreporter, config):
    held = config.stash.get(_KEY, None)
    if not held or not held["report"].tests:
        return
    report = held["report"]
    terminalreporter.section("GPU tier figures")
    for name, figures in report.tests.items():
        terminalreporter.write_line(f"{name}: {json.dumps(_headline(figures), default=str)}")
    terminalreporter.write_line(f"report: {report.path}")


def _headline(figures: dict) -> dict:
    """The figures worth a line: numbers, flags and short strings (no captions, no stdout)."""
    return {k: v for k, v in figures.items()
            if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) < 80)}
