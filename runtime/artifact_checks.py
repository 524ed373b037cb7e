"""Cheap structural checks of a model file, run before a native interpreter opens it.

LiteRT, ONNX Runtime and TensorRT parse model files in C++ and can crash the whole
process on a damaged one. A package whose signature and hashes are valid can still hold
a bad model (a buggy compiler, the wrong file packaged), so ``check_artifact`` looks at
the file's structure first, in pure Python (standard library only), and raises
``ArtifactError`` with one actionable line when something is off.

What the checks promise:

* Every read is bounds-checked against the file size, and no memory is allocated in
  proportion to a size field read from the file before that field was checked against
  the file size. Files are memory-mapped, never read whole.
* Work is proportional to the number of structures (tables, vectors, protobuf fields),
  not to the bytes of weights; a FlatBuffer whose tables refer to the same bytes over
  and over is refused once the references outnumber a quarter of the file's bytes.
* The only exception raised on a bad file is ``ArtifactError``. A file that passes is
  well-formed enough for the native parser to read without going out of bounds; it is
  not proven to compute anything sensible (that is what the golden vectors are for).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from edgeship.errors import ArtifactError

__all__ = ["check_artifact", "check_mlpackage", "check_onnx", "check_tflite"]

_Buffer = bytes | mmap.mmap
_REBUILD = "re-export the model and rebuild the package"


def check_artifact(fmt: str, path: str | os.PathLike[str]) -> None:
    """Raise ``ArtifactError`` unless ``path`` looks like a well-formed artifact of format ``fmt``.

    ``fmt`` is a manifest format: ``"tflite"``, ``"onnx"``, ``"tensorrt-onnx"`` (checked as
    ONNX: the device builds the engine from it) or ``"coreml"`` (an ``.mlpackage``
    directory). An unknown format is refused with ``ArtifactError`` too. The message is
    one line: what is wrong, which file, what to do.
    """
    check = _CHECKS.get(fmt)
    if check is None:
        raise ArtifactError(f"{os.fspath(path)}: unknown artifact format {fmt!r} (known: {', '.join(sorted(_CHECKS))})")
    check(Path(path))


# --------------------------------------------------------------------------- files


@contextmanager
def _mapped(path: Path, kind: str) -> Iterator[_Buffer]:
    """Yield the read-only bytes of the regular file ``path`` (memory-mapped; ``b""`` when empty).

    Opened non-blocking so that a FIFO planted in place of the model cannot hang the check.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot open the {kind} ({exc.strerror}); the package is incomplete") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{path} is not a regular file, so not a {kind}; the package holds the wrong file")
        if info.st_size == 0:
            yield b""
            return
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError, OverflowError) as exc:
            raise ArtifactError(
                f"{path}: cannot map the {kind} into memory ({exc}); free memory or address space"
            ) from exc
        with mapped:
            yield mapped
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- FlatBuffers

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_VTABLE_HEAD = struct.Struct("<HH")
_INT_CHUNK = 1 << 14  # vector elements unpacked at a time: bounds the memory of an index scan
_MAX_UOFFSET = 1 << 31  # FlatBuffers are at most 2 GiB; a larger offset is damage

_What = str | tuple[object, ...]
"""What a read is about, for the error message: a string, or parts joined by spaces.

Messages are built only when a check fails: the walk visits every tensor and operator,
and formatting a label for each read would cost more than the read.
"""


def _label(what: _What) -> str:
    if isinstance(what, str):
        return what
    parts = (_label(part) if isinstance(part, tuple) else str(part) for part in what)
    return " ".join(part for part in parts if part)


