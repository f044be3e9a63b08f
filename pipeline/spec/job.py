"""The top-level job spec: the sections a job YAML may hold."""

from __future__ import annotations

from pydantic import model_validator

from pipeline.spec.base import SpecModel
from pipeline.spec.prep import PrepSpec


class JobSpec(SpecModel):
    """A job YAML. Each command reads the section it runs (``qformer prep`` reads ``prep``)."""

    prep: PrepSpec | None = None
    """The preprocessing job."""

    @model_validator(mode="after")
    def _has_a_section(self) -> "JobSpec":
        if self.prep is None:
            raise ValueError("a job spec needs at least one section (prep)")
        return self
