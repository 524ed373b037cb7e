"""Structural checks of model files: real artifacts pass; damaged, truncated or wrong ones are refused.

The artifacts are real: a tiny CNN converted by litert_torch, torch.onnx (with and without
external data) and coremltools. Damage is made with the formats' own tools (the TFLite
object API, the onnx package) where it has to stay otherwise well-formed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeship.errors import ArtifactError, PackageError
from edgeship.runtime.artifact_checks import check_artifact, check_mlpackage, check_onnx, check_tflite
from edgeship.runtime.package.manifest import FORMATS

# --------------------------------------------------------------------------- real artifacts


def _tiny_cnn() -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)

    class TinyCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    return TinyCNN().eval(), torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with m.tflite, m.onnx, ext/model.onnx (+ model.onnx.data) and m.mlpackage."""
    import torch

    root = tmp_path_factory.mktemp("artifacts")
    model, x = _tiny_cnn()
    torch.onnx.export(model, (x,), root / "m.onnx", dynamo=True, external_data=False)
    (root / "ext").mkdir()
    torch.onnx.export(model, (x,), root / "ext/model.onnx", dynamo=True, external_data=True)
    assert (root / "ext/model.onnx.data").stat().st_size > 0

    import litert_torch

    litert_torch.convert(model, (x,)).export(str(root / "m.tflite"))

    import coremltools as ct

    mlmodel = ct.convert(
        torch.jit.trace(model, x),
        inputs=[ct.TensorType(shape=x.shape)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
    )
    mlmodel.save(str(root / "m.mlpackage"))
    return root


@pytest.fixture(scope="module")
def tflite_bytes(built: Path) -> bytes:
    return (built / "m.tflite").read_bytes()


@pytest.fixture(scope="module")
def onnx_bytes(built: Path) -> bytes:
    return (built / "m.onnx").read_bytes()


def _refused(check: Callable[[Path], None], path: Path) -> str:
    """Run ``check`` and return the ArtifactError message (which must be one line naming the file)."""
    with pytest.raises(ArtifactError) as info:
        check(path)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    return message


@pytest.mark.parametrize(
    ("fmt", "relative"),
    [
        ("tflite", "m.tflite"),
        ("onnx", "m.onnx"),
        ("onnx", "ext/model.onnx"),
        ("tensorrt-onnx", "m.onnx"),
        ("coreml", "m.mlpackage"),
    ],
)
def test_real_artifacts_pass(built: Path, fmt: str, relative: str):
    check_artifact(fmt, built / relative)


def test_artifact_error_is_a_package_error():
    assert issubclass(ArtifactError, PackageError)


def test_every_manifest_format_has_a_check(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for fmt in FORMATS:
        message = _refused(lambda p, fmt=fmt: check_artifact(fmt, p), empty)
        assert "unknown artifact format" not in message


def test_unknown_format_is_refused(built: Path):
    with pytest.raises(ArtifactError, match="unknown artifact format 'gguf'"):
        check_artifact("gguf", built / "m.tflite")


def test_missing_file_is_refused(tmp_path: Path):
    _refused(check_tflite, tmp_path / "model.tflite")
    _refused(check_onnx, tmp_path / "model.onnx")
    _refused(check_mlpackage, tmp_path / "model.mlpackage")


# --------------------------------------------------------------------------- wrong files


def _png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b"")
    )


WRONG_CONTENTS = {
    "empty": b"",
    "png": _png(),
    "random": np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "zeros": bytes(4096),
    "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n",
}


@pytest.mark.py310
@pytest.mark.parametrize("kind", sorted(WRONG_CONTENTS))
@pytest.mark.parametrize("check", [check_tflite, check_onnx], ids=["tflite", "onnx"])
def test_wrong_file_contents_are_refused(tmp_path: Path, kind: str, check: Callable[[Path], None]):
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(WRONG_CONTENTS[kind])
    _refused(check, path)