class FlatBufferReader:
    """Bounds-checked, alignment-checked reads from a FlatBuffer held in ``buf``.

    Every method raises ``ArtifactError`` (``"<name> is truncated or damaged: <what> ..."``)
    instead of reading outside the buffer. Alignment is required as the FlatBuffers
    verifier requires it. Table visits and unpacked vector elements are charged against
    a budget of a quarter of the buffer size (plus a constant): a well-formed FlatBuffer
    cannot need more, since each table and element occupies four bytes of its own, so
    running out means tables alias each other and walking them would take quadratic time.
    """

    def __init__(self, buf: _Buffer, name: str) -> None:
        self.buf = buf
        self.name = name
        self.size = len(buf)
        self._budget = self.size // 4 + 1024

    def fail(self, what: _What, problem: str) -> NoReturn:
        raise ArtifactError(f"{self.name} is truncated or damaged: {_label(what) or 'the model'} {problem}; {_REBUILD}")

    def charge(self, units: int) -> None:
        self._budget -= units
        if self._budget < 0:
            self.fail("its tables", f"refer to the same bytes over and over (over {self.size // 4 + 1024} references)")

    def read(self, fmt: struct.Struct, pos: int, what: _What) -> int:
        """Return the little-endian integer of format ``fmt`` at ``pos`` (inside the buffer and aligned)."""
        if pos < 0 or pos + fmt.size > self.size:
            self.fail(what, f"at byte {pos} lies outside the {self.size}-byte file")
        if pos % fmt.size:
            self.fail(what, f"at byte {pos} is not {fmt.size}-byte aligned")
        value: int = fmt.unpack_from(self.buf, pos)[0]
        return value

    def follow(self, pos: int, what: _What) -> int:
        """Return the position the (non-zero, forward) ``uoffset`` stored at ``pos`` points to."""
        offset = self.read(_U32, pos, (what, "offset"))
        if offset == 0 or offset >= _MAX_UOFFSET:
            self.fail(what, f"offset at byte {pos} is {offset}")
        return pos + offset

    def table(self, pos: int, what: _What) -> FlatTable:
        """Return the table at ``pos`` once it and its vtable are inside the file and consistent."""
        self.charge(1)
        vtable = pos - self.read(_I32, pos, (what, "table"))
        if vtable < 0 or vtable + 4 > self.size or vtable % 2:
            self.fail(what, f"vtable at byte {vtable} lies outside the {self.size}-byte file or is misaligned")
        vtable_size, table_size = _VTABLE_HEAD.unpack_from(self.buf, vtable)
        if vtable_size < 4 or vtable_size % 2 or vtable + vtable_size > self.size:
            self.fail(what, f"vtable at byte {vtable} has size {vtable_size}")
        if table_size < 4:
            self.fail(what, f"table at byte {pos} claims an inline size of {table_size} bytes")
        if pos + table_size > self.size:
            self.fail(what, f"table at byte {pos} ends at byte {pos + table_size} of a {self.size}-byte file")
        return FlatTable(self, pos, vtable, vtable_size, table_size, what)

    def vector(self, pos: int, elem_size: int, what: _What) -> FlatVector:
        """Return the vector whose length field is at ``pos``, once all of it is inside the file."""
        length = self.read(_U32, pos, (what, "vector length"))
        end = pos + 4 + length * elem_size
        if end > self.size:
            self.fail(what, f"vector ends at byte {end} of a {self.size}-byte file")
        return FlatVector(self, pos + 4, length, elem_size, what)

    def string(self, pos: int, what: _What) -> None:
        """Check the string whose length field is at ``pos``: inside the file and NUL-terminated."""
        chars = self.vector(pos, 1, what)
        end = chars.start + chars.length
        if end >= self.size or self.buf[end] != 0:
            self.fail(what, f"string at byte {pos} is not NUL-terminated inside the file")


class FlatVector(NamedTuple):
    """A vector known to lie inside the file: ``length`` elements of ``elem_size`` bytes from ``start``."""

    reader: FlatBufferReader
    start: int
    length: int
    elem_size: int
    what: _What

    def table(self, index: int) -> FlatTable:
        """Return table ``index`` of a vector of tables."""
        what = (self.what, index)
        return self.reader.table(self.reader.follow(self.start + 4 * index, what), what)

    def tables(self) -> Iterator[FlatTable]:
        for index in range(self.length):
            yield self.table(index)

    def check_indices(self, low: int, high: int, what: _What, constant: bytearray | None = None) -> None:
        """Raise unless every element of this int32 vector is in ``[low, high)`` and, when
        ``constant`` is given, names no tensor that ``constant`` flags (non-negative elements only).
        """
        reader = self.reader
        reader.charge(self.length)
        for first in range(0, self.length, _INT_CHUNK):
            count = min(_INT_CHUNK, self.length - first)
            values = struct.unpack_from(f"<{count}i", reader.buf, self.start + 4 * first)
            if min(values) < low or max(values) >= high:
                bad = next(value for value in values if not low <= value < high)
                reader.fail(what, f"{bad} is out of range [{low}, {high})")
            if constant is not None:
                for value in values:
                    if value >= 0 and constant[value]:
                        reader.fail(what, f"{value} is a constant (its buffer holds data), which cannot be written")


