"""Load job-spec YAML files into typed objects, with command-line overrides.

Errors name the field path (``prep.filters.min_side: ...``) and are raised as ``SpecError``
before any Ray work starts; the CLI turns them into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import UsageError

M = TypeVar("M", bound=BaseModel)


class SpecError(UsageError, ValueError):
    """A job spec is invalid; the message names every offending field path."""


def load_spec(path: str | Path, model: type[M], overrides: Sequence[str] = ()) -> M:
    """Read a YAML job spec, apply ``a.b=value`` overrides and validate it into ``model``.

    Args:
        path: the YAML file.
        model: the typed spec class to validate into.
        overrides: ``dotted.path=value`` strings; values are parsed as YAML scalars or lists.

    Raises:
        SpecError: the file is unreadable, not a mapping, or fails validation.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        apply_override(raw, override)
    return validate_spec(raw, model, source=str(path))


def validate_spec(raw: dict[str, Any], model: type[M], source: str = "spec") -> M:
    """Validate an already-parsed mapping into ``model``, raising ``SpecError`` on failure."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``dotted.path=value`` inside ``raw``, creating mappings on the way.

    A numeric path component indexes into a list (``stages.0.steps=10``).
    """
    dotted, sep, text = override.partition("=")
    if not sep or not dotted.strip():
        raise SpecError(f"--set {override!r}: expected FIELD.PATH=VALUE")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    keys = dotted.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, ".".join(keys[: depth + 1]))
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError(f"--set {dotted}: {'.'.join(keys[:-1])} is not a section")


def _child(node: Any, key: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key, where)]
    if not isinstance(node, dict):
        raise SpecError(f"--set {where}: its parent is not a section")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def _list_index(node: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise SpecError(f"--set {where}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``field.path: message``."""
    lines = [f"{source}: invalid job spec ({err.error_count()} problem(s))"]
    for problem in err.errors(include_url=False):
        loc = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif problem["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  {loc}: {message}")
    return "\n".join(lines)
