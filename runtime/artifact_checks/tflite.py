"""Structural check of a TFLite (LiteRT) FlatBuffer: ``check_tflite``."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from edgeship.errors import ArtifactError
from edgeship.runtime.artifact_checks.flatbuffer import U32, FlatBufferReader, FlatTable
from edgeship.runtime.artifact_checks.model_file import REBUILD, Buffer, map_file

# Field indices from tensorflow/compiler/mlir/lite/schema/schema.fbs.
_MODEL_VERSION, _MODEL_OPCODES, _MODEL_SUBGRAPHS, _MODEL_DESCRIPTION, _MODEL_BUFFERS = 0, 1, 2, 3, 4
_MODEL_METADATA_BUFFER, _MODEL_METADATA, _MODEL_SIGNATURES = 5, 6, 7
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS, _SUBGRAPH_OPERATORS, _SUBGRAPH_NAME = 0, 1, 2, 3, 4
_TENSOR_SHAPE, _TENSOR_BUFFER, _TENSOR_NAME, _TENSOR_QUANTIZATION, _TENSOR_SHAPE_SIGNATURE = 0, 2, 3, 4, 7
_QUANTIZATION_VECTORS = ((0, 4, "quantization min"), (1, 4, "quantization max"), (2, 4, "scale"), (3, 8, "zero point"))
_OP_OPCODE, _OP_CUSTOM_OPTIONS, _OP_LARGE_CUSTOM_OFFSET, _OP_LARGE_CUSTOM_SIZE = 0, 5, 9, 10
_OP_OUTPUTS = 2
_OP_OPERANDS = ((1, "input"), (_OP_OUTPUTS, "output"), (8, "intermediate"))
_OPCODE_DEPRECATED_BUILTIN, _OPCODE_CUSTOM_CODE, _OPCODE_BUILTIN = 0, 1, 3

# Operators whose inputs may be omitted (index -1), and which inputs (None: any input after the first).
# An omitted input anywhere else is damage: LiteRT 2.3 dereferences it and dies of SIGSEGV (seen for
# RESHAPE input 1, TRANSPOSE input 0, and, with XNNPACK, DEPTHWISE_CONV_2D and FULLY_CONNECTED input 1).
# Codes from schema.fbs BuiltinOperator; bias inputs and the recurrent ops' optional weights and states.
_OMITTABLE_INPUTS: dict[int, frozenset[int] | None] = {
    3: frozenset({2}),  # CONV_2D: bias
    4: frozenset({2}),  # DEPTHWISE_CONV_2D: bias
    9: frozenset({2}),  # FULLY_CONNECTED: bias
    67: frozenset({3}),  # TRANSPOSE_CONV: bias
    132: frozenset({2}),  # CONV_3D: bias
    141: frozenset({3}),  # CONV_3D_TRANSPOSE: bias
    27: frozenset({3}),  # SVDF: bias
    16: None,  # LSTM
    24: None,  # RNN
    35: None,  # UNIDIRECTIONAL_SEQUENCE_RNN
    44: None,  # UNIDIRECTIONAL_SEQUENCE_LSTM
    46: None,  # BIDIRECTIONAL_SEQUENCE_RNN
    52: None,  # BIDIRECTIONAL_SEQUENCE_LSTM
    32: None,  # CUSTOM: the custom kernel decides
}
_I8 = struct.Struct("<b")
_I32 = struct.Struct("<i")
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2
_METADATA_NAME, _METADATA_BUFFER = 0, 1
_SIGNATURE_KEY, _SIGNATURE_SUBGRAPH = 2, 4
_SIGNATURE_MAPS = ((0, "input"), (1, "output"))
_TENSOR_MAP_NAME, _TENSOR_MAP_INDEX = 0, 1


def check_tflite(path: str | os.PathLike[str]) -> None:
    """Raise ``ArtifactError`` unless ``path`` is a structurally sound TFLite (LiteRT) FlatBuffer.

    Checked: the ``TFL3`` identifier; the root ``Model`` table and every table, vector
    and string the interpreter walks to build its graph (operator codes, subgraphs with
    their tensors, inputs, outputs and operators, tensor shapes, names and quantization
    vectors, buffers, metadata, signature defs) lie inside the file with consistent
    vtables; schema version 3; every tensor, operator-code, buffer and subgraph index is
    in range; no subgraph input or operator output is a constant tensor; data stored
    after the FlatBuffer (buffer and large custom options ``offset``/``size``, used by
    models over 2 GB) lies inside the file.
    Not checked: builtin options tables, sparsity parameters, tensor shapes and types
    against the operators (LiteRT checks those when it prepares each kernel).
    """
    path = Path(path)
    with map_file(path, "TFLite model") as buf:
        _check_tflite_buffer(buf, str(path))


def _check_tflite_buffer(buf: Buffer, name: str) -> None:
    size = len(buf)
    if size < 8:
        raise ArtifactError(f"{name} is not a TFLite model (only {size} bytes); the package holds the wrong file")
    if buf[4:8] != b"TFL3":
        raise ArtifactError(f"{name} is not a TFLite model (no TFL3 identifier); the package holds the wrong file")
    fb = FlatBufferReader(buf, name)
    root = fb.read(U32, 0, "root table offset")
    if not 8 <= root <= size - 4:
        fb.fail("the root table offset", f"{root} points outside the {size}-byte file")
    # Labels of everything below the root start at its fields ("subgraph 0 tensor 3").
    model = fb.table(root, "the root Model")._replace(what="")
    version = model.u32(_MODEL_VERSION, "version")
    if version != 3:
        raise ArtifactError(f"{name} has TFLite schema version {version}, not 3; {REBUILD} with a current converter")

    opcodes = model.required_vector(_MODEL_OPCODES, 4, "operator code")
    builtin_codes = []
    for opcode in opcodes.tables():
        opcode.string(_OPCODE_CUSTOM_CODE, "custom code")
        builtin_codes.append(_builtin_code(opcode))
    subgraphs = model.required_vector(_MODEL_SUBGRAPHS, 4, "subgraph")
    if subgraphs.length == 0:
        fb.fail("", "has no subgraph")
    buffers = model.required_vector(_MODEL_BUFFERS, 4, "buffer")
    filled = bytearray(buffers.length)  # 1 where the buffer holds data: its tensors are constants
    for index, buffer in enumerate(buffers.tables()):
        data = buffer.vector(_BUFFER_DATA, 1, "data")
        outside = _check_outside_data(buffer, _BUFFER_OFFSET, _BUFFER_SIZE)
        filled[index] = (data is not None and data.length > 0) or outside
    model.string(_MODEL_DESCRIPTION, "description")

    tensor_counts = [_check_subgraph(subgraph, builtin_codes, filled) for subgraph in subgraphs.tables()]

    metadata_buffers = model.vector(_MODEL_METADATA_BUFFER, 4, "metadata buffer")
    if metadata_buffers is not None:
        metadata_buffers.check_indices(0, buffers.length, "metadata buffer index")
    metadata = model.vector(_MODEL_METADATA, 4, "metadata")
    for entry in metadata.tables() if metadata is not None else ():
        entry.string(_METADATA_NAME, "name")
        _check_index(entry, _METADATA_BUFFER, "buffer", buffers.length)
    signatures = model.vector(_MODEL_SIGNATURES, 4, "signature def")
    for signature in signatures.tables() if signatures is not None else ():
        signature.string(_SIGNATURE_KEY, "key")
        subgraph = _check_index(signature, _SIGNATURE_SUBGRAPH, "subgraph", len(tensor_counts))
        for field, name in _SIGNATURE_MAPS:
            maps = signature.vector(field, 4, name)
            for tensor_map in maps.tables() if maps is not None else ():
                tensor_map.string(_TENSOR_MAP_NAME, "name")
                _check_index(tensor_map, _TENSOR_MAP_INDEX, "tensor", tensor_counts[subgraph])


def _check_index(table: FlatTable, field: int, name: str, count: int) -> int:
    """Return the uint index ``field`` of ``table``; raise unless it is below ``count``."""
    index = table.u32(field, name)
    if index >= count:
        table.reader.fail(table.what, f"refers to {name} {index}, but there are {count}")
    return index


def _check_outside_data(table: FlatTable, offset_field: int, size_field: int) -> bool:
    """Check data kept after the FlatBuffer; return whether the table keeps any there."""
    # schema.fbs: the offset "is only valid if > 1"; the data then lives after the FlatBuffer.
    offset = table.u64(offset_field, "offset")
    size = table.u64(size_field, "size")
    if offset > 1 and offset + size > table.reader.size:
        table.reader.fail(table.what, f"data ends at byte {offset + size} of a {table.reader.size}-byte file")
    return offset > 1 and size > 0


def _builtin_code(opcode: FlatTable) -> int:
    """The operator's builtin code: the larger of ``builtin_code`` and the older one-byte field (schema.fbs)."""
    deprecated = builtin = 0
    pos = opcode.field(_OPCODE_DEPRECATED_BUILTIN, 1, "deprecated builtin code")
    if pos is not None:
        deprecated = opcode.reader.read(_I8, pos, (opcode.what, "deprecated builtin code"))
    pos = opcode.field(_OPCODE_BUILTIN, 4, "builtin code")
    if pos is not None:
        builtin = opcode.reader.read(_I32, pos, (opcode.what, "builtin code"))
    return max(deprecated, builtin)