class FlatTable(NamedTuple):
    """A table whose vtable was checked; each field read checks the field against the table size."""

    reader: FlatBufferReader
    pos: int
    vtable: int
    vtable_size: int
    table_size: int
    what: _What

    def field(self, index: int, size: int, name: str) -> int | None:
        """Return the position of field ``index`` (``size`` bytes, aligned), or None when absent."""
        entry = 4 + 2 * index
        if entry >= self.vtable_size:
            return None
        offset: int = _U16.unpack_from(self.reader.buf, self.vtable + entry)[0]
        if offset == 0:
            return None
        if offset < 4 or offset + size > self.table_size:
            self.reader.fail((self.what, name), f"at offset {offset} lies outside its {self.table_size}-byte table")
        pos = self.pos + offset
        if pos % size:
            self.reader.fail((self.what, name), f"at byte {pos} is not {size}-byte aligned")
        return pos

    def u32(self, index: int, name: str, default: int = 0) -> int:
        pos = self.field(index, 4, name)
        return default if pos is None else self.reader.read(_U32, pos, (self.what, name))

    def u64(self, index: int, name: str, default: int = 0) -> int:
        pos = self.field(index, 8, name)
        return default if pos is None else self.reader.read(_U64, pos, (self.what, name))

    def vector(self, index: int, elem_size: int, name: str) -> FlatVector | None:
        pos = self.field(index, 4, name)
        if pos is None:
            return None
        what = (self.what, name)
        return self.reader.vector(self.reader.follow(pos, what), elem_size, what)

    def required_vector(self, index: int, elem_size: int, name: str) -> FlatVector:
        vector = self.vector(index, elem_size, name)
        if vector is None:
            self.reader.fail(self.what, f"has no {name} vector")
        return vector

    def table(self, index: int, name: str) -> FlatTable | None:
        pos = self.field(index, 4, name)
        if pos is None:
            return None
        what = (self.what, name)
        return self.reader.table(self.reader.follow(pos, what), what)

    def string(self, index: int, name: str) -> None:
        pos = self.field(index, 4, name)
        if pos is not None:
            what = (self.what, name)
            self.reader.string(self.reader.follow(pos, what), what)


# Field indices from tensorflow/compiler/mlir/lite/schema/schema.fbs.
_MODEL_VERSION, _MODEL_OPCODES, _MODEL_SUBGRAPHS, _MODEL_DESCRIPTION, _MODEL_BUFFERS = 0, 1, 2, 3, 4
_MODEL_METADATA_BUFFER, _MODEL_METADATA, _MODEL_SIGNATURES = 5, 6, 7
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS, _SUBGRAPH_OPERATORS, _SUBGRAPH_NAME = 0, 1, 2, 3, 4
_TENSOR_SHAPE, _TENSOR_BUFFER, _TENSOR_NAME, _TENSOR_QUANTIZATION, _TENSOR_SHAPE_SIGNATURE = 0, 2, 3, 4, 7
_QUANTIZATION_VECTORS = ((0, 4, "quantization min"), (1, 4, "quantization max"), (2, 4, "scale"), (3, 8, "zero point"))
_OP_OPCODE, _OP_CUSTOM_OPTIONS, _OP_LARGE_CUSTOM_OFFSET, _OP_LARGE_CUSTOM_SIZE = 0, 5, 9, 10
_OP_OUTPUTS = 2
_OP_OPERANDS = ((1, "input"), (_OP_OUTPUTS, "output"), (8, "intermediate"))
_OPCODE_CUSTOM_CODE = 1
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
    with _mapped(path, "TFLite model") as buf:
        _check_tflite_buffer(buf, str(path))


