"""The model spec: defaults, constraints, and nesting as a job-spec section."""

from __future__ import annotations

import pydantic
import pytest
import torch

from pipeline.spec.model import LossSpec, ModelSpec
from pipeline.model.frozen import torch_dtype


def test_defaults_describe_the_paper_setup():
    spec = ModelSpec()
    assert spec.qformer.num_query_tokens == 32
    assert spec.qformer.cross_attention_frequency == 2
    assert spec.qformer.embed_dim == 256
    assert spec.qformer.max_text_length == 32
    assert spec.qformer.bert == "bert-base-uncased"
    assert spec.vision.drop_last_layer
    assert spec.losses.label_smoothing == 0.1
    assert spec.losses.init_temperature == 0.07


def test_validates_from_a_yaml_like_mapping():
    spec = ModelSpec.model_validate(
        {
            "vision": {"name": "facebook/dinov2-small", "dtype": "float16"},
            "qformer": {"num_query_tokens": 8},
        }
    )
    assert torch_dtype(spec.vision.dtype) is torch.float16
    assert spec.qformer.num_query_tokens == 8
    assert spec.llm.name == "facebook/opt-2.7b"


@pytest.mark.parametrize(
    "data",
    [
        {"vision": {"nmae": "x"}},
        {"vision": {"dtype": "int8"}},
        {"qformer": {"num_query_tokens": 0}},
        {"losses": {"itc_weight": -1.0}},
        {"losses": {"label_smoothing": 1.0}},
        {"losses": {"init_temperature": 0.9}},
    ],
)
def test_rejects_bad_values(data):
    with pytest.raises(pydantic.ValidationError):
        ModelSpec.model_validate(data)


def test_fields_are_documented_and_frozen():
    for section in (ModelSpec, LossSpec):
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no docstring"
    with pytest.raises(pydantic.ValidationError):
        ModelSpec().qformer.num_query_tokens = 4
