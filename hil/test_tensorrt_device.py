"""TensorRT on a real Jetson: build an engine from a Q/DQ ONNX graph, run it, compare with ONNX Runtime.

Runs on the device itself (JetPack 6: TensorRT 10.x, CUDA 12) with onnx, onnxruntime and
cuda-python installed; see hil/README.md. Elsewhere the hardware tests skip with the reason;
with EDGESHIP_HIL_REQUIRE=1 (set by remote runs) missing hardware fails them instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.errors import InputError, ModelLoadError
from edgeship.runtime.backends import tensorrt as trt_backend
from edgeship.runtime.backends.base import BackendOptions, LoadedModel
from edgeship.runtime.backends.engine_cache import EngineCacheKey
from edgeship.runtime.backends.tensorrt import TensorRTBackend
from edgeship.runtime.backends.tensorrt_spec import BUILD_SPEC_NAME
from edgeship.runtime.package.manifest import Manifest, TensorSpec

REASON = TensorRTBackend.unavailable_reason()
REQUIRE = os.environ.get("EDGESHIP_HIL_REQUIRE") == "1"
needs_tensorrt = pytest.mark.skipif(
    REASON is not None and not REQUIRE, reason=f"needs TensorRT and a CUDA device: {REASON}"
)

BATCH_PROFILE = {"x": {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [8, 3, 16, 16]}}
SPEC = {
    "precision": "int8",
    "min_tensorrt_version": "10.0",
    "workspace_mib": 256,
    "optimization_profiles": [BATCH_PROFILE],
    "builder_optimization_level": 1,  # a tiny graph: build fast
}
MANIFEST = Manifest(
    name="hil-qdq-cnn",
    version=1,
    target="jetson-orin",
    format="tensorrt-onnx",
    precision="int8",
    artifact_path="model.onnx",
    inputs=(TensorSpec("x", "float32", (None, 3, 16, 16)),),
    outputs=(TensorSpec("logits", "float32", (None, 4)),),
    files=(),
)
LOGGER = trt_backend.__name__


@dataclass(frozen=True)
class QdqModel:
    float_graph: Path
    qdq_graph: Path


def make_qdq_model(directory: Path, weights: str) -> QdqModel:
    """A small CNN with a dynamic batch, quantized by ONNX Runtime to symmetric int8 Q/DQ as TensorRT needs.

    ``weights``: "int8" stores weights as int8 initializers feeding DequantizeLinear; "qdq" keeps
    float weights behind a QuantizeLinear/DequantizeLinear pair. Biases stay float: TensorRT
    refuses DequantizeLinear on int32 biases ("only activation types allowed as input").
    """
    onnx = pytest.importorskip("onnx")
    quantization = pytest.importorskip("onnxruntime.quantization")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.3) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "hil_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [
            weight("w1", (8, 3, 3, 3)),
            weight("b1", (8,), 0.1),
            weight("w2", (16, 8, 3, 3)),
            weight("b2", (16,), 0.1),
            weight("w3", (4, 16)),
            weight("b3", (4,), 0.1),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    float_graph, qdq_graph = directory / "float.onnx", directory / "model.onnx"
    onnx.save(model, str(float_graph))

    batches = iter([{"x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(16)])

    class Calibration(quantization.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    quantization.quantize_static(
        str(float_graph),
        str(qdq_graph),
        Calibration(),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "AddQDQPairToWeight": weights == "qdq",
        },
    )
    return QdqModel(float_graph, qdq_graph)


@pytest.fixture(scope="module", params=["int8", "qdq"], ids=["int8-weights", "qdq-weights"])
def qdq_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> QdqModel:
    return make_qdq_model(tmp_path_factory.mktemp(f"model-{request.param}"), request.param)


def write_package(directory: Path, graph: Path, **spec_changes: Any) -> Path:
    """A tensorrt-onnx package folder: the graph as model.onnx and build_spec.json beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    artifact = directory / "model.onnx"
    artifact.write_bytes(graph.read_bytes())
    (directory / BUILD_SPEC_NAME).write_text(json.dumps({**SPEC, **spec_changes}))
    return artifact


def onnxruntime_reference(graph: Path, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {"x": x})[0]
    return result


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    # TensorRT's int8 kernels and ONNX Runtime's Q/DQ simulation round differently: compare by
    # direction and by error relative to the output range, not bit for bit.
    assert actual.shape == expected.shape
    cosine = float((actual * expected).sum() / (np.linalg.norm(actual) * np.linalg.norm(expected)))
    worst = float(np.abs(actual - expected).max())
    assert cosine >= 0.999 and worst <= 0.05 * float(np.abs(expected).max()), f"cos {cosine:.6f}, max |err| {worst}"


def load(artifact: Path, cache_dir: Path) -> LoadedModel:
    return TensorRTBackend.load(artifact, MANIFEST, BackendOptions(cache_dir=cache_dir))


def the_key_file(cache_dir: Path) -> Path:
    (key_file,) = cache_dir.glob("*.json")
    return key_file