def test_onnx_checked_as_tflite_is_refused(built: Path):
    assert "no TFL3 identifier" in _refused(check_tflite, built / "m.onnx")


def test_tflite_checked_as_onnx_is_refused(built: Path):
    _refused(check_onnx, built / "m.tflite")


def test_coreml_spec_checked_as_onnx_is_refused(built: Path):
    _refused(check_onnx, built / "m.mlpackage/Data/com.apple.CoreML/model.mlmodel")


def test_file_checked_as_mlpackage_and_directory_checked_as_tflite_are_refused(built: Path):
    assert "not a Core ML .mlpackage directory" in _refused(check_mlpackage, built / "m.tflite")
    assert "not a regular file" in _refused(check_tflite, built / "m.mlpackage")


@pytest.mark.py310
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_place_of_the_model_is_refused_without_blocking(tmp_path: Path):
    fifo = tmp_path / "model.tflite"
    os.mkfifo(fifo)
    assert "not a regular file" in _refused(check_tflite, fifo)


# --------------------------------------------------------------------------- truncation

CUTS = [0.1, 0.5, 0.9, "minus-one", 0, 4, 7]


def _cut(data: bytes, cut: float | str) -> bytes:
    if cut == "minus-one":
        return data[:-1]
    return data[: int(len(data) * cut)] if isinstance(cut, float) else data[:cut]


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_tflite_is_refused(tmp_path: Path, tflite_bytes: bytes, cut: float | str):
    path = tmp_path / "model.tflite"
    path.write_bytes(_cut(tflite_bytes, cut))
    _refused(check_tflite, path)


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_onnx_is_refused(tmp_path: Path, onnx_bytes: bytes, cut: float | str):
    path = tmp_path / "model.onnx"
    path.write_bytes(_cut(onnx_bytes, cut))
    _refused(check_onnx, path)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, "minus-one"])
def test_truncated_coreml_spec_is_refused(tmp_path: Path, built: Path, cut: float | str):
    package = shutil.copytree(built / "m.mlpackage", tmp_path / "m.mlpackage")
    spec = package / "Data/com.apple.CoreML/model.mlmodel"
    spec.write_bytes(_cut(spec.read_bytes(), cut))
    _refused(check_mlpackage, package)


