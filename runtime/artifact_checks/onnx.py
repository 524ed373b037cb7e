"""Structural check of an ONNX ``ModelProto`` and its external data files: ``check_onnx``."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from edgeship.errors import ArtifactError
from edgeship.runtime.artifact_checks.model_file import REBUILD, Buffer, map_file
from edgeship.runtime.artifact_checks.protobuf import LENGTH_DELIMITED, MAX_STRING, VARINT, ProtoField, ProtoReader

# Field numbers from onnx/onnx.proto.
_MODEL_PROTO_IR_VERSION, _MODEL_PROTO_GRAPH, _MODEL_PROTO_OPSET_IMPORT = 1, 7, 8
_GRAPH_PROTO_INITIALIZER, _GRAPH_PROTO_OUTPUT, _GRAPH_PROTO_SPARSE_INITIALIZER = 5, 12, 15
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_PROTO_NAME, _TENSOR_PROTO_EXTERNAL_DATA, _TENSOR_PROTO_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
# Wire types of the fields walked; a writer never emits another.
_MODEL_PROTO_WIRE = {
    1: VARINT,
    2: LENGTH_DELIMITED,
    3: LENGTH_DELIMITED,
    4: LENGTH_DELIMITED,
    5: VARINT,
    6: LENGTH_DELIMITED,
    7: LENGTH_DELIMITED,
    8: LENGTH_DELIMITED,
    14: LENGTH_DELIMITED,
    20: LENGTH_DELIMITED,
    25: LENGTH_DELIMITED,
    26: LENGTH_DELIMITED,
}
_GRAPH_PROTO_WIRE = dict.fromkeys((1, 2, 5, 10, 11, 12, 13, 14, 15, 16), LENGTH_DELIMITED)


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
    with map_file(path, "ONNX model") as buf:
        _check_onnx_buffer(buf, path)


def _check_onnx_buffer(buf: Buffer, path: Path) -> None:
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
        pb.expect(tensor, LENGTH_DELIMITED, what)
        entries: dict[str, str] = {}
        location_kind = 0
        name: ProtoField | None = None
        for field in pb.fields(tensor.start, tensor.end, what):
            if field.number == _TENSOR_PROTO_NAME:
                name = field
            elif field.number == _TENSOR_PROTO_DATA_LOCATION:
                pb.expect(field, VARINT, f"{what} data_location")
                location_kind = field.value
            elif field.number == _TENSOR_PROTO_EXTERNAL_DATA:
                pb.expect(field, LENGTH_DELIMITED, f"{what} external_data")
                key = value = ""
                for part in pb.fields(field.start, field.end, f"{what} external_data entry"):
                    if part.number == _ENTRY_KEY:
                        key = pb.text(part, f"{what} external_data key")
                    elif part.number == _ENTRY_VALUE:
                        value = pb.text(part, f"{what} external_data value")
                entries[key] = value
        if location_kind == _EXTERNAL:
            if name is not None and name.wire_type == LENGTH_DELIMITED and name.value <= MAX_STRING:
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
                f"{name}: {what} keeps its data at {location!r}, which is not a relative path inside the model's directory; {REBUILD}"
            )
        numbers: dict[str, int] = {}
        for key in ("offset", "length"):
            text = entries.get(key)
            if text is None:
                continue
            if not (text.isascii() and text.isdigit() and len(text) <= 19):
                raise ArtifactError(
                    f"{name}: {what} has external data {key} {text!r}, not a non-negative integer; {REBUILD}"
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
                    f"{name}: {what} keeps its data in {location!r}, which is not a regular file inside the model's directory; {REBUILD}"
                )
            self._sizes[location] = info.st_size
        return self._sizes[location]
