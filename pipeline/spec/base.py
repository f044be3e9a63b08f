"""The base of every typed job-spec section.

Job specs are pydantic models: YAML is only how they are written down. Every section forbids
unknown keys, is immutable once validated, and documents its fields with attribute docstrings.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SpecModel(BaseModel):
    """Base class for job-spec sections: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )
