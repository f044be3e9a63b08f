"""``init_from`` in a training run: checked by the driver before any Ray work, loaded by the
workers, listed on the console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, Blip2Config, Blip2ForImageTextRetrieval

from pipeline.checkpoint.sources import InitError
from pipeline.io.storage import Location
from pipeline.model import Blip2Pretrainer
from pipeline.train.init_weights import check_init_sources
from tests.train.helpers import job_spec, tiny_job

HUB_RETRIEVAL_GAPS = ["lm_head.*", "temp"]


def _one_stage(tmp_path: Path, init_from: str, **stage) -> dict:
    raw = tiny_job("init", str(tmp_path / "runs"), str(tmp_path / "prepared"), stage1_steps=2,
                   stage2_steps=None, checkpoint_every=2)
    raw["stages"][0].update(init_from=init_from, **stage)
    return raw


def _released_retrieval_model(tmp_path: Path, raw: dict) -> tuple[Path, dict[str, torch.Tensor]]:
    """A transformers Blip2ForImageTextRetrieval folder shaped like the job's stage-1 model, with
    its own random weights, as a hub repo holds one; and its state dict."""
    ours = Blip2Pretrainer(job_spec(raw).model, objective=1)
    config = Blip2Config(
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        qformer_config=ours.qformer.config.to_dict(), num_query_tokens=4, image_text_hidden_size=16)
    torch.manual_seed(11)
    released = Blip2ForImageTextRetrieval(config)
    released.save_pretrained(tmp_path / "released")
    return tmp_path / "released", released.state_dict()


def test_sources_are_checked_by_the_driver_with_their_field(tmp_path):
    raw = _one_stage(tmp_path, str(tmp_path / "missing.pth"))
    with pytest.raises(InitError, match=r"^stages\.0\.init_from: .*missing\.pth: no such file or folder$"):
        check_init_sources(job_spec(raw), Location.of(str(tmp_path / "runs" / "init")))

    folder, _ = _released_retrieval_model(tmp_path, raw)
    with pytest.raises(InitError, match=r"^stages\.0\.init_from: transformers Blip2 model .* does not fit "
                                        r"this stage's model: 6 of the model's trainable tensors are not in "
                                        r"it \(lm_head\.decoder\.bias, "):
        check_init_sources(job_spec(_one_stage(tmp_path, str(folder))), Location.of(str(tmp_path / "runs" / "init")))
    raw = _one_stage(tmp_path, str(folder), init_from_allow_missing=HUB_RETRIEVAL_GAPS)
    checked = check_init_sources(job_spec(raw), Location.of(str(tmp_path / "runs" / "init")))
    assert checked[0].kind == "transformers" and checked[0].allow_missing == tuple(HUB_RETRIEVAL_GAPS)

    # A finished stage is not checked again (its source may be gone), an earlier stage never is.
    (tmp_path / "runs" / "init" / "stage1").mkdir(parents=True)
    (tmp_path / "runs" / "init" / "stage1" / "complete.json").write_text("{}")
    assert check_init_sources(job_spec(_one_stage(tmp_path, str(tmp_path / "gone.pth"))),
                              Location.of(str(tmp_path / "runs" / "init"))) == {}
    assert check_init_sources(job_spec(tiny_job("chain", str(tmp_path), "p")), Location.of(str(tmp_path))) == {}


def test_an_unrelated_checkpoint_stops_train_with_one_line_before_ray(tmp_path):
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=50))
    torch.save({"model": dict(bert.state_dict())}, tmp_path / "bert.pth")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_one_stage(tmp_path, str(tmp_path / "bert.pth"))))
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", str(spec)], capture_output=True,
                            text=True, env={**os.environ, "RAY_ADDRESS": "local"}, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: stages.0.init_from: LAVIS checkpoint {tmp_path / 'bert.pth'} does not fit this stage's model: ")
    assert "no place in the model (embeddings.LayerNorm.bias, " in errors[0]
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr
    assert not (tmp_path / "runs" / "init" / "stage1").exists()  # the run folder holds only its lease


def test_a_stage_starts_from_a_transformers_blip2_folder(prepared_demo, ray_address, tmp_path):
    raw = _one_stage(tmp_path, "", init_from_allow_missing=HUB_RETRIEVAL_GAPS)
    raw["data"]["prepared"] = prepared_demo
    folder, released = _released_retrieval_model(tmp_path, raw)
    raw["stages"][0]["init_from"] = str(folder)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", str(spec)], capture_output=True,
                            text=True, env={**os.environ, "RAY_ADDRESS": ray_address}, timeout=500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    model = Blip2Pretrainer(job_spec(raw).model, objective=1)
    loaded = len(model.trainable_state_dict()) - 6
    assert f"init_from transformers Blip2 model {folder}: {loaded} tensors loaded, 6 start from " in output
    [log] = (tmp_path / "runs" / "init" / "logs").glob("train-*.log")  # every tensor is in the log
    listed = log.read_text()
    assert "  loaded qformer.encoder.layer.0.crossattention.attention.query.weight (32, 32)" in listed
    assert "  loaded ln_vision.weight (32,)" in listed
    assert "  starts from init: temp (allowed; not in the source)" in listed

    # Two small steps later the weights are still next to the released ones, far from a fresh init.
    final = load_file(tmp_path / "runs" / "init" / "stage1" / "step-00000002" / "trainable.safetensors")
    fresh = model.trainable_state_dict()
    names = [name for name in final if name.startswith(("qformer.", "query_tokens", "itm_head."))]
    assert max(float((final[n] - released[n]).abs().max()) for n in names) < 0.01
    random = [n for n in names if n == "query_tokens" or n.endswith(("dense.weight", "query.weight", "value.weight"))]
    assert min(float((fresh[n] - released[n]).abs().max()) for n in random) > 0.02