# --------------------------------------------------------------------------- damaged TFLite


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def _write(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


def _vector_length_field(table: Any, vtable_offset: int) -> int:
    """Byte position of the length of the vector field at ``vtable_offset`` of a generated-code table."""
    return int(table._tab.Vector(table._tab.Offset(vtable_offset))) - 4


def test_changed_identifier_is_refused(tmp_path: Path, tflite_bytes: bytes):
    data = bytearray(tflite_bytes)
    data[4:8] = b"TFL2"
    assert "no TFL3 identifier" in _refused(check_tflite, _write(tmp_path / "m.tflite", data))


def test_root_offset_past_the_end_is_refused(tmp_path: Path, tflite_bytes: bytes):
    data = bytearray(tflite_bytes)
    data[0:4] = struct.pack("<I", len(data) + 100)
    assert "root table offset" in _refused(check_tflite, _write(tmp_path / "m.tflite", data))


def test_root_vtable_outside_the_file_is_refused(tmp_path: Path, tflite_bytes: bytes):
    data = bytearray(tflite_bytes)
    root = struct.unpack_from("<I", data, 0)[0]
    data[root : root + 4] = struct.pack("<i", -(len(data) + 64))
    assert "vtable" in _refused(check_tflite, _write(tmp_path / "m.tflite", data))


def test_huge_subgraph_tensor_vector_length_is_refused(tmp_path: Path, tflite_bytes: bytes):
    schema = _schema()
    subgraph = schema.Model.GetRootAs(tflite_bytes, 0).Subgraphs(0)
    data = bytearray(tflite_bytes)
    struct.pack_into("<I", data, _vector_length_field(subgraph, 4), 0xFFFFFFF0)
    message = _refused(check_tflite, _write(tmp_path / "m.tflite", data))
    assert "subgraph 0 tensor vector ends at byte" in message and f"of a {len(data)}-byte file" in message


def test_huge_buffer_vector_length_is_refused(tmp_path: Path, tflite_bytes: bytes):
    model = _schema().Model.GetRootAs(tflite_bytes, 0)
    data = bytearray(tflite_bytes)
    struct.pack_into("<I", data, _vector_length_field(model, 12), len(data))
    assert "buffer vector ends at byte" in _refused(check_tflite, _write(tmp_path / "m.tflite", data))


def _repack(data: bytes, edit: Callable[[Any], None]) -> bytes:
    """Unpack a TFLite model with the object API, ``edit`` it, and write it back (a well-formed FlatBuffer)."""
    import flatbuffers

    model = _schema().ModelT.InitFromPackedBuf(data, 0)
    edit(model)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_repacked_model_passes(tmp_path: Path, tflite_bytes: bytes):
    # The damage tests below rely on the repack itself producing a valid model.
    check_tflite(_write(tmp_path / "m.tflite", _repack(tflite_bytes, lambda model: None)))


def _set_output(model: Any) -> None:
    # The object API holds index vectors as read-only numpy views of the file: replace, not edit.
    model.subgraphs[0].outputs = [len(model.subgraphs[0].tensors)]


def _set_opcode(model: Any) -> None:
    model.subgraphs[0].operators[0].opcodeIndex = len(model.operatorCodes)


def _set_operand(model: Any) -> None:
    operator = model.subgraphs[0].operators[0]
    operator.inputs = [10_000, *list(operator.inputs)[1:]]


def _set_tensor_buffer(model: Any) -> None:
    model.subgraphs[0].tensors[0].buffer = len(model.buffers)


def _constant_tensor(model: Any) -> int:
    graph = model.subgraphs[0]
    return next(i for i, t in enumerate(graph.tensors) if model.buffers[t.buffer].data is not None)


def _make_input_a_constant(model: Any) -> None:
    # A one-byte change that does this to the real model makes LiteRT die of SIGSEGV on set_tensor.
    model.subgraphs[0].inputs = [_constant_tensor(model)]


def _make_output_a_constant(model: Any) -> None:
    model.subgraphs[0].operators[0].outputs = [_constant_tensor(model)]


def _set_version(model: Any) -> None:
    model.version = 2


def _drop_subgraphs(model: Any) -> None:
    model.subgraphs = []


def _set_signature_subgraph(model: Any) -> None:
    model.signatureDefs[0].subgraphIndex = 5


def _set_metadata_buffer(model: Any) -> None:
    model.metadata[0].buffer = len(model.buffers) + 1


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set_output, "output tensor"),
        (_set_opcode, "refers to operator code"),
        (_set_operand, "input tensor 10000 is out of range"),
        (_set_tensor_buffer, "refers to buffer"),
        (_make_input_a_constant, r"subgraph 0 input tensor \d+ is a constant"),
        (_make_output_a_constant, r"subgraph 0 operator 0 output tensor \d+ is a constant"),
        (_set_version, "schema version 2"),
        (_drop_subgraphs, "has no subgraph"),
        (_set_signature_subgraph, "refers to subgraph 5"),
        (_set_metadata_buffer, "metadata 0 refers to buffer"),
    ],
)
def test_out_of_range_index_in_a_well_formed_flatbuffer_is_refused(
    tmp_path: Path, tflite_bytes: bytes, edit: Callable[[Any], None], expected: str
):
    message = _refused(check_tflite, _write(tmp_path / "m.tflite", _repack(tflite_bytes, edit)))
    assert re.search(expected, message), message


