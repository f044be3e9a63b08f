"""The DeepSpeed engine without Ray: frozen towers outside it, fp32 masters, the portable state.

Each test runs real DeepSpeed in two (or one) gloo processes, as Ray Train's workers would.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.model import Blip2Pretrainer
from pipeline.train.seeds import init_seed
from tests.train.helpers import engine_job, run_ranks

pytestmark = pytest.mark.slow  # each test starts DeepSpeed in two processes (~30 s)


def _tower_report(engine) -> dict:
    towers = engine.module.towers
    return {
        "dtypes": {name: {p.dtype for p in tower.parameters()} for name, tower in
                   (("vision", towers.vision), ("llm", towers.language_model))},
        "partitioned": any(hasattr(p, "ds_id") for tower in towers.modules() for p in tower.parameters()),
        "whole": all(p.numel() > 0 for tower in towers.modules() for p in tower.parameters()),
        "in_state_dict": [k for k in engine.module.state_dict() if k.startswith(("vision_model.", "language_model."))],
        "working": {p.dtype for p in engine.module.parameters()},
    }


def _build_and_report(rank: int, job_json: str, out: str) -> None:
    from pipeline.train.state import gather_masters
    from tests.train.helpers import build_test_engine

    engine = build_test_engine(job_json, stage_index=1)
    report = _tower_report(engine)
    masters = gather_masters(engine)
    if rank == 0:
        torch.save({"report": report, "masters": masters}, out)


def test_frozen_towers_stay_outside_deepspeed_in_their_dtype_and_masters_start_exact(tmp_path):
    """bf16 under ZeRO-3 with a float16 vision tower and a tied-embedding LLM: DeepSpeed casts
    and partitions only the trainable modules; its fp32 masters hold the exact initial weights."""
    job = engine_job(tmp_path, zero_stage=3, precision="bf16", vision_dtype="float16", llm_dtype="bfloat16")
    result = run_ranks(_build_and_report, 2, job.model_dump_json(), tmp_path / "out.pt")
    report = result["report"]
    assert report["dtypes"] == {"vision": {torch.float16}, "llm": {torch.bfloat16}}
    assert not report["partitioned"] and report["whole"], "ZeRO-3 must not partition a frozen tower"
    assert report["in_state_dict"] == [] and report["working"] == {torch.bfloat16}

    torch.manual_seed(init_seed(job.run.seed))
    stage = job.stages[1]
    expected = Blip2Pretrainer(job.model, objective=stage.objective, loss_weights=stage.losses).trainable_state_dict()
    masters = result["masters"]
    assert masters.keys() == expected.keys()
    assert all(masters[name].dtype == torch.float32 for name in masters)
    for name, value in expected.items():
        assert torch.equal(masters[name], value), name
    rounded = [name for name, value in expected.items() if not torch.equal(value.bfloat16().float(), value)]
    assert rounded, "the check needs weights that bf16 cannot hold exactly"


def _train_and_save(rank: int, job_json: str, folder: str) -> None:
    from pathlib import Path

    from pipeline.train.state import gather_state
    from tests.train.helpers import build_test_engine, random_batch

    engine = build_test_engine(job_json, stage_index=0)
    for step in range(2):
        out = engine(**random_batch(engine.module, seed=10 * step + rank), itm_seed=step)
        engine.backward(out.loss)
        engine.step()
    state = gather_state(engine)
    if rank == 0:
        state.save(Path(folder))
        torch.save({"adam_step": state.adam_step, "scheduler": state.scheduler}, Path(folder) / "counters.pt")


def _restore_and_gather(rank: int, job_json: str, folder: str, out: str) -> None:
    from pipeline.train.state import gather_state
    from tests.train.helpers import build_test_engine

    engine = build_test_engine(job_json, stage_index=0, resume_from=folder)
    state = gather_state(engine)
    if rank == 0:
        torch.save({"weights": state.weights, "moments": state.moments, "adam_step": state.adam_step,
                    "scheduler": state.scheduler}, out)


@pytest.mark.parametrize("zero_stage, saved_by, restored_by", [(0, 2, 1), (2, 2, 1), (3, 1, 2)])
def test_masters_and_moments_resume_bitwise_at_another_world_size_under_bf16(tmp_path, zero_stage, saved_by,
                                                                            restored_by):
    from pipeline.train.state import TrainingState

    job = engine_job(tmp_path, zero_stage=zero_stage, precision="bf16").model_dump_json()
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    run_ranks(_train_and_save, saved_by, job, str(folder))
    saved = TrainingState.load(folder)
    assert saved.adam_step == 2 and all(t.dtype == torch.float32 for t in saved.weights.values())

    restored = run_ranks(_restore_and_gather, restored_by, job, str(folder), tmp_path / "restored.pt")
    assert restored["adam_step"] == saved.adam_step and restored["scheduler"] == saved.scheduler
    for kind in ("weights", "moments"):
        ours, theirs = getattr(saved, kind), restored[kind]
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (kind, name)


def _clamp(rank: int, job_json: str, out: str) -> None:
    from pipeline.train.state import clamp_masters, gather_masters, set_masters
    from tests.train.helpers import build_test_engine

    engine = build_test_engine(job_json, stage_index=0)
    objects = [gather_masters(engine)]
    torch.distributed.broadcast_object_list(objects, src=0)
    weights = objects[0]
    weights["temp"] = torch.tensor([9.0])  # far above the spec's max_temperature
    set_masters(engine, weights)
    clamp_masters(engine, engine.module.parameter_bounds())
    masters = gather_masters(engine)
    if rank == 0:
        torch.save(masters["temp"], out)


def test_the_temperature_bound_holds_on_the_fp32_master(tmp_path):
    job = engine_job(tmp_path, zero_stage=2, precision="bf16")
    temperature = run_ranks(_clamp, 2, job.model_dump_json(), tmp_path / "temp.pt")
    assert temperature.dtype == torch.float32
    assert temperature.item() == job.model.losses.max_temperature
