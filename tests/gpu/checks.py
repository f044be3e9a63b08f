"""What the GPU tier asserts, the same on a GPU and in its CPU stand-in."""

from __future__ import annotations

from pipeline.bench.gpu_tier import Scenario


def check_round_trip(figures: dict, scenario: Scenario) -> None:
    """A scenario's figures: it ran, resumed to the same losses, kept the towers whole and in
    their own dtypes, trained in bf16 with fp32 masters, and captioned on the device."""
    assert "error" not in figures, figures.get("error")
    assert len(figures["losses"]) == scenario.steps
    assert len(figures["resumed_losses"]) == scenario.steps - scenario.resume_at
    assert figures["losses_equal"], (figures["losses"], figures["resumed_losses"])
    towers = figures["towers"]
    expected = {"vision": ["float16"], **({"llm": ["bfloat16"]} if scenario.objective == 2 else {})}
    assert towers["dtypes"] == expected
    assert not towers["partitioned"] and towers["whole"], "ZeRO must not partition a frozen tower"
    assert towers["in_state_dict"] == []
    assert towers["trainable_partitioned"] == (scenario.zero_stage == 3)
    assert figures["dtypes"]["trainable"] == "bfloat16" and figures["dtypes"]["masters"] == "float32"
    assert figures["checkpoint_bytes"] > 0
    assert len(figures["captions"]) == scenario.batch_size and all(isinstance(c, str) for c in figures["captions"])


def check_pinned(figures: dict, *, pinned: bool) -> None:
    assert figures["pixels_dtype"] == "uint8" and figures["normalised_dtype"] == "float32"
    assert figures["pinned"] == pinned
    assert figures["max_difference_from_host"] < 1e-5


def check_bench(report: dict, objective: int) -> dict:
    """``qformer bench step``'s report for one objective; the objective's figures."""
    result = report["objectives"][str(objective)]
    assert result["objective"] == objective
    assert result["step_s"] > 0 and result["flops_per_step"] > 0 and 0 < result["mfu"] < 1
    return result