def test_qdq_model_fits_tensorrt(qdq_model: QdqModel):
    """Runs anywhere with onnx: the fixture graph has what TensorRT needs (symmetric int8, float biases)."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    graph = onnx.load(str(qdq_model.qdq_graph)).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "quantize_static inserted no Q/DQ nodes"
    for node in qdq:
        zero_point = constants[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), f"{node.name}: zero point {zero_point}"
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            assert constants[node.input[0]].dtype == np.int8, (
                f"{node.name} dequantizes {constants[node.input[0]].dtype}"
            )


@needs_tensorrt
def test_int8_engine_matches_onnxruntime_on_cpu(qdq_model: QdqModel, tmp_path: Path):
    model = load(write_package(tmp_path / "pkg", qdq_model.qdq_graph), tmp_path / "cache")
    try:
        assert [(i.name, i.shape, i.dtype) for i in model.inputs] == [("x", (None, 3, 16, 16), np.float32)]
        assert [o.name for o in model.outputs] == ["logits"]
        rng = np.random.default_rng(1)
        for batch in (1, 4, 8):
            x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
            (logits,) = model.run([x])
            assert_close(logits, onnxruntime_reference(qdq_model.qdq_graph, x))
            assert_close(logits, onnxruntime_reference(qdq_model.float_graph, x))
    finally:
        model.close()


@needs_tensorrt
def test_batch_outside_the_profile_is_an_input_error(qdq_model: QdqModel, tmp_path: Path):
    model = load(write_package(tmp_path / "pkg", qdq_model.qdq_graph), tmp_path / "cache")
    with pytest.raises(InputError, match=r"\[1, 3, 16, 16\]\.\.\[8, 3, 16, 16\]"):
        model.run([np.zeros((9, 3, 16, 16), np.float32)])
    model.close()


@needs_tensorrt
def test_second_load_uses_the_cached_engine(qdq_model: QdqModel, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    artifact, cache = write_package(tmp_path / "pkg", qdq_model.qdq_graph), tmp_path / "cache"
    x = np.random.default_rng(2).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = load(artifact, cache)
        (engine_file,) = cache.glob("*.engine")
        built_at = engine_file.stat().st_mtime_ns
        expected = first.run([x])[0]
        first.close()
        caplog.clear()
        second = load(artifact, cache)
    assert "using cached TensorRT engine" in caplog.text and "building TensorRT engine" not in caplog.text
    assert engine_file.stat().st_mtime_ns == built_at
    np.testing.assert_allclose(second.run([x])[0], expected, rtol=0, atol=1e-5)
    second.close()


@needs_tensorrt
def test_cache_entry_with_a_tampered_key_is_refused_and_rebuilt(
    qdq_model: QdqModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    artifact, cache = write_package(tmp_path / "pkg", qdq_model.qdq_graph), tmp_path / "cache"
    load(artifact, cache).close()
    key_file = the_key_file(cache)
    honest = EngineCacheKey.from_json(key_file.read_bytes())
    tampered = json.loads(key_file.read_bytes())
    tampered["tensorrt_version"] = "8.6.2.3"  # as if the engine came from an older JetPack
    key_file.write_text(json.dumps(tampered))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = load(artifact, cache)
    assert "refusing cached TensorRT engine" in caplog.text and "tensorrt_version: '8.6.2.3'" in caplog.text
    assert "building TensorRT engine" in caplog.text
    assert EngineCacheKey.from_json(key_file.read_bytes()) == honest
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert_close(model.run([x])[0], onnxruntime_reference(qdq_model.qdq_graph, x))
    model.close()


@needs_tensorrt
def test_corrupt_cached_engine_is_rebuilt_once(qdq_model: QdqModel, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    artifact, cache = write_package(tmp_path / "pkg", qdq_model.qdq_graph), tmp_path / "cache"
    load(artifact, cache).close()
    (engine_file,) = cache.glob("*.engine")
    engine_file.write_bytes(engine_file.read_bytes()[:1000])  # a torn write or a flipped flash block
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = load(artifact, cache)
    assert "failed to load" in caplog.text and "rebuilding once" in caplog.text
    assert engine_file.stat().st_size > 1000
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert_close(model.run([x])[0], onnxruntime_reference(qdq_model.qdq_graph, x))
    model.close()


@needs_tensorrt
def test_package_needing_a_newer_tensorrt_is_refused_naming_both_versions(qdq_model: QdqModel, tmp_path: Path):
    artifact = write_package(tmp_path / "pkg", qdq_model.qdq_graph, min_tensorrt_version="99.0")
    with pytest.raises(ModelLoadError, match=r"needs TensorRT >= 99\.0, but TensorRT \d+\.\d+.* is installed"):
        load(artifact, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@needs_tensorrt
def test_graph_the_parser_refuses_is_a_model_load_error(tmp_path: Path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an ONNX protobuf" * 10)
    with pytest.raises(ModelLoadError, match=r"ONNX parser refused model\.onnx"):
        load(write_package(tmp_path / "pkg", garbage), tmp_path / "cache")


@needs_tensorrt
def test_fp16_engine_from_the_float_graph_matches_onnxruntime(qdq_model: QdqModel, tmp_path: Path):
    model = load(write_package(tmp_path / "pkg", qdq_model.float_graph, precision="fp16"), tmp_path / "cache")
    x = np.random.default_rng(5).standard_normal((8, 3, 16, 16)).astype(np.float32)
    assert_close(model.run([x])[0], onnxruntime_reference(qdq_model.float_graph, x))
    model.close()


def test_device_suite_passes_on_the_remote_jetson(remote_jetson: Any):
    """From a workstation: copy the repository to the Jetson and run this file there, hardware required."""
    remote_jetson.sync_repo()
    result = remote_jetson.run_pytest("hil/test_tensorrt_device.py", "-k", "not remote", "-q")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