def _move_largest_buffer_out(data: bytes, offset: int | None) -> bytes:
    """Store the largest buffer after the FlatBuffer, as converters do for models over 2 GB.

    With ``offset=None`` the data is appended at the right place; otherwise the buffer
    claims ``offset`` and nothing is appended.
    """
    buffers = _schema().ModelT.InitFromPackedBuf(data, 0).buffers
    index = max(range(len(buffers)), key=lambda i: 0 if buffers[i].data is None else len(buffers[i].data))
    payload = bytes(bytearray(buffers[index].data))

    def edit(at: int) -> Callable[[Any], None]:
        def apply(model: Any) -> None:
            model.buffers[index].data = None
            model.buffers[index].offset = at
            model.buffers[index].size = len(payload)

        return apply

    if offset is not None:
        return _repack(data, edit(offset))
    # A non-zero offset always takes the same 8 bytes, so the FlatBuffer's length is known up front.
    length = len(_repack(data, edit(1 << 40)))
    start = (length + 63) // 64 * 64
    flat = _repack(data, edit(start))
    assert len(flat) == length
    return flat + bytes(start - length) + payload


def test_buffer_stored_after_the_flatbuffer_passes(tmp_path: Path, tflite_bytes: bytes):
    path = _write(tmp_path / "m.tflite", _move_largest_buffer_out(tflite_bytes, None))
    check_tflite(path)
    from ai_edge_litert.interpreter import Interpreter

    Interpreter(model_path=str(path)).allocate_tensors()  # the real interpreter agrees the file is sound


@pytest.mark.parametrize("cut", [1, 100])
def test_buffer_stored_after_the_flatbuffer_but_cut_off_is_refused(tmp_path: Path, tflite_bytes: bytes, cut: int):
    data = _move_largest_buffer_out(tflite_bytes, None)
    message = _refused(check_tflite, _write(tmp_path / "m.tflite", data[:-cut]))
    assert "data ends at byte" in message


def test_buffer_offset_far_past_the_end_is_refused(tmp_path: Path, tflite_bytes: bytes):
    data = _move_largest_buffer_out(tflite_bytes, 1 << 62)
    assert "data ends at byte" in _refused(check_tflite, _write(tmp_path / "m.tflite", data))


