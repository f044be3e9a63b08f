"""Load job-spec YAML files into typed objects, with command-line overrides.

Errors name the field path (``prep.filters.min_side: ...``) and are raised as ``SpecError``
before any Ray work starts; the CLI turns them into exit status 2. A spec file is UTF-8 YAML
in which no mapping repeats a key.
"""

from __future__ import annotations

import collections.abc
import types
import typing
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
        overrides: ``dotted.path=value`` strings; values are parsed as YAML scalars or lists
            (a single value for a list field is a list of one).

    Raises:
        SpecError: the file is unreadable, not UTF-8, not YAML, repeats a key, is not a
            mapping, or fails validation.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start}); save the spec as UTF-8") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        apply_override(raw, override, model)
    return validate_spec(raw, model, source=str(path))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text, refusing a mapping that repeats a key (YAML would keep the last).

    Raises:
        SpecError: not valid YAML, or a repeated key (named by its field path and lines).
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, [], source, set())
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError(f"{source}: not valid YAML{where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: list[str], source: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            where = ".".join([*path, key.value])
            if key.value in lines:
                raise SpecError(f"{source}: {where}: duplicate key (lines {lines[key.value]} and "
                                f"{key.start_mark.line + 1}); YAML would silently keep the last")
            lines[key.value] = key.start_mark.line + 1
            _refuse_duplicate_keys(value, [*path, key.value], source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, [*path, str(index)], source, seen)


def validate_spec(raw: dict[str, Any], model: type[M], source: str = "spec") -> M:
    """Validate an already-parsed mapping into ``model``, raising ``SpecError`` on failure."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def apply_override(raw: dict[str, Any], override: str, model: type[BaseModel] | None = None) -> None:
    """Set ``dotted.path=value`` inside ``raw``, creating mappings on the way.

    A numeric path component indexes into a list (``stages.0.steps=10``). With ``model``, a
    single value for a list field of it becomes a list of one (``prep.inputs=/data/*.tar``).
    """
    dotted, sep, text = override.partition("=")
    if not sep or not dotted.strip():
        raise SpecError(f"--set {override!r}: expected FIELD.PATH=VALUE")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    keys = dotted.strip().split(".")
    if model is not None and not isinstance(value, (list, dict)) and _is_list_field(model, keys):
        value = [value]
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


_LIST_TYPES = (list, set, frozenset, collections.abc.Sequence, collections.abc.Set)


def _is_list_field(model: type[BaseModel], keys: list[str]) -> bool:
    """Whether the field at ``keys`` (a dotted path, list indexes as digits) holds a list."""
    annotation: Any = model
    for key in keys:
        annotation = _unwrap(annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(key)
            if field is None:
                return False
            annotation = field.annotation
        elif origin in _LIST_TYPES and key.isdigit() and args:
            annotation = args[0]
        elif origin in (dict, collections.abc.Mapping) and len(args) == 2:
            annotation = args[1]
        else:
            return False
    annotation = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    return origin in _LIST_TYPES or (origin is tuple and len(args) == 2 and args[1] is Ellipsis)


def _unwrap(annotation: Any) -> Any:
    """``X`` from ``Annotated[X, ...]`` and ``X | None``; other unions stay as they are (a
    scalar may be valid there)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


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
        elif problem["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        lines.append(f"  {loc}: {message}")
    return "\n".join(lines)
