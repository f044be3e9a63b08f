"""Training runs on a real local Ray with real DeepSpeed: curricula, checkpoints, resume."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.io.storage import Location
from pipeline.model import Blip2Pretrainer
from pipeline.train.run import run_training
from tests.train.helpers import (
    in_bf16,
    job_spec,
    tiny_job,
)

FROZEN_PREFIXES = ("vision_model.", "language_model.")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _tensor_bytes(path: Path) -> int:
    """A safetensors file's size without its header (8-byte length + JSON)."""
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


@dataclass(frozen=True)
class Curriculum:
    raw: dict
    summary: dict
    run: Path


@pytest.fixture(scope="module")
def curriculum(prepared_demo, tmp_path_factory) -> Curriculum:
    """The tiny two-stage curriculum under ZeRO-3 bf16 with periodic evaluation, trained once for
    the module. The tests that read the finished run come before the one that continues it
    (pytest runs a module's tests in file order)."""
    # GPU's configuration; ZeRO-2 fp32 runs end to end in test_user_view (jobs/demo_tiny.yaml).
    storage = tmp_path_factory.mktemp("curriculum")
    raw = in_bf16(tiny_job("curriculum", str(storage), prepared_demo, zero_stage=3))
    raw["data"]["held_out_shards"] = 1  # the last of 4 shards: periodic held-out evaluation on it
    for stage in raw["stages"]:
        stage["eval"] = {"data": "held_out", "every": 3, "max_samples": 12, "batch_size": 4,
                         "itm_top_k": 2, "max_new_tokens": 3}
    summary = run_training(job_spec(raw))
    return Curriculum(raw, summary, storage / "curriculum")


def test_two_stage_curriculum_end_to_end_under_zero3_bf16(curriculum):
    raw, summary, run = curriculum.raw, curriculum.summary, curriculum.run
    job = job_spec(raw)
    assert summary["held_out"] == [f"{raw['data']['prepared']}/00003.parquet"]

    assert [s["stage"] for s in summary["stages"]] == ["stage1", "stage2"]
    assert [s["step"] for s in summary["stages"]] == [6, 4]
    evaluated = {"stage1": {"eval_caption_accuracy", "eval_t2i_r1", "eval_i2t_itm_r1", "eval_itm_accuracy"},
                 "stage2": {"eval_exact_match", "eval_token_f1", "eval_caption_loss"}}
    for stage, steps, losses in (("stage1", 6, {"loss_itc", "loss_itm", "loss_itg"}), ("stage2", 4, {"loss_lm"})):
        all_records = _metrics(run / stage / "metrics.jsonl")
        evals = [r for r in all_records if "eval_samples" in r]
        assert [r["step"] for r in evals] == [3, steps] and all(r["eval_samples"] == 12 for r in evals)
        assert all(evaluated[stage] <= set(r) for r in evals)
        [done] = [s for s in summary["stages"] if s["stage"] == stage]  # the summary's figures: the last
        assert done["held_out"] == {"step": steps, **{k[len("eval_"):]: v for k, v in evals[-1].items()
                                                      if k.startswith("eval_")}}
        records = [r for r in all_records if "loss" in r]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert losses <= set(records[0]) and {"lr", "samples_per_s", "tokens_per_s", "data_wait_s"} <= set(records[0])
        assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
        assert (run / stage / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sorted(p.name for p in (run / stage).glob("step-*")) == ["step-00000003", f"step-{steps:08d}"]

    # Every stage's checkpoints hold the trainable state only, once: fp32 masters and AdamW
    # moments (no frozen tensor, not a tied embedding's second name, no second copy).
    for index, stage_summary in enumerate(summary["stages"]):
        stage_spec = job.stages[index]
        model = Blip2Pretrainer(job.model, objective=stage_spec.objective, loss_weights=stage_spec.losses)
        names = set(model.trainable_state_dict())
        folder = Path(stage_summary["checkpoint"])
        trainable = load_file(folder / "trainable.safetensors")
        moments = load_file(folder / "optimizer.safetensors")
        assert set(trainable) == names and all(t.dtype == torch.float32 for t in trainable.values())
        assert set(moments) == {f"{n}.{m}" for n in names for m in ("exp_avg", "exp_avg_sq")}
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "metrics.jsonl",
                                                             "optimizer.safetensors", "trainable.safetensors"]
        counts = model.parameter_counts()
        assert sum(t.numel() for t in trainable.values()) == counts.trainable
        # 12 bytes a trainable parameter (fp32 master + two moments) and nothing else but the
        # safetensors headers and a few kB of metadata and metrics.
        payload = sum(_tensor_bytes(folder / name) for name in ("trainable.safetensors", "optimizer.safetensors"))
        assert payload == 12 * counts.trainable
        assert _folder_bytes(folder) - payload < 64_000
        dtypes = json.loads((folder / "metadata.json").read_text())["dtypes"]
        expected = {"vision": raw["model"]["vision"]["dtype"], "trainable": "bfloat16", "masters": "float32"}
        if stage_spec.objective == 2:
            expected["llm"] = raw["model"]["llm"]["dtype"]
        assert dtypes == expected
        # The masters were never rounded to the working precision.
        assert any(not torch.equal(t.bfloat16().float(), t) for t in trainable.values())
    trainable = load_file(Path(summary["stages"][0]["checkpoint"]) / "trainable.safetensors")

    # Stage 2 started from stage 1's trained Q-Former, not from a fresh initialisation.
    stage2 = Blip2Pretrainer(job.model, objective=2, loss_weights=job.stages[1].losses)
    fresh = stage2.trainable_state_dict()
    final2 = load_file(Path(summary["stages"][1]["checkpoint"]) / "trainable.safetensors")
    shared = [k for k in final2 if k.startswith("qformer.") and k in trainable]
    assert shared
    moved_from_stage1 = max(float((final2[k] - trainable[k]).abs().max()) for k in shared)
    distance_to_fresh = max(float((final2[k] - fresh[k]).abs().max()) for k in shared)
    assert moved_from_stage1 < distance_to_fresh