def _aliased_model(subgraphs: int, tensors: int) -> bytes:
    """A FlatBuffer whose ``subgraphs`` entries all point at one subgraph whose tensors all point at one tensor."""
    import flatbuffers

    builder = flatbuffers.Builder(1024)

    def table(fields: Callable[[], None], count: int) -> int:
        builder.StartObject(count)
        fields()
        return int(builder.EndObject())

    def vector(offsets: list[int]) -> int:
        builder.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return int(builder.EndVector())

    def ints(values: list[int]) -> int:
        builder.StartVector(4, len(values), 4)
        for value in reversed(values):
            builder.PrependInt32(value)
        return int(builder.EndVector())

    buffer = table(lambda: None, 3)
    opcode = table(lambda: builder.PrependInt32Slot(3, 0, 99), 4)
    tensor = table(lambda: None, 8)
    tensor_vector, inputs, outputs, operators = vector([tensor] * tensors), ints([0]), ints([0]), vector([])

    def subgraph_fields() -> None:
        for slot, value in enumerate((tensor_vector, inputs, outputs, operators)):
            builder.PrependUOffsetTRelativeSlot(slot, value, 0)

    subgraph = table(subgraph_fields, 5)
    subgraph_vector, opcodes, buffers = vector([subgraph] * subgraphs), vector([opcode]), vector([buffer])

    def model_fields() -> None:
        builder.PrependUint32Slot(0, 3, 0)
        builder.PrependUOffsetTRelativeSlot(1, opcodes, 0)
        builder.PrependUOffsetTRelativeSlot(2, subgraph_vector, 0)
        builder.PrependUOffsetTRelativeSlot(4, buffers, 0)

    builder.Finish(table(model_fields, 8), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_small_hand_built_model_passes(tmp_path: Path):
    check_tflite(_write(tmp_path / "m.tflite", _aliased_model(1, 1)))


def test_tables_aliased_over_and_over_are_refused_quickly(tmp_path: Path):
    # 3000 x 3000 tensor visits from a 24 kB file: without a budget, a quadratic walk.
    path = _write(tmp_path / "m.tflite", _aliased_model(3000, 3000))
    assert "over and over" in _refused(check_tflite, path)


# --------------------------------------------------------------------------- damaged ONNX


def _edit_onnx(source: Path, target: Path, edit: Callable[[Any], None]) -> Path:
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    edit(model)
    onnx.save(model, str(target))
    return target


def _external_entries(model: Any) -> Any:
    import onnx

    tensors = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert tensors, "the export put no initializer in external data"
    return tensors[0].external_data


def _set_entry(key: str, value: str) -> Callable[[Any], None]:
    def edit(model: Any) -> None:
        entries = _external_entries(model)
        for entry in entries:
            if entry.key == key:
                entry.value = value
                return
        entries.add(key=key, value=value)

    return edit


@pytest.fixture
def external_copy(tmp_path: Path, built: Path) -> Path:
    """A private copy of ext/ (model.onnx + model.onnx.data) inside tmp_path/pkg/model."""
    return Path(shutil.copytree(built / "ext", tmp_path / "pkg/model"))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("location", "../../etc/passwd", "not a relative path inside"),
        ("location", "/etc/passwd", "not a relative path inside"),
        ("location", "sub/../../model.onnx.data", "not a relative path inside"),
        ("location", "..\\model.onnx.data", "not a relative path inside"),
        ("location", "", "not a relative path inside"),
        ("location", "*/_ORT_MEM_ADDR_/*", "missing"),
        ("location", "elsewhere.data", "missing"),
        ("length", "999999999", "needs bytes up to"),
        ("offset", "1000000", "needs bytes up to"),
        ("offset", "-1", "not a non-negative integer"),
        ("length", "0x10", "not a non-negative integer"),
    ],
)
def test_bad_external_data_reference_is_refused(external_copy: Path, key: str, value: str, expected: str):
    path = _edit_onnx(external_copy / "model.onnx", external_copy / "edited.onnx", _set_entry(key, value))
    assert expected in _refused(check_onnx, path)


def test_missing_external_data_file_is_refused(external_copy: Path):
    (external_copy / "model.onnx.data").unlink()
    assert "missing" in _refused(check_onnx, external_copy / "model.onnx")


def test_truncated_external_data_file_is_refused(external_copy: Path):
    data = external_copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-1])
    assert "needs bytes up to" in _refused(check_onnx, external_copy / "model.onnx")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_external_data_symlink_leaving_the_directory_is_refused(external_copy: Path):
    outside = external_copy.parent / "outside.data"
    shutil.move(external_copy / "model.onnx.data", outside)
    (external_copy / "model.onnx.data").symlink_to(outside)
    assert "not a regular file inside" in _refused(check_onnx, external_copy / "model.onnx")


def test_external_data_in_a_subdirectory_passes(external_copy: Path):
    (external_copy / "weights").mkdir()
    shutil.move(external_copy / "model.onnx.data", external_copy / "weights/w.bin")
    path = _edit_onnx(
        external_copy / "model.onnx", external_copy / "edited.onnx", _set_entry("location", "weights/w.bin")
    )
    check_onnx(path)


def _drop_outputs(model: Any) -> None:
    del model.graph.output[:]


def _drop_opsets(model: Any) -> None:
    del model.opset_import[:]


def _drop_graph(model: Any) -> None:
    model.ClearField("graph")