def _check_tflite_buffer(buf: _Buffer, name: str) -> None:
    size = len(buf)
    if size < 8:
        raise ArtifactError(f"{name} is not a TFLite model (only {size} bytes); the package holds the wrong file")
    if buf[4:8] != b"TFL3":
        raise ArtifactError(f"{name} is not a TFLite model (no TFL3 identifier); the package holds the wrong file")
    fb = FlatBufferReader(buf, name)
    root = fb.read(_U32, 0, "root table offset")
    if not 8 <= root <= size - 4:
        fb.fail("the root table offset", f"{root} points outside the {size}-byte file")
    # Labels of everything below the root start at its fields ("subgraph 0 tensor 3").
    model = fb.table(root, "the root Model")._replace(what="")
    version = model.u32(_MODEL_VERSION, "version")
    if version != 3:
        raise ArtifactError(f"{name} has TFLite schema version {version}, not 3; {_REBUILD} with a current converter")

    opcodes = model.required_vector(_MODEL_OPCODES, 4, "operator code")
    for opcode in opcodes.tables():
        opcode.string(_OPCODE_CUSTOM_CODE, "custom code")
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

    tensor_counts = [_check_subgraph(subgraph, opcodes.length, filled) for subgraph in subgraphs.tables()]

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


def _check_subgraph(subgraph: FlatTable, n_opcodes: int, filled: bytearray) -> int:
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
        _check_index(operator, _OP_OPCODE, "operator code", n_opcodes)
        for field, name in _OP_OPERANDS:
            operands = operator.vector(field, 4, name)
            if operands is not None:
                # -1 marks an omitted optional operand.
                written = constant if field == _OP_OUTPUTS else None
                operands.check_indices(-1, n_tensors, (operator.what, name, "tensor"), written)
        operator.vector(_OP_CUSTOM_OPTIONS, 1, "custom options")
        _check_outside_data(operator, _OP_LARGE_CUSTOM_OFFSET, _OP_LARGE_CUSTOM_SIZE)
    return n_tensors


# --------------------------------------------------------------------------- protobuf

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_MAX_STRING = 4096  # external-data keys and values are short; longer ones are damage


class ProtoField(NamedTuple):
    """One field of a protobuf message: ``value`` is the varint/fixed value, or the payload length."""

    number: int
    wire_type: int
    value: int
    start: int  # first byte of the payload (of the tag, for varints)
    end: int  # first byte after the field


