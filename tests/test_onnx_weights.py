"""The protobuf reader on small hand-built messages, independent of any real ONNX file: varints,
length-delimited fields, packed and unpacked repeated fields, and the ONNX messages built from
them."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pipeline.onnx_weights import OnnxFormatError, iter_fields, parse_graph, read_onnx, read_varint


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are written as their 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int | bytes | str, *, fixed32: bool = False) -> bytes:
    """One protobuf field: a varint for ints, length-delimited for bytes and strings."""
    if fixed32:
        return varint(number << 3 | 5) + struct.pack("<I", value)
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def tensor(name: str, dims: list[int], data_type: int, *, packed_dims: bool = True, **data: bytes) -> bytes:
    """A TensorProto: dims (1), data_type (2), name (8), then the given data fields."""
    dims_bytes = field(1, b"".join(varint(d) for d in dims)) if packed_dims else b"".join(field(1, d) for d in dims)
    numbers = {"float_data": 4, "int64_data": 7, "raw_data": 9}
    return dims_bytes + field(2, data_type) + field(8, name) + b"".join(field(numbers[k], v) for k, v in data.items())


def test_varints_as_the_protobuf_documentation_encodes_them():
    assert read_varint(memoryview(b"\x01"), 0) == (1, 1)
    assert read_varint(memoryview(b"\x96\x01"), 0) == (150, 2)
    assert read_varint(memoryview(b"\x00\xac\x02"), 1) == (300, 3)
    assert read_varint(memoryview(varint(-2)), 0) == ((1 << 64) - 2, 10)
    with pytest.raises(OnnxFormatError, match="inside a varint"):
        read_varint(memoryview(b"\x96"), 0)


def test_fields_of_each_wire_type_in_order():
    # The documentation's examples: field 1 = 150 (varint), field 2 = "testing" (length-delimited).
    message = b"\x08\x96\x01" + b"\x12\x07testing" + field(3, 0x3F800000, fixed32=True)
    fields = [(n, w, bytes(v) if isinstance(v, memoryview) else v) for n, w, v in iter_fields(memoryview(message))]
    assert fields == [(1, 0, 150), (2, 2, b"testing"), (3, 5, 0x3F800000)]


def test_a_message_cut_inside_a_field_is_refused():
    with pytest.raises(OnnxFormatError, match="past the message's end"):
        list(iter_fields(memoryview(b"\x12\x07test")))
    with pytest.raises(OnnxFormatError, match="wire type 3"):
        list(iter_fields(memoryview(b"\x0b")))


def test_a_graph_of_initialisers_in_every_encoding_and_nodes_with_tensor_attributes():
    weights = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    bias = np.array([-1.5, 0.25, 3.0], dtype=np.float32)
    constant = tensor("", [2], 7, packed_dims=False, int64_data=b"".join(varint(v) for v in (-1, 300)))
    graph = b"".join([
        field(5, tensor("w", [2, 3], 1, float_data=weights.astype("<f4").tobytes())),  # packed floats
        field(5, tensor("b", [3], 1, raw_data=bias.astype("<f4").tobytes())),
        field(5, tensor("u", [2], 1) + b"".join(field(4, struct.unpack("<I", struct.pack("<f", v))[0], fixed32=True)
                                               for v in (1.0, -2.0))),  # floats one field each
        field(1, field(1, "x") + field(1, "w") + field(2, "y") + field(3, "/lin/MatMul") + field(4, "MatMul")),
        field(1, field(2, "c") + field(4, "Constant") + field(5, field(1, "value") + field(5, constant))),
        field(2, "ignored graph name"),
    ])
    parsed = parse_graph(memoryview(graph))
    assert list(parsed.initializers) == ["w", "b", "u"]
    assert parsed.initializers["u"].tolist() == [1.0, -2.0]
    np.testing.assert_array_equal(parsed.initializers["w"], weights)
    np.testing.assert_array_equal(parsed.initializers["b"], bias)
    matmul, const = parsed.nodes
    assert (matmul.op_type, matmul.name, matmul.inputs, matmul.outputs) == ("MatMul", "/lin/MatMul", ("x", "w"), ("y",))
    assert const.op_type == "Constant" and const.tensors["value"].tolist() == [-1, 300]
    assert const.tensors["value"].dtype == np.int64


def test_a_model_file_is_read_from_its_graph_field(tmp_path):
    path = tmp_path / "tiny.onnx"
    graph = field(5, tensor("t", [1], 1, raw_data=np.float32(2.5).tobytes()))
    path.write_bytes(field(1, 8) + field(2, "hand") + field(7, graph))  # ir_version, producer, graph
    assert read_onnx(path).initializers["t"].tolist() == [2.5]
    (tmp_path / "empty.onnx").write_bytes(field(1, 8))
    with pytest.raises(OnnxFormatError, match="no graph"):
        read_onnx(tmp_path / "empty.onnx")


def test_tensors_this_reader_cannot_decode_are_refused():
    strings = tensor("s", [1], 8)
    with pytest.raises(OnnxFormatError, match="tensor 's': element type 8"):
        parse_graph(memoryview(field(5, strings)))
    external = tensor("e", [1], 1) + field(14, 1)
    with pytest.raises(OnnxFormatError, match="external file"):
        parse_graph(memoryview(field(5, external)))
