"""Typed job specs: YAML files validated into immutable objects before any Ray work starts."""

from pipeline.spec.job import JobSpec
from pipeline.spec.loader import SpecError, load_spec
from pipeline.spec.prep import PrepSpec

__all__ = ["JobSpec", "PrepSpec", "SpecError", "load_spec"]
