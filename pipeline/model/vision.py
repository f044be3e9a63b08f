"""The frozen vision tower: loading, truncating, encoding, and the input normalisation it expects.

Any transformers vision model whose output has a ``last_hidden_state`` of patch (and class or
register) tokens works: Dinov2, ViT, the vision halves of CLIP and Siglip, Blip2VisionModel. For
a CLIP/Siglip checkpoint only the vision sub-model is built, from the checkpoint's
``vision_config``; the text tower's weights are never materialised.

A whole BLIP-2 checkpoint (``Salesforce/blip2-opt-2.7b``: a ``Blip2Config`` over
``vision_model.*``, ``qformer.*`` and ``language_model.*`` weights) serves its EVA ViT-g as a
``Blip2VisionModel``. Its class has no ``vision_model.`` level of its own, so transformers cannot
match the checkpoint's keys; the ``vision_model.*`` tensors are read alone
(:mod:`pipeline.model.weight_files`), from only the shards that hold them, and the LLM is never
loaded. Two facts about such a tower (LAVIS converted): it has 39 layers, EVA ViT-g's 40 minus
the one BLIP-2 drops, so ``drop_last_layer`` would drop a second one; and its ``post_layernorm``
is the ``ln_vision`` that BLIP-2's stage 1 trained.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from pipeline.assets import is_config_only, model_config, resolve_model
from pipeline.model.frozen import freeze, torch_dtype
from pipeline.model.weight_files import MissingWeightsError, optional_file, read_prefixed_weights
from pipeline.spec.model import VisionTowerSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_IMAGE_SIZE = 224

log = logging.getLogger(__name__)

# Vision configs that AutoModel does not map to a model class.
_VISION_CLASSES_OUTSIDE_AUTO = {"blip_2_vision_model": "Blip2VisionModel"}

# Composite checkpoints (by their top-level model_type) whose vision tower is stored under a key
# prefix that the vision model class lacks. CLIP and Siglip need no entry: their vision classes
# carry the ``vision_model.`` level themselves, so transformers loads them directly.
_PREFIXED_VISION_TOWERS = {"blip-2": "vision_model."}


class VisionTowerError(RuntimeError):
    """A checkpoint cannot serve as a vision tower."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images must be prepared for a vision tower.

    Attributes:
        mean: Per-channel RGB mean subtracted from pixels scaled to [0, 1].
        std: Per-channel RGB standard deviation divided by after subtracting ``mean``.
        image_size: Side of the square image fed to the tower, in pixels.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int


def _vision_config(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "vision_config", None) or config


def image_preprocessing(spec: VisionTowerSpec) -> ImagePreprocessing:
    """Return the normalisation and image size the vision tower of ``spec`` expects.

    Mean and std come from the checkpoint's ``preprocessor_config.json`` when it has one, else
    ImageNet's. The size is ``spec.image_size`` if set, else the processor's crop size (or resize
    size), else the config's ``image_size``.

    Args:
        spec: The vision tower section of the model spec.

    Returns:
        The preprocessing the data pipeline must apply.
    """
    processor = {} if is_config_only(spec.name) else _read_processor_config(resolve_model(spec.name))
    mean = tuple(processor.get("image_mean") or IMAGENET_MEAN)
    std = tuple(processor.get("image_std") or IMAGENET_STD)
    size = spec.image_size or _processor_size(processor)
    if size is None:
        config_size = getattr(_vision_config(model_config(spec.name)), "image_size", None)
        size = _side(config_size) or _DEFAULT_IMAGE_SIZE
    return ImagePreprocessing(mean=mean, std=std, image_size=size)


def _read_processor_config(path: str) -> dict:
    resolved = optional_file(path, "preprocessor_config.json")
    if resolved is None:
        return {}
    with open(resolved, encoding="utf-8") as f:
        return json.load(f)


def _processor_size(processor: dict) -> int | None:
    if processor.get("do_center_crop") and processor.get("crop_size"):
        return _side(processor["crop_size"])
    return _side(processor.get("size"))


def _side(size: int | list | tuple | dict | None) -> int | None:
    """The square side of an image-size setting in any of the forms transformers uses."""
    if size is None or isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)):
        return int(size[0])
    for key in ("height", "shortest_edge"):
        if key in size:
            return int(size[key])
    return None