def test_raising_steps_continues_a_finished_stage_and_a_torn_metrics_line_is_dropped(curriculum):
    # The finished curriculum's last stage, continued (after the test above has read the run).
    raw, first, stage = json.loads(json.dumps(curriculum.raw)), curriculum.summary, curriculum.run / "stage2"
    assert first["stages"][1]["step"] == 4
    with open(stage / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a writer killed mid-line

    raw["stages"][1]["steps"] = 6
    second = run_training(job_spec(raw))
    assert second["stages"][0]["checkpoint"] == first["stages"][0]["checkpoint"], "the finished stage 1 is kept"
    assert second["stages"][1]["step"] == 6
    assert json.loads((stage / "complete.json").read_text())["step"] == 6
    final = json.loads(Path(second["stages"][1]["checkpoint"], "metadata.json").read_text())
    assert final["resumed_from_step"] == 4
    assert [r["step"] for r in _metrics(stage / "metrics.jsonl") if "loss" in r] == list(range(1, 7))


def _copy_with_column(prepared: str, folder: Path, column: str, values) -> str:
    """A copy of prepared data whose ``column`` is ``values(table)`` in every shard."""
    import pyarrow.parquet as pq

    from pipeline.data.prepared import MANIFEST, shards_from_manifest

    folder.mkdir()
    manifest = json.loads((Path(prepared) / MANIFEST).read_text())
    for entry, shard in zip(manifest["shards"], shards_from_manifest(Location.of(prepared).child(MANIFEST))):
        table = pq.read_table(shard.url)
        entry["output"] = str(folder / Path(shard.url).name)
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, values(table)),
                       entry["output"], row_group_size=30)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return str(folder)


def test_a_corrupt_sample_stops_training_at_once_with_its_name(prepared_demo, tmp_path):
    import pyarrow as pa

    from pipeline.train.run import TrainError

    corrupt = _copy_with_column(prepared_demo, tmp_path / "corrupt", "image",
                                lambda table: pa.array([b"not a jpeg"] * table.num_rows, pa.binary()))
    raw = tiny_job("corrupt", str(tmp_path), corrupt, stage2_steps=None)
    with pytest.raises(TrainError, match=r"sample '.*': cannot decode its image") as failed:
        run_training(job_spec(raw))
    assert "stage stage1 failed: " in str(failed.value) and "resumes from its last checkpoint" not in str(failed.value)
    assert not (tmp_path / "corrupt" / "stage1" / "metrics.jsonl").exists() or not _metrics(
        tmp_path / "corrupt" / "stage1" / "metrics.jsonl")


def test_data_prepared_with_another_end_of_text_is_refused_before_any_training(prepared_demo, tmp_path):
    import numpy as np
    import pyarrow as pa

    from pipeline.data.prepared import fixed_list, token_matrix
    from pipeline.train.run import TrainError

    def older_end(table):  # as SmolLM2's tokenizer ended captions before it used <|endoftext|>
        ids = token_matrix(table.column("llm_input_ids"))  # (N, L)
        last = token_matrix(table.column("llm_attention_mask")).sum(axis=1) - 1  # (N,)
        ids[np.arange(len(ids)), last] = 2  # <|im_end|>
        return fixed_list(ids.astype(np.int32), ids.shape[1], pa.int32())

    stale = _copy_with_column(prepared_demo, tmp_path / "stale", "llm_input_ids", older_end)
    with pytest.raises(TrainError, match=r"ends captions with token 2 \('<\|im_end\|>'\) but tiny:llama's "
                                         r"tokenizer ends texts with 0 \('<\|endoftext\|>'\); run `qformer prep`"):
        run_training(job_spec(tiny_job("stale", str(tmp_path), stale, stage1_steps=2, stage2_steps=2)))
    assert not (tmp_path / "stale" / "stage1").exists()
