"""Read the weights and the node list of an ONNX model, without the ``onnx`` package.

An ONNX file is one protobuf message, ``ModelProto``. This module decodes just enough of the
protobuf wire format (varints, fixed 32/64-bit fields, length-delimited fields) and of the ONNX
schema (``onnx/onnx.proto``) to return the graph's initialisers as numpy arrays and its nodes as
(op type, inputs, outputs, tensor-valued attributes), which is what rebuilding a PyTorch state dict
from an exported model needs. Weights stored in external files, sparse initialisers and nested
subgraphs are not read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
"""Protobuf wire types (3 and 4, the deprecated groups, do not occur in ONNX files)."""

# Field numbers of onnx.proto.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 3, 4, 5
_ATTR_NAME, _ATTR_TENSOR = 1, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA, _TENSOR_INT32_DATA = 1, 2, 4, 5
_TENSOR_INT64_DATA, _TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_DOUBLE_DATA = 7, 8, 9, 10
_TENSOR_DATA_LOCATION = 14

_DTYPES = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}
"""ONNX ``TensorProto.DataType`` codes to numpy (strings, bfloat16 and the 8-bit floats are not read)."""


class OnnxFormatError(ValueError):
    """The bytes are not an ONNX model this reader understands."""


@dataclass(frozen=True)
class OnnxNode:
    """One node of the graph: ``op_type`` applied to the tensors named ``inputs``."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    """The node's tensor-valued attributes by name (a ``Constant``'s ``value``)."""


@dataclass(frozen=True)
class OnnxGraph:
    """An ONNX model's main graph: its initialisers by name, and its nodes in graph order."""

    initializers: dict[str, np.ndarray]
    nodes: list[OnnxNode]


def read_onnx(path: str | Path) -> OnnxGraph:
    """The initialisers and nodes of the ONNX model at ``path``.

    Raises:
        OnnxFormatError: the file is not a protobuf ``ModelProto`` with a graph, or holds
            tensors this reader cannot decode (external data, unsupported element types).
    """
    data = memoryview(Path(path).read_bytes())
    graphs = [value for number, _, value in iter_fields(data) if number == _MODEL_GRAPH]
    if not graphs:
        raise OnnxFormatError(f"{path}: no graph in the model")
    return parse_graph(graphs[-1])


def parse_graph(data: memoryview) -> OnnxGraph:
    """A ``GraphProto``'s initialisers and nodes."""
    initializers: dict[str, np.ndarray] = {}
    nodes: list[OnnxNode] = []
    for number, _, value in iter_fields(data):
        if number == _GRAPH_INITIALIZER:
            name, array = parse_tensor(value)
            initializers[name] = array
        elif number == _GRAPH_NODE:
            nodes.append(parse_node(value))
    return OnnxGraph(initializers, nodes)


def parse_node(data: memoryview) -> OnnxNode:
    """A ``NodeProto``: op type, name, input and output names, tensor attributes."""
    inputs, outputs, tensors = [], [], {}
    name = op_type = ""
    for number, _, value in iter_fields(data):
        if number == _NODE_INPUT:
            inputs.append(_text(value))
        elif number == _NODE_OUTPUT:
            outputs.append(_text(value))
        elif number == _NODE_NAME:
            name = _text(value)
        elif number == _NODE_OP_TYPE:
            op_type = _text(value)
        elif number == _NODE_ATTRIBUTE:
            attribute = {n: v for n, _, v in iter_fields(value)}
            if _ATTR_TENSOR in attribute:
                tensors[_text(attribute[_ATTR_NAME])] = parse_tensor(attribute[_ATTR_TENSOR])[1]
    return OnnxNode(op_type, name, tuple(inputs), tuple(outputs), tensors)


def parse_tensor(data: memoryview) -> tuple[str, np.ndarray]:
    """A ``TensorProto`` as (name, array of its dims), from ``raw_data`` or the typed fields."""
    dims: list[int] = []
    name, data_type, raw = "", 0, None
    typed: list[float | int] = []
    for number, wire_type, value in iter_fields(data):
        if number == _TENSOR_DIMS:
            dims.extend(_ints(wire_type, value))
        elif number == _TENSOR_DATA_TYPE:
            data_type = value
        elif number == _TENSOR_NAME:
            name = _text(value)
        elif number == _TENSOR_RAW_DATA:
            raw = value
        elif number == _TENSOR_FLOAT_DATA:
            typed.extend(_packed(wire_type, value, "<f4"))
        elif number == _TENSOR_DOUBLE_DATA:
            typed.extend(_packed(wire_type, value, "<f8"))
        elif number in (_TENSOR_INT32_DATA, _TENSOR_INT64_DATA):
            typed.extend(_ints(wire_type, value))
        elif number == _TENSOR_DATA_LOCATION and value == 1:
            raise OnnxFormatError(f"tensor {name!r}: weights in an external file are not read")
    if data_type not in _DTYPES:
        raise OnnxFormatError(f"tensor {name!r}: element type {data_type} is not read")
    dtype = np.dtype(_DTYPES[data_type]).newbyteorder("<")
    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype).copy()
    elif data_type in (10, 4):  # float16 and uint16 travel as the bits, widened, in int32_data
        array = np.asarray(typed, dtype=np.uint16).view(dtype)
    else:
        array = np.asarray(typed, dtype=dtype)
    return name, array.astype(dtype.newbyteorder("=")).reshape(dims)


def iter_fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """A protobuf message's fields in order, as (field number, wire type, value): an ``int`` for
    varint and fixed-width fields (fixed ones as their unsigned bits), a ``memoryview`` slice of
    ``data`` for length-delimited ones."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, pos = read_varint(data, pos)
        elif wire_type == LENGTH_DELIMITED:
            length, pos = read_varint(data, pos)
            if pos + length > end:
                raise OnnxFormatError(f"field {number}: {length} bytes run past the message's end")
            value, pos = data[pos:pos + length], pos + length
        elif wire_type in (FIXED32, FIXED64):
            width = 4 if wire_type == FIXED32 else 8
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        else:
            raise OnnxFormatError(f"field {number}: unsupported wire type {wire_type}")
        yield number, wire_type, value
    if pos != end:
        raise OnnxFormatError("the message ends inside a field")


def read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``data[pos:]`` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise OnnxFormatError("the message ends inside a varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8")


def _ints(wire_type: int, value: int | memoryview) -> list[int]:
    """A repeated integer field's values, packed (one length-delimited run) or not (one varint),
    as two's-complement signed 64-bit ints, as int32/int64 fields are written."""
    if wire_type == LENGTH_DELIMITED:
        values, pos = [], 0
        while pos < len(value):
            number, pos = read_varint(value, pos)
            values.append(number)
    else:
        values = [value]
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


def _packed(wire_type: int, value: int | memoryview, dtype: str) -> np.ndarray:
    """A repeated float/double field's values, packed or one at a time."""
    if wire_type == LENGTH_DELIMITED:
        return np.frombuffer(value, dtype=dtype)
    width = 4 if wire_type == FIXED32 else 8
    return np.frombuffer(value.to_bytes(width, "little"), dtype=dtype)