def _zero_ir_version(model: Any) -> None:
    model.ir_version = 0


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_drop_outputs, "no output"),
        (_drop_opsets, "no opset_import"),
        (_drop_graph, "no graph"),
        (_zero_ir_version, "no ir_version"),
    ],
)
def test_onnx_missing_a_required_part_is_refused(
    tmp_path: Path, built: Path, edit: Callable[[Any], None], expected: str
):
    path = _edit_onnx(built / "m.onnx", tmp_path / "m.onnx", edit)
    assert expected in _refused(check_onnx, path)


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        (b"\x0b", "wire type 3"),  # field 1, start group
        (b"\x0c", "wire type 4"),  # field 1, end group
        (b"\x0e", "wire type 6"),
        (b"\x0f", "wire type 7"),
        (b"\x00\x00", "field number 0"),
        (b"\x50" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),  # field 10 varint
        (b"\x50" + b"\xff" * 9 + b"\x02", "overflows 64 bits"),
        (b"\x50" + b"\xff" * 9 + b"\x01", None),  # 2**64 - 1: the largest varint
        (b"\x50", "runs past its end"),  # a tag without its value
        (b"\x52\x05ab", "ends at byte"),  # field 10, 5 bytes announced, 2 present
        (b"\x3a\x00", "second graph"),
        (b"\x08\x05", None),  # a repeated ir_version (last one wins): still well-formed
    ],
)
def test_onnx_wire_format_damage_is_refused(tmp_path: Path, onnx_bytes: bytes, suffix: bytes, expected: str | None):
    path = _write(tmp_path / "m.onnx", onnx_bytes + suffix)
    if expected is None:
        check_onnx(path)
    else:
        assert expected in _refused(check_onnx, path)


def test_onnx_known_field_with_the_wrong_wire_type_is_refused(tmp_path: Path, onnx_bytes: bytes):
    # Field 7 (graph) as a varint.
    path = _write(tmp_path / "m.onnx", onnx_bytes + b"\x38\x01")
    assert "wire type 0, expected 2" in _refused(check_onnx, path)


# --------------------------------------------------------------------------- damaged Core ML


@pytest.fixture
def mlpackage(tmp_path: Path, built: Path) -> Path:
    return Path(shutil.copytree(built / "m.mlpackage", tmp_path / "m.mlpackage"))