def _check_omitted_inputs(operator: FlatTable, code: int) -> None:
    """Raise unless every omitted (-1) input of ``operator`` is one its operator may omit."""
    inputs = operator.vector(1, 4, "input")
    if inputs is None or inputs.length == 0:
        return
    values = struct.unpack_from(f"<{inputs.length}i", operator.reader.buf, inputs.start)
    if -1 not in values:
        return
    allowed = _OMITTABLE_INPUTS.get(code, frozenset())
    for position, value in enumerate(values):
        omittable = position > 0 if allowed is None else position in allowed
        if value == -1 and not omittable:
            operator.reader.fail(
                operator.what, f"omits input {position}, which builtin operator {code} requires (the model is damaged)"
            )


def _check_subgraph(subgraph: FlatTable, builtin_codes: list[int], filled: bytearray) -> int:
    """Check one subgraph; return its number of tensors.

    Besides ranges: a subgraph input or an operator output must not be a constant tensor
    (one whose buffer holds data). Constants are mapped read-only from the model file;
    LiteRT writes a caller's input into it and dies of SIGSEGV (seen with a one-byte
    change to a real model). A constant operator output is caught by LiteRT when it
    prepares the kernel, but no converter writes one, so it is damage too.
    """
    tensors = subgraph.required_vector(_SUBGRAPH_TENSORS, 4, "tensor")
    inputs = subgraph.required_vector(_SUBGRAPH_INPUTS, 4, "input")
    outputs = subgraph.required_vector(_SUBGRAPH_OUTPUTS, 4, "output")
    operators = subgraph.required_vector(_SUBGRAPH_OPERATORS, 4, "operator")
    subgraph.string(_SUBGRAPH_NAME, "name")
    n_tensors = tensors.length
    constant = bytearray(n_tensors)
    for index, tensor in enumerate(tensors.tables()):
        tensor.vector(_TENSOR_SHAPE, 4, "shape")
        tensor.vector(_TENSOR_SHAPE_SIGNATURE, 4, "shape signature")
        tensor.string(_TENSOR_NAME, "name")
        constant[index] = filled[_check_index(tensor, _TENSOR_BUFFER, "buffer", len(filled))]
        quantization = tensor.table(_TENSOR_QUANTIZATION, "quantization")
        if quantization is not None:
            for field, elem_size, name in _QUANTIZATION_VECTORS:
                quantization.vector(field, elem_size, name)
    inputs.check_indices(0, n_tensors, (subgraph.what, "input tensor"), constant)
    outputs.check_indices(0, n_tensors, (subgraph.what, "output tensor"))

    for operator in operators.tables():
        opcode = _check_index(operator, _OP_OPCODE, "operator code", len(builtin_codes))
        for field, name in _OP_OPERANDS:
            operands = operator.vector(field, 4, name)
            if operands is not None:
                # -1 marks an omitted optional operand.
                written = constant if field == _OP_OUTPUTS else None
                operands.check_indices(-1, n_tensors, (operator.what, name, "tensor"), written)
        _check_omitted_inputs(operator, builtin_codes[opcode])
        operator.vector(_OP_CUSTOM_OPTIONS, 1, "custom options")
        _check_outside_data(operator, _OP_LARGE_CUSTOM_OFFSET, _OP_LARGE_CUSTOM_SIZE)
    return n_tensors
