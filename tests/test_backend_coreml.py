"""Core ML backend off macOS: availability, compute units, and reading I/O from real Core ML specs.

Prediction needs macOS; it is tested in hil/test_coreml_device.py on a Mac.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.errors import BackendUnavailableError, InputError, ModelLoadError
from edgeship.runtime.backends import coreml as coreml_backend
from edgeship.runtime.backends.base import BackendOptions, TensorInfo
from edgeship.runtime.backends.coreml import (
    COREMLTOOLS_MISSING,
    NOT_DARWIN,
    CoreMLBackend,
    _CoreMLModel,
    compute_units_for,
    describe_features,
)
from edgeship.runtime.package.manifest import TensorSpec
from tests.package_fixtures import draft_manifest

# Device-side code: these also run under Python 3.10 in the device-side venv.
pytestmark = pytest.mark.py310


def test_unavailable_reason_off_macos_points_to_the_reference_evaluator(monkeypatch):
    monkeypatch.setattr(coreml_backend.platform, "system", lambda: "Linux")
    reason = CoreMLBackend.unavailable_reason()
    assert reason == NOT_DARWIN
    assert "macOS/iOS" in reason and "backend='coreml-reference'" in reason


def test_unavailable_reason_on_macos_without_coremltools_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(coreml_backend.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(coreml_backend.importlib.util, "find_spec", lambda name, *a: None)
    assert CoreMLBackend.unavailable_reason() == COREMLTOOLS_MISSING
    assert "pip install" in COREMLTOOLS_MISSING


def test_available_on_macos_with_coremltools(monkeypatch):
    monkeypatch.setattr(coreml_backend.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(coreml_backend.importlib.util, "find_spec", lambda name, *a: object())
    assert CoreMLBackend.unavailable_reason() is None


@pytest.mark.skipif(coreml_backend.platform.system() == "Darwin", reason="tests the non-macOS path")
def test_load_off_macos_is_backend_unavailable(tmp_path: Path):
    manifest = draft_manifest(format="coreml", artifact_path="model.mlpackage", precision="fp16")
    with pytest.raises(BackendUnavailableError, match="backend 'coreml' cannot run here: Core ML runs only on macOS"):
        CoreMLBackend.load(tmp_path / "model.mlpackage", manifest, BackendOptions())


@pytest.mark.parametrize(
    ("delegates", "units"),
    [
        ((), "ALL"),
        (("coreml-ane",), "ALL"),
        (("gpu",), "CPU_AND_GPU"),
        (("cpu",), "CPU_ONLY"),
        (("xnnpack", "gpu"), "CPU_AND_GPU"),
        (("coreml-ane", "gpu"), "ALL"),
        (("nnapi",), "ALL"),
    ],
)
def test_delegates_choose_compute_units(delegates: tuple[str, ...], units: str):
    assert compute_units_for(delegates) == units


def test_every_compute_unit_name_exists_in_coremltools():
    ct = pytest.importorskip("coremltools")
    for delegates in ((), ("gpu",), ("cpu",)):
        assert compute_units_for(delegates) in ct.ComputeUnit.__members__


# --- reading I/O from real Core ML model specs (protobuf, no prediction) ------------------------


def spec_with(*features: tuple[str, str, list[int]]) -> Any:
    pytest.importorskip("coremltools")
    from coremltools.proto import FeatureTypes_pb2, Model_pb2

    spec = Model_pb2.Model()
    for name, dtype, shape in features:
        feature = spec.description.input.add()
        feature.name = name
        feature.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Value(dtype)
        feature.type.multiArrayType.shape.extend(shape)
    return spec


def test_multiarray_features_become_tensor_infos_in_spec_order():
    spec = spec_with(("x", "FLOAT32", [1, 3, 8, 8]), ("scale", "FLOAT16", [1]), ("ids", "INT32", [1, 16]))
    assert describe_features(spec.description.input, "input") == (
        TensorInfo("x", (1, 3, 8, 8), np.dtype(np.float32)),
        TensorInfo("scale", (1,), np.dtype(np.float16)),
        TensorInfo("ids", (1, 16), np.dtype(np.int32)),
    )


def test_double_and_int8_arrays_map_to_numpy():
    spec = spec_with(("d", "DOUBLE", [2]), ("q", "INT8", [4]))
    assert [i.dtype for i in describe_features(spec.description.input, "input")] == [np.float64, np.int8]


def test_shape_ranges_and_enumerated_shapes_mark_varying_dimensions_dynamic():
    spec = spec_with(("ranged", "FLOAT32", [1, 3]), ("enumerated", "FLOAT32", [1, 3]))
    ranged = spec.description.input[0].type.multiArrayType.shapeRange
    for lower, upper in ((1, 64), (3, 3)):
        size = ranged.sizeRanges.add()
        size.lowerBound, size.upperBound = lower, upper
    enumerated = spec.description.input[1].type.multiArrayType.enumeratedShapes
    for shape in ((1, 3), (8, 3)):
        enumerated.shapes.add().shape.extend(shape)
    infos = describe_features(spec.description.input, "input")
    assert [i.shape for i in infos] == [(None, 3), (None, 3)]


def test_image_features_are_refused_with_the_fix():
    spec = spec_with()
    feature = spec.description.input.add()
    feature.name = "image"
    feature.type.imageType.width = 8
    with pytest.raises(ModelLoadError, match=r"input 'image' is of type imageType.*ct\.TensorType"):
        describe_features(spec.description.input, "input")


def test_a_converted_pytorch_model_describes_its_inputs_and_outputs():
    ct = pytest.importorskip("coremltools")
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)
    ).eval()
    example = torch.zeros(1, 1, 8, 8)
    converted = ct.convert(
        torch.jit.trace(model, example),
        inputs=[ct.TensorType(name="x", shape=example.shape, dtype=np.float32)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.macOS13,
        compute_precision=ct.precision.FLOAT16,
    )
    description = converted.get_spec().description
    assert describe_features(description.input, "input") == (TensorInfo("x", (1, 1, 8, 8), np.dtype(np.float32)),)
    (output,) = describe_features(description.output, "output")
    # With fp16 compute precision, an output without an explicit dtype is FLOAT16 in the spec.
    assert output.shape == (1, 10) and output.dtype == np.float16


# --- the loaded model's adapter, with a stand-in for MLModel ------------------------------------


class FakeMLModel:
    """Has the two methods the adapter calls; predict answers in an order unlike the spec's."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.fed: dict[str, np.ndarray] = {}

    def get_spec(self) -> Any:
        return self.spec

    def predict(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.fed = data
        return {"second": np.full((2,), 2.0, np.float32), "first": np.ones((1, 3), np.float32)}


def two_output_spec() -> Any:
    spec = spec_with(("x", "FLOAT32", [1, 3]))
    from coremltools.proto import FeatureTypes_pb2

    for name, dtype in (("first", "FLOAT32"), ("second", "FLOAT16")):
        feature = spec.description.output.add()
        feature.name = name
        feature.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Value(dtype)
    return spec


def test_run_returns_outputs_in_spec_order_with_spec_dtypes():
    fake = FakeMLModel(two_output_spec())
    loaded = _CoreMLModel(fake)
    feed = np.zeros((1, 3), np.float32)
    first, second = loaded.run([feed])
    assert fake.fed == {"x": feed}
    assert first.shape == (1, 3) and first.dtype == np.float32
    assert second.dtype == np.float16 and second.tolist() == [2.0, 2.0]


def test_output_shapes_missing_from_the_spec_come_from_the_manifest():
    manifest = draft_manifest(
        format="coreml",
        outputs=(TensorSpec("first", "float32", (None, 3)), TensorSpec("second", "float16", (2,))),
    )
    loaded = _CoreMLModel(FakeMLModel(two_output_spec()), manifest)
    assert [o.shape for o in loaded.outputs] == [(None, 3), (2,)]


def test_wrong_number_of_feeds_is_an_input_error():
    with pytest.raises(InputError, match="takes 1 inputs, got 2"):
        _CoreMLModel(FakeMLModel(two_output_spec())).run([np.zeros((1, 3), np.float32)] * 2)