class ProtoReader:
    """Bounds-checked walk over protobuf wire format in ``buf``; raises ``ArtifactError`` naming ``kind``."""

    def __init__(self, buf: _Buffer, name: str, kind: str) -> None:
        self.buf = buf
        self.name = name
        self.kind = kind
        self.size = len(buf)

    def fail(self, what: str) -> NoReturn:
        raise ArtifactError(
            f"{self.name} is not a well-formed {self.kind}: {what}; the file is truncated, damaged or of another format; {_REBUILD}"
        )

    def varint(self, pos: int, end: int, what: str) -> tuple[int, int]:
        """Return ``(value, next position)`` of the varint at ``pos`` (at most 10 bytes, 64 bits, before ``end``)."""
        buf = self.buf
        result = 0
        for i in range(10):
            if pos + i >= end:
                self.fail(f"a varint at byte {pos} in {what} runs past its end at byte {end}")
            byte = buf[pos + i]
            result |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                break
        # The tenth byte holds only bit 63: anything more is a longer varint or an overflow.
        if byte > 1 and i == 9:
            self.fail(f"a varint at byte {pos} in {what} is longer than 10 bytes or overflows 64 bits")
        return result, pos + i + 1

    def fields(self, start: int, end: int, what: str) -> Iterator[ProtoField]:
        """Yield the fields of the message in ``buf[start:end]``; raise unless they tile it exactly."""
        pos = start
        while pos < end:
            tag, after_tag = self.varint(pos, end, what)
            number, wire_type = tag >> 3, tag & 7
            if number == 0 or tag >= 1 << 32:
                self.fail(f"field number {number} at byte {pos} in {what} is invalid")
            if wire_type == _VARINT:
                value, nxt = self.varint(after_tag, end, what)
                yield ProtoField(number, wire_type, value, pos, nxt)
                pos = nxt
                continue
            if wire_type == _LENGTH_DELIMITED:
                value, payload = self.varint(after_tag, end, what)
                nxt = payload + value
            elif wire_type in (_FIXED64, _FIXED32):
                payload = after_tag
                nxt = payload + (8 if wire_type == _FIXED64 else 4)
            else:
                self.fail(f"field {number} at byte {pos} in {what} has wire type {wire_type} (a group or undefined)")
            if nxt > end:
                self.fail(f"field {number} at byte {pos} in {what} ends at byte {nxt}, past the end at byte {end}")
            if wire_type != _LENGTH_DELIMITED:
                value = int.from_bytes(self.buf[payload:nxt], "little")
            yield ProtoField(number, wire_type, value, payload, nxt)
            pos = nxt

    def expect(self, field: ProtoField, wire_type: int, what: str) -> None:
        if field.wire_type != wire_type:
            self.fail(f"{what} (field {field.number}) has wire type {field.wire_type}, expected {wire_type}")

    def text(self, field: ProtoField, what: str) -> str:
        self.expect(field, _LENGTH_DELIMITED, what)
        if field.value > _MAX_STRING:
            self.fail(f"{what} is {field.value} bytes long")
        try:
            return bytes(self.buf[field.start : field.end]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {field.start} is not UTF-8")


# Field numbers from onnx/onnx.proto.
_MODEL_PROTO_IR_VERSION, _MODEL_PROTO_GRAPH, _MODEL_PROTO_OPSET_IMPORT = 1, 7, 8
_GRAPH_PROTO_INITIALIZER, _GRAPH_PROTO_OUTPUT, _GRAPH_PROTO_SPARSE_INITIALIZER = 5, 12, 15
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_PROTO_NAME, _TENSOR_PROTO_EXTERNAL_DATA, _TENSOR_PROTO_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
# Wire types of the fields walked; a writer never emits another.
_MODEL_PROTO_WIRE = {
    1: _VARINT,
    2: _LENGTH_DELIMITED,
    3: _LENGTH_DELIMITED,
    4: _LENGTH_DELIMITED,
    5: _VARINT,
    6: _LENGTH_DELIMITED,
    7: _LENGTH_DELIMITED,
    8: _LENGTH_DELIMITED,
    14: _LENGTH_DELIMITED,
    20: _LENGTH_DELIMITED,
    25: _LENGTH_DELIMITED,
    26: _LENGTH_DELIMITED,
}
_GRAPH_PROTO_WIRE = dict.fromkeys((1, 2, 5, 10, 11, 12, 13, 14, 15, 16), _LENGTH_DELIMITED)


def check_onnx(path: str | os.PathLike[str]) -> None:
    """Raise ``ArtifactError`` unless ``path`` is a structurally sound ONNX ``ModelProto``.

    Checked: the protobuf wire format of the model message and of its graph (valid tags
    and wire types, varints of at most 10 bytes, every length-delimited field inside its
    message, each message ending exactly where its bytes end); ``ir_version``, a graph
    and at least one opset import are present; the graph has at least one output; every
    initializer (and sparse initializer) stored as external data names a relative file
    next to the model, inside its directory, that holds ``offset + length`` bytes.
    Not checked: nodes, attributes, value infos and subgraphs beyond their wire format,
    and tensors embedded in node attributes.
    """
    path = Path(path)
    with _mapped(path, "ONNX model") as buf:
        _check_onnx_buffer(buf, path)


def _check_onnx_buffer(buf: _Buffer, path: Path) -> None:
    pb = ProtoReader(buf, str(path), "ONNX model")
    ir_version: int | None = None
    graph: ProtoField | None = None
    opsets = 0
    for field in pb.fields(0, pb.size, "the model"):
        expected = _MODEL_PROTO_WIRE.get(field.number)
        if expected is not None:
            pb.expect(field, expected, f"model field {field.number}")
        if field.number == _MODEL_PROTO_IR_VERSION:
            ir_version = field.value
        elif field.number == _MODEL_PROTO_GRAPH:
            if graph is not None:
                pb.fail(f"the model holds a second graph at byte {field.start}")
            graph = field
        elif field.number == _MODEL_PROTO_OPSET_IMPORT:
            opsets += 1
            for _ in pb.fields(field.start, field.end, f"opset import {opsets}"):
                pass
    if not ir_version:
        pb.fail("it has no ir_version")
    if graph is None:
        pb.fail("it has no graph")
    if opsets == 0:
        pb.fail("it has no opset_import")

    external = _ExternalData(pb, path.parent)
    outputs = 0
    for field in pb.fields(graph.start, graph.end, "the graph"):
        expected = _GRAPH_PROTO_WIRE.get(field.number)
        if expected is not None:
            pb.expect(field, expected, f"graph field {field.number}")
        if field.number == _GRAPH_PROTO_OUTPUT:
            outputs += 1
        elif field.number == _GRAPH_PROTO_INITIALIZER:
            external.check_tensor(field, f"initializer at byte {field.start}")
        elif field.number == _GRAPH_PROTO_SPARSE_INITIALIZER:
            for part in pb.fields(field.start, field.end, f"sparse initializer at byte {field.start}"):
                if part.number in (_SPARSE_VALUES, _SPARSE_INDICES):
                    external.check_tensor(part, f"sparse initializer part at byte {part.start}")
    if outputs == 0:
        pb.fail("its graph has no output")


class _ExternalData:
    """Checks ``TensorProto`` external-data references against the files next to the model."""

    def __init__(self, pb: ProtoReader, directory: Path) -> None:
        self.pb = pb
        self.directory = directory
        self._sizes: dict[str, int] = {}

    def check_tensor(self, tensor: ProtoField, what: str) -> None:
        pb = self.pb
        pb.expect(tensor, _LENGTH_DELIMITED, what)
        entries: dict[str, str] = {}
        location_kind = 0
        name: ProtoField | None = None
        for field in pb.fields(tensor.start, tensor.end, what):
            if field.number == _TENSOR_PROTO_NAME:
                name = field
            elif field.number == _TENSOR_PROTO_DATA_LOCATION:
                pb.expect(field, _VARINT, f"{what} data_location")
                location_kind = field.value
            elif field.number == _TENSOR_PROTO_EXTERNAL_DATA:
                pb.expect(field, _LENGTH_DELIMITED, f"{what} external_data")
                key = value = ""
                for part in pb.fields(field.start, field.end, f"{what} external_data entry"):
                    if part.number == _ENTRY_KEY:
                        key = pb.text(part, f"{what} external_data key")
                    elif part.number == _ENTRY_VALUE:
                        value = pb.text(part, f"{what} external_data value")
                entries[key] = value
        if location_kind == _EXTERNAL:
            if name is not None and name.wire_type == _LENGTH_DELIMITED and name.value <= _MAX_STRING:
                what = (
                    f"{what.split(' at byte')[0]} {bytes(pb.buf[name.start : name.end]).decode('utf-8', 'replace')!r}"
                )
            self._check_reference(entries, what)

    def _check_reference(self, entries: Mapping[str, str], what: str) -> None:
        name = self.pb.name
        location = entries.get("location", "")
        parts = location.replace("\\", "/").split("/")
        if (
            not location
            or location.startswith(("/", "\\"))
            or (len(location) > 1 and location[1] == ":")
            or ".." in parts
            or "\x00" in location
        ):
            raise ArtifactError(
                f"{name}: {what} keeps its data at {location!r}, which is not a relative path inside the model's directory; {_REBUILD}"
            )
        numbers: dict[str, int] = {}
        for key in ("offset", "length"):
            text = entries.get(key)
            if text is None:
                continue
            if not (text.isascii() and text.isdigit() and len(text) <= 19):
                raise ArtifactError(
                    f"{name}: {what} has external data {key} {text!r}, not a non-negative integer; {_REBUILD}"
                )
            numbers[key] = int(text)
        size = self._file_size(location, what)
        end = numbers.get("offset", 0) + numbers.get("length", 0)
        if end > size:
            raise ArtifactError(
                f"{name}: {what} needs bytes up to {end} of {location!r}, which holds {size}; the package is incomplete or damaged"
            )

    def _file_size(self, location: str, what: str) -> int:
        if location not in self._sizes:
            name = self.pb.name
            target = self.directory / location
            try:
                inside = target.resolve().is_relative_to(self.directory.resolve())
                info = target.stat()
            except (OSError, RuntimeError) as exc:
                raise ArtifactError(
                    f"{name}: {what} keeps its data in {location!r}, which is missing ({exc}); the package is incomplete"
                ) from exc
            if not inside or not stat.S_ISREG(info.st_mode):
                raise ArtifactError(
                    f"{name}: {what} keeps its data in {location!r}, which is not a regular file inside the model's directory; {_REBUILD}"
                )
            self._sizes[location] = info.st_size
        return self._sizes[location]


# --------------------------------------------------------------------------- Core ML

_MAX_MANIFEST_BYTES = 1 << 20
_MAX_PACKAGE_ENTRIES = 10_000  # a real .mlpackage holds a handful of files


def check_mlpackage(path: str | os.PathLike[str]) -> None:
    """Raise ``ArtifactError`` unless ``path`` is a structurally sound Core ML ``.mlpackage`` directory.

    Checked: a directory of only directories and regular files (no symlinks, devices or
    FIFOs, at most 10000 entries); ``Manifest.json`` is a JSON object whose
    ``itemInfoEntries`` paths are relative and stay inside ``Data/``, and whose
    ``rootModelIdentifier`` entry names a non-empty model spec there; the spec's
    top-level protobuf wire format is sound and has a ``specificationVersion``.
    Not checked: the ML program inside the spec, and the weight files.
    """
    path = Path(path)
    name = str(path)
    try:
        info = path.lstat()
    except OSError as exc:
        raise ArtifactError(
            f"{name}: cannot find the Core ML package ({exc.strerror}); the package is incomplete"
        ) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ArtifactError(f"{name} is not a Core ML .mlpackage directory; the package holds the wrong file")
    _check_tree(path)
    manifest = _read_manifest(path / "Manifest.json", name)
    entries = manifest.get("itemInfoEntries")
    root_id = manifest.get("rootModelIdentifier")
    if not isinstance(entries, dict) or not isinstance(root_id, str) or not isinstance(entries.get(root_id), dict):
        raise ArtifactError(f"{name}: Manifest.json lacks itemInfoEntries or its rootModelIdentifier entry; {_REBUILD}")
    for entry in entries.values():
        item = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(item, str) or not _is_safe_relative(item):
            raise ArtifactError(
                f"{name}: Manifest.json lists item path {item!r}, not a relative path inside Data/; {_REBUILD}"
            )
    spec = path / "Data" / entries[root_id]["path"]
    try:
        spec_info = spec.lstat()
    except OSError as exc:
        raise ArtifactError(
            f"{name}: the root model spec Data/{entries[root_id]['path']} is missing; {_REBUILD}"
        ) from exc
    if not stat.S_ISREG(spec_info.st_mode) or spec_info.st_size == 0:
        raise ArtifactError(f"{name}: the root model spec {spec} is empty or not a regular file; {_REBUILD}")
    with _mapped(spec, "Core ML model spec") as buf:
        pb = ProtoReader(buf, str(spec), "Core ML model spec")
        versions = [field for field in pb.fields(0, pb.size, "the spec") if field.number == 1]
        if not versions or versions[-1].wire_type != _VARINT or versions[-1].value == 0:
            pb.fail("it has no specificationVersion")


def _check_tree(root: Path) -> None:
    def refuse(error: OSError) -> NoReturn:
        raise ArtifactError(f"{root}: cannot list the Core ML package ({error}); the package is incomplete") from error

    count = 0
    for directory, dirnames, filenames in os.walk(root, onerror=refuse, followlinks=False):
        for entry in (*dirnames, *filenames):
            count += 1
            if count > _MAX_PACKAGE_ENTRIES:
                raise ArtifactError(
                    f"{root} holds more than {_MAX_PACKAGE_ENTRIES} files; a Core ML package holds a handful"
                )
            full = os.path.join(directory, entry)
            try:
                mode = os.lstat(full).st_mode
            except OSError as exc:
                refuse(exc)
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "a special file"
                relative = os.path.relpath(full, root)
                raise ArtifactError(
                    f"{root} contains {kind} {relative!r}; a Core ML package holds only directories and regular files; {_REBUILD}"
                )


def _read_manifest(manifest: Path, name: str) -> dict[str, Any]:
    try:
        info = manifest.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_MANIFEST_BYTES:
            raise ArtifactError(
                f"{name}: Manifest.json is not a regular file of at most {_MAX_MANIFEST_BYTES} bytes; {_REBUILD}"
            )
        with manifest.open("rb") as f:
            document = json.loads(f.read(_MAX_MANIFEST_BYTES + 1))
    except OSError as exc:
        raise ArtifactError(
            f"{name} has no readable Manifest.json ({exc.strerror}); it is not a complete Core ML package"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{name}: Manifest.json is not valid JSON ({exc}); {_REBUILD}") from exc
    if not isinstance(document, dict):
        raise ArtifactError(f"{name}: Manifest.json is not a JSON object; {_REBUILD}")
    return document


def _is_safe_relative(item: str) -> bool:
    if "\\" in item or "\x00" in item:
        return False
    return all(part not in ("", ".", "..") for part in item.split("/"))


_CHECKS: dict[str, Callable[[Path], None]] = {
    "tflite": check_tflite,
    "onnx": check_onnx,
    "tensorrt-onnx": check_onnx,
    "coreml": check_mlpackage,
}
