"""``qformer bench step``: the tiny preset end to end in a process without Ray or DeepSpeed, its
errors, the device table, and the paper preset's shapes (built on the meta device: no memory)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.assets import BERT_BASE, EVA_VIT_G, OPT_2_7B
from pipeline.bench.device import known_bf16_peak
from pipeline.bench.step import PRESETS
from pipeline.cli import main
from tests.helpers import cli_without

GPU_MACHINE_LACKS = ("ray", "deepspeed", "accelerate", "psutil", "matplotlib", "scipy", "s3fs", "boto3",
                     "webdataset")
"""What a GPU machine with only torch, transformers and pure-Python wheels may not have."""

BATCH = 4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``qformer bench step --preset tiny`` (both objectives) where Ray and DeepSpeed cannot be
    imported: its stdout and JSON report."""
    out = tmp_path_factory.mktemp("bench-step") / "step.json"
    result = cli_without(GPU_MACHINE_LACKS, ["bench", "step", "--preset", "tiny", "--device", "cpu",
                                             "--batch-size", str(BATCH), "--steps", "2", "--out", str(out)],
                         timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def test_it_runs_without_ray_or_deepspeed(tiny_run):
    stdout, report = tiny_run
    assert set(report["objectives"]) == {"1", "2"}
    assert f"json: {report['json']}" in stdout


def test_every_phase_is_timed(tiny_run):
    _, report = tiny_run
    expected = {
        "1": ["data_wait", "vision_forward", "qformer_forward_backward", "optimizer_step", "communication"],
        "2": ["data_wait", "vision_forward", "qformer_forward_backward", "llm_forward_backward",
              "optimizer_step", "communication"],
    }
    for objective, phases in expected.items():
        result = report["objectives"][objective]
        assert list(result["phases_s"]) == phases
        assert all(result["phases_s"][name] > 0 for name in phases if name != "communication"), result["phases_s"]
        assert result["phases_s"]["communication"] == 0.0
        assert all(seconds > 0 for seconds in result["marked_phases_s"].values())
        assert result["batch_size"] == BATCH and result["steps_timed"] == 2
        assert result["step_s"] >= result["compute_s"] > 0
        assert result["samples_per_s"] == pytest.approx(BATCH / result["step_s"])


def test_flops_mfu_and_memory(tiny_run):
    _, report = tiny_run
    assert report["device"]["peak_tflops"] > 0 and "measured float32 matmul" in report["device"]["peak_source"]
    for result in report["objectives"].values():
        assert result["flops_per_step"] > 0
        assert result["achieved_tflops"] == pytest.approx(result["flops_per_step"] / result["step_s"] / 1e12)
        assert result["mfu"] == pytest.approx(result["achieved_tflops"] / report["device"]["peak_tflops"])
        assert result["peak_memory_bytes"] > 0
    # Objective 2 runs the tiny Llama's forward and backward (49,152-word logits) on top of the
    # vision tower and the Q-Former's query pass; objective 1 runs no LLM.
    assert report["objectives"]["2"]["flops_per_step"] > report["objectives"]["1"]["flops_per_step"]


def test_decode_rates_and_threads_needed(tiny_run):
    stdout, report = tiny_run
    decode = report["decode"]
    assert (decode["jpeg_side"], decode["output_side"]) == (224, 32)
    assert decode["plain_pil_images_per_s"] > 0 and decode["loader_images_per_s_per_thread"] > 0
    assert decode["loader_fraction_of_plain"] == pytest.approx(
        decode["loader_images_per_s_per_thread"] / decode["plain_pil_images_per_s"])
    for result in report["objectives"].values():
        assert result["decode_threads_needed"] >= 1
        assert f"a step of {BATCH} samples needs {result['decode_threads_needed']} decode thread" in stdout


@pytest.mark.parametrize("argv, message", [
    (["--objective", "1", "--batch-size", "1"], "error: --batch-size 1: objective 1 needs at least 2 samples"),
    (["--batch-size", "1"], "error: --batch-size 1: objective 1 needs at least 2 samples"),
])
def test_bad_requests_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "step", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU on a machine without one")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    assert main(["bench", "step", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: torch") and "sees no CUDA device" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("NVIDIA A10", 125),
    ("NVIDIA A10G", None), ("Tesla T4", None), ("Tesla V100-SXM2-16GB", None),
])
def test_gpu_names_map_to_dense_bf16_datasheet_peaks(name, tflops):
    assert known_bf16_peak(name) == (None if tflops is None else tflops * 1e12)


def test_the_paper_preset_has_blip2s_shapes():
    """Built on the meta device: the shapes and dtypes without a byte of weights. (transformers'
    ``from_pretrained`` refuses a meta device context, so nothing here reads files either.)"""
    from pipeline.model import Blip2Pretrainer, image_preprocessing
    from pipeline.model.llm import load_language_model
    from pipeline.model.vision import load_vision_tower

    spec = PRESETS["paper"].model_spec("bf16")
    assert (spec.vision.name, spec.qformer.bert, spec.llm.name) == (EVA_VIT_G, BERT_BASE, OPT_2_7B)
    assert image_preprocessing(spec.vision).image_size == 224
    with torch.device("meta"):
        vision = load_vision_tower(spec.vision)
        llm = load_language_model(spec.llm)
        stage1 = Blip2Pretrainer(spec, objective=1)
    config = vision.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size) == (1408, 39, 14)
    assert {p.dtype for p in vision.parameters()} == {torch.bfloat16}
    assert 0.98e9 < sum(p.numel() for p in vision.parameters()) < 0.99e9  # EVA ViT-g without its last layer
    config = llm.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.ffn_dim,
            config.vocab_size) == (2560, 32, 32, 10240, 50272)
    assert 2.6e9 < sum(p.numel() for p in llm.parameters()) < 2.7e9
    # BLIP-2 reports 188M trainable parameters for its Q-Former (queries, heads and ln_vision included).
    trainable = sum(p.numel() for p in stage1.parameters() if p.requires_grad)
    assert 185e6 < trainable < 190e6
    assert stage1.num_query_tokens == 32


def test_only_models_built_from_configs_are_built_on_the_device():
    """The paper preset's multi-GB random towers never pass through host memory; a preset that
    loads files builds on the CPU (transformers' from_pretrained under a CUDA device context
    needs accelerate, which a bare GPU machine may lack) and is moved after."""
    from pipeline.bench.step import _build_place

    device = torch.device("meta")
    assert _build_place(PRESETS["paper"].model_spec("bf16"), device) == device
    assert _build_place(PRESETS["tiny"].model_spec("fp32"), device) != device
