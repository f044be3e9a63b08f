"""The frozen vision tower: loading, truncating, encoding, and the input normalisation it expects.

Any transformers vision model whose output has a ``last_hidden_state`` of patch (and class or
register) tokens works: Dinov2, ViT, the vision halves of CLIP and Siglip, Blip2VisionModel. For
a CLIP/Siglip checkpoint only the vision sub-model is built, from the checkpoint's
``vision_config``; the text tower's weights are never materialised.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import cached_file

from pipeline.assets import resolve_model
from pipeline.model.config import VisionTowerSpec, torch_dtype
from pipeline.model.frozen import freeze

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_IMAGE_SIZE = 224

# Vision configs that AutoModel does not map to a model class.
_VISION_CLASSES_OUTSIDE_AUTO = {"blip_2_vision_model": "Blip2VisionModel"}


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
    path = resolve_model(spec.name)
    processor = _read_processor_config(path)
    mean = tuple(processor.get("image_mean") or IMAGENET_MEAN)
    std = tuple(processor.get("image_std") or IMAGENET_STD)
    size = spec.image_size or _processor_size(processor)
    if size is None:
        config_size = getattr(_vision_config(AutoConfig.from_pretrained(path)), "image_size", None)
        size = _side(config_size) or _DEFAULT_IMAGE_SIZE
    return ImagePreprocessing(mean=mean, std=std, image_size=size)


def _read_processor_config(path: str) -> dict:
    resolved = cached_file(
        path,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
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


def load_vision_tower(spec: VisionTowerSpec) -> PreTrainedModel:
    """Load, optionally truncate, and freeze the vision tower of ``spec``.

    Args:
        spec: The vision tower section of the model spec.

    Returns:
        The frozen tower, held in ``spec.dtype``, in eval mode.

    Raises:
        VisionTowerError: The checkpoint has no vision model transformers can build, or lacks
            weights the tower needs (they would be silently random otherwise).
    """
    path = resolve_model(spec.name)
    config = _vision_config(AutoConfig.from_pretrained(path))
    model_cls = _vision_model_class(config)
    model, info = model_cls.from_pretrained(
        path, config=config, dtype=torch_dtype(spec.dtype), output_loading_info=True
    )
    # Poolers and heads only shape the pooled output, which BLIP-2 does not read.
    missing = sorted(
        key for key in info["missing_keys"] if not {"pooler", "head"} & set(key.split("."))
    )
    if missing:
        raise VisionTowerError(
            f"{spec.name}: {len(missing)} weights of {type(model).__name__} are not in the "
            f"checkpoint, e.g. {missing[:3]}"
        )
    if spec.drop_last_layer:
        drop_last_layer(model)
    return freeze(model)


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