def _manifest(package: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((package / "Manifest.json").read_text())
    return manifest


def _save_manifest(package: Path, manifest: dict[str, Any]) -> None:
    (package / "Manifest.json").write_text(json.dumps(manifest))


def test_mlpackage_without_manifest_is_refused(mlpackage: Path):
    (mlpackage / "Manifest.json").unlink()
    assert "Manifest.json" in _refused(check_mlpackage, mlpackage)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
@pytest.mark.parametrize("target", ["/etc/passwd", "model.mlmodel"])
def test_mlpackage_with_a_symlink_is_refused(mlpackage: Path, target: str):
    (mlpackage / "Data/com.apple.CoreML/weights/extra.bin").symlink_to(target)
    assert "symbolic link" in _refused(check_mlpackage, mlpackage)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_mlpackage_with_a_symlinked_directory_is_refused(mlpackage: Path, tmp_path: Path):
    (tmp_path / "elsewhere").mkdir()
    (mlpackage / "Data/linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert "symbolic link" in _refused(check_mlpackage, mlpackage)


def test_mlpackage_with_invalid_manifest_json_is_refused(mlpackage: Path):
    (mlpackage / "Manifest.json").write_text('{"itemInfoEntries": ')
    assert "not valid JSON" in _refused(check_mlpackage, mlpackage)


def test_mlpackage_with_deeply_nested_manifest_is_refused(mlpackage: Path):
    (mlpackage / "Manifest.json").write_text("[" * 100_000)
    assert "not valid JSON" in _refused(check_mlpackage, mlpackage)


def test_mlpackage_with_unknown_root_identifier_is_refused(mlpackage: Path):
    manifest = _manifest(mlpackage)
    manifest["rootModelIdentifier"] = "no-such-entry"
    _save_manifest(mlpackage, manifest)
    assert "rootModelIdentifier" in _refused(check_mlpackage, mlpackage)


@pytest.mark.parametrize("item", ["../Manifest.json", "/etc/passwd", "com.apple.CoreML/../../x", ""])
def test_mlpackage_root_path_leaving_data_is_refused(mlpackage: Path, item: str):
    manifest = _manifest(mlpackage)
    manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"] = item
    _save_manifest(mlpackage, manifest)
    assert "not a relative path inside Data/" in _refused(check_mlpackage, mlpackage)


def test_mlpackage_without_root_spec_is_refused(mlpackage: Path):
    (mlpackage / "Data/com.apple.CoreML/model.mlmodel").unlink()
    assert "missing" in _refused(check_mlpackage, mlpackage)


def test_mlpackage_with_empty_root_spec_is_refused(mlpackage: Path):
    (mlpackage / "Data/com.apple.CoreML/model.mlmodel").write_bytes(b"")
    assert "empty" in _refused(check_mlpackage, mlpackage)


# --------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mutations")


INTERESTING_U32 = [0, 1, 3, 4, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFF, 1 << 20]


def _mutations(size: int) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """Byte flips anywhere, and small or extreme 32-bit values at aligned positions (FlatBuffer offsets)."""
    byte = st.tuples(st.just("byte"), st.integers(0, size - 1), st.integers(0, 255))
    word = st.tuples(
        st.just("u32"),
        st.integers(0, size // 4 - 1).map(lambda i: 4 * i),
        st.one_of(st.sampled_from(INTERESTING_U32), st.integers(0, size + 64), st.integers(0, 0xFFFFFFFF)),
    )
    return st.lists(st.one_of(byte, word), min_size=1, max_size=6)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for kind, pos, value in mutations:
        if kind == "byte":
            out[pos] = value
        else:
            struct.pack_into("<I", out, pos, value)
    return bytes(out if cut is None else out[:cut])


def _passes_or_refuses(check: Callable[[Path], None], path: Path) -> None:
    """The property: a check either passes or raises a one-line ArtifactError; nothing else escapes."""
    try:
        check(path)
    except ArtifactError as exc:
        assert "\n" not in str(exc)


@settings(deadline=None)
@given(data=st.data())
def test_mutated_tflite_passes_or_raises_artifact_error(scratch: Path, tflite_bytes: bytes, data: st.DataObject):
    mutations = data.draw(_mutations(len(tflite_bytes)))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(tflite_bytes))))
    path = _write(scratch / "m.tflite", _mutate(tflite_bytes, mutations, cut))
    _passes_or_refuses(check_tflite, path)


@settings(deadline=None)
@given(data=st.data())
def test_mutated_onnx_passes_or_raises_artifact_error(scratch: Path, built: Path, data: st.DataObject):
    # The model with external data, so that mutations also reach the location/offset/length entries.
    source = (built / "ext/model.onnx").read_bytes()
    mutations = data.draw(_mutations(len(source)))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(source))))
    directory = scratch / "onnx"
    if not directory.exists():
        shutil.copytree(built / "ext", directory)
    path = _write(directory / "mutated.onnx", _mutate(source, mutations, cut))
    _passes_or_refuses(check_onnx, path)


@pytest.mark.py310
@settings(deadline=None)
@given(blob=st.binary(max_size=512))
def test_arbitrary_bytes_pass_or_raise_artifact_error(tmp_path_factory: pytest.TempPathFactory, blob: bytes):
    path = tmp_path_factory.getbasetemp() / "blob.bin"
    path.write_bytes(blob)
    _passes_or_refuses(check_tflite, path)
    _passes_or_refuses(check_onnx, path)
    path.write_bytes(b"\x1c\0\0\0TFL3" + blob)
    _passes_or_refuses(check_tflite, path)
