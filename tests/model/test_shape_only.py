"""A model built for its names and shapes only (``tower_weights=False`` on the meta device), as the
driver checks ``init_from`` sources with: no weight file is read, the shapes are the real ones."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.model import Blip2Pretrainer

from .tiny import tiny_spec


def _without_weights(folder, out):
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


@pytest.mark.parametrize("objective, vision", [(1, "blip2"), (2, "dinov2")])
def test_the_meta_model_has_the_real_names_and_shapes_without_reading_weights(
        vision_dirs, bert_dir, llm_dirs, tmp_path, objective, vision):
    spec = tiny_spec(vision_dirs(vision), bert_dir, llm_dirs("opt"))
    real = Blip2Pretrainer(spec, objective=objective)
    bare = tiny_spec(_without_weights(vision_dirs(vision), tmp_path / "vision"), bert_dir,
                     _without_weights(llm_dirs("opt"), tmp_path / "llm"))
    bare = bare.model_copy(update={"qformer": bare.qformer.model_copy(update={"init": "random"})})
    with pytest.raises(OSError, match="no file named model.safetensors"):  # the weights are gone
        Blip2Pretrainer(bare, objective=objective)
    with torch.device("meta"):
        meta = Blip2Pretrainer(bare, objective=objective, tower_weights=False)
    shapes = {name: p.shape for name, p in real.named_parameters() if p.requires_grad}
    assert {name: p.shape for name, p in meta.named_parameters() if p.requires_grad} == shapes
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert [name for name, p in meta.named_parameters() if not p.requires_grad] == [
        name for name, p in real.named_parameters() if not p.requires_grad]