def load_vision_tower(spec: VisionTowerSpec, *, weights: bool = True) -> PreTrainedModel:
    """Load (for a ``config:`` name: build with random weights), optionally truncate, and
    freeze the vision tower of ``spec``.

    Args:
        spec: The vision tower section of the model spec.
        weights: False builds the tower from its config alone, reading no weights, on the
            current default device (under ``torch.device("meta")``: its shapes, for nothing).

    Returns:
        The frozen tower, held in ``spec.dtype``, in eval mode.

    Raises:
        VisionTowerError: The checkpoint has no vision model transformers can build, no weights
            file, or lacks weights the tower needs (they would be silently random otherwise).
    """
    full_config = model_config(spec.name)
    config = _vision_config(full_config)
    model_cls = _vision_model_class(config)
    dtype = torch_dtype(spec.dtype)
    prefix = _PREFIXED_VISION_TOWERS.get(full_config.model_type)
    if not weights or is_config_only(spec.name):
        # The real shapes, random weights, allocated where torch's default device says.
        build = model_cls.from_config if model_cls is AutoModel else model_cls._from_config
        model = build(config, dtype=dtype)
    else:
        model = _pretrained_tower(spec.name, resolve_model(spec.name), model_cls, config, dtype, prefix)
    if spec.drop_last_layer:
        if prefix is not None:
            log.warning(
                "%s: a BLIP-2 checkpoint's vision tower already lacks EVA ViT-g's last layer; "
                "drop_last_layer removes another one (%d -> %d layers)",
                spec.name, config.num_hidden_layers, config.num_hidden_layers - 1,
            )
        drop_last_layer(model)
    return freeze(model)


def _pretrained_tower(name: str, path: str, model_cls, config: PretrainedConfig, dtype: torch.dtype,
                      prefix: str | None) -> PreTrainedModel:
    """The tower with the checkpoint's weights, every one of which it needs present."""
    if prefix is None:
        model, info = model_cls.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True
        )
    else:
        # Built from the selected tensors; missing ones are reported exactly as from a file.
        try:
            state = read_prefixed_weights(path, prefix, dtype=dtype)
        except MissingWeightsError as err:
            raise VisionTowerError(str(err)) from None
        model, info = model_cls.from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
        )
    # Poolers and heads only shape the pooled output, which BLIP-2 does not read.
    missing = sorted(
        key for key in info["missing_keys"] if not {"pooler", "head"} & set(key.split("."))
    )
    if missing:
        raise VisionTowerError(
            f"{name}: {len(missing)} weights of {type(model).__name__} are not in the "
            f"checkpoint, e.g. {missing[:3]}"
        )
    return model


def _vision_model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    if config.model_type in _VISION_CLASSES_OUTSIDE_AUTO:
        return getattr(transformers, _VISION_CLASSES_OUTSIDE_AUTO[config.model_type])
    if type(config) not in MODEL_MAPPING:
        raise VisionTowerError(f"no transformers model class for config type {config.model_type!r}")
    return AutoModel


def drop_last_layer(model: PreTrainedModel) -> None:
    """Remove the last transformer block of a vision model in place.

    The block list is the only ``nn.ModuleList`` of ``config.num_hidden_layers`` modules named
    ``layer``/``layers``; ``config.num_hidden_layers`` is decremented to match.

    Raises:
        VisionTowerError: The block list cannot be identified unambiguously.
    """
    depth = model.config.num_hidden_layers
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == depth
        and name.rsplit(".", 1)[-1] in ("layer", "layers")
    ]
    if len(candidates) != 1 or depth < 2:
        raise VisionTowerError(
            f"cannot drop the last layer of {type(model).__name__}: block lists found {candidates}"
        )
    parent_name, _, attr = candidates[0].rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr))[:-1]))
    model.config.num_hidden_layers = depth - 1


def adopt_output_norm(tower: PreTrainedModel, ln_vision: nn.LayerNorm) -> bool:
    """Make the trainable ``ln_vision`` take over a BLIP-2 tower's final LayerNorm.

    A BLIP-2 checkpoint stores the stage-1-trained ``ln_vision`` as its vision tower's
    ``post_layernorm``. Applying both would normalise twice; instead ``ln_vision`` starts from
    those weights and the tower's copy becomes an identity, so features, training and export
    (``ln_vision`` -> ``vision_model.post_layernorm``) all match the paper's model.

    Returns:
        Whether the tower had such a norm.
    """
    norm = getattr(tower, "post_layernorm", None)
    if tower.config.model_type != "blip_2_vision_model" or not isinstance(norm, nn.LayerNorm):
        return False
    with torch.no_grad():
        ln_vision.weight.copy_(norm.weight)
        ln_vision.bias.copy_(norm.bias)
    # The checkpoint's eps (1e-6 for EVA ViT-g) too, so ln_vision computes exactly its norm.
    ln_vision.eps = norm.eps
    tower.post_layernorm = nn.Identity()
    return True


def vision_width(model: PreTrainedModel) -> int:
    """Width of the tower's output tokens."""
    return model.config.hidden_size


def encode_images(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Run the frozen tower without building a graph.

    Args:
        model: A tower from :func:`load_vision_tower`.
        pixel_values: (B, 3, H, W) normalised images, any float dtype.

    Returns:
        (B, P, D) output tokens (patches plus class/register tokens) in the tower's dtype.
    """
    kwargs = {}
    # Lets towers with learned position embeddings run at an image size other than their own.
    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        kwargs["interpolate_pos_encoding"] = True
    with torch.no_grad():
        out = model(pixel_values=pixel_values.to(model.dtype), **kwargs)
    return out.last_hidden_state  # (B, P, D)
