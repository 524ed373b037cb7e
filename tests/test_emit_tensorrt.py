"""The TensorRT emitter: explicit symmetric Q/DQ ONNX plus build_spec.json, checked on the digits CNN.

No TensorRT here: the Q/DQ graph is checked structurally against TensorRT's rules and run in
ONNX Runtime through edgeship's runtime. NOTE: accuracy in ONNX Runtime says little about a
TensorRT engine (TensorRT fuses, reorders and picks its own kernels); it shows the
calibration is sane. Engine accuracy is measured on a Jetson (hil/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.compiler.emitters.tensorrt import TensorRTResult, check_qdq, emit_tensorrt
from edgeship.errors import ArtifactError, UsageError
from edgeship.runtime import open_unpackaged
from edgeship.runtime.backends.tensorrt_spec import (
    BuildSpec,
    OptimizationProfile,
    ShapeRange,
    check_network_inputs,
    precision_flags,
)
from edgeship.runtime.package.manifest import Manifest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class DigitsOnnx:
    path: Path
    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def calibration(self, n: int = 512, batch: int = 64) -> list[dict[str, np.ndarray]]:
        return [{"image": self.x_train[i : i + batch]} for i in range(0, n, batch)]


def _export(model: Any, example: np.ndarray, path: Path) -> None:
    torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        str(path),
        dynamo=True,
        external_data=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        verbose=False,
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsOnnx:
    from examples.digits import train

    torch.set_num_threads(1)
    trained = train()
    path = tmp_path_factory.mktemp("digits") / "digits_fp32.onnx"
    _export(trained.model, trained.x_test[:2], path)
    return DigitsOnnx(path, trained.x_train, trained.x_test, trained.y_test)


@pytest.fixture(scope="module")
def int8(digits: DigitsOnnx, tmp_path_factory: pytest.TempPathFactory) -> TensorRTResult:
    out = tmp_path_factory.mktemp("trt-int8")
    return emit_tensorrt(digits.path, out, precision="int8-qdq", calibration=digits.calibration())


@pytest.fixture(scope="module")
def fp16(digits: DigitsOnnx, tmp_path_factory: pytest.TempPathFactory) -> TensorRTResult:
    return emit_tensorrt(digits.path, tmp_path_factory.mktemp("trt-fp16"), precision="fp16", calibration=None)


def _graph(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    model = onnx.load(str(path))
    producers = {out: n for n in model.graph.node for out in n.output}
    initializers = {t.name: t for t in model.graph.initializer}
    return model.graph, producers, initializers


def _accuracy(result: TensorRTResult, digits: DigitsOnnx) -> float:
    manifest = Manifest(
        name="digits",
        version=1,
        target="jetson-orin-nano",
        format="tensorrt-onnx",
        precision=result.build_spec.precision,
        artifact_path="model.onnx",
        inputs=result.inputs,
        outputs=result.outputs,
        files=(),
    )
    with open_unpackaged(manifest, result.onnx_path.parent, backend="onnxruntime") as session:
        assert session.backend_name == "onnxruntime"
        logits = session.run({"image": digits.x_test})["logits"]
    return float((logits.argmax(1) == digits.y_test).mean())


# ------------------------------------------------------------------ int8-qdq graph


def test_int8_qdq_puts_symmetric_int8_qdq_on_every_weighted_op_input(int8: TensorRTResult) -> None:
    graph, producers, initializers = _graph(int8.onnx_path)
    weighted = [n for n in graph.node if n.op_type in WEIGHTED]
    assert len(weighted) == 4  # 2 Conv + 2 Gemm
    for node in weighted:
        activation, weight = (producers.get(t) for t in node.input[:2])
        assert activation is not None and activation.op_type == "DequantizeLinear", node.name
        assert producers[activation.input[0]].op_type == "QuantizeLinear", node.name
        assert weight is not None and weight.op_type == "DequantizeLinear", node.name
        stored = initializers[weight.input[0]]
        assert stored.data_type == onnx.TensorProto.INT8  # pre-quantized per-channel weights (TensorRT >= 10)
        assert onnx.numpy_helper.to_array(initializers[weight.input[1]]).shape == (stored.dims[0],)
        bias = node.input[2]
        assert bias not in producers and initializers[bias].data_type == onnx.TensorProto.FLOAT, "bias must stay float"
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for node in qdq:
        zero_point = initializers[node.input[2]]
        assert zero_point.data_type == onnx.TensorProto.INT8
        assert not onnx.numpy_helper.to_array(zero_point).any(), f"{node.name}: zero point must be 0"
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            assert initializers[node.input[0]].data_type != onnx.TensorProto.INT32, "no quantized bias"
    # Outputs of weighted ops stay float (TensorRT's placement recommendations).
    weighted_outputs = {n.output[0] for n in weighted}
    assert not [n for n in qdq if n.op_type == "QuantizeLinear" and n.input[0] in weighted_outputs]
    assert int8.qdq_pairs == 4 and int8.int8_weights == 4
    assert {o.domain for o in onnx.load(str(int8.onnx_path)).opset_import} == {""}


def test_int8_build_spec_parses_with_the_runtime_and_has_a_default_batch_profile(int8: TensorRTResult) -> None:
    spec = BuildSpec.from_json(int8.build_spec_path.read_bytes())
    assert spec == int8.build_spec
    assert spec.precision == "int8" and spec.min_tensorrt_version == "10.0" and spec.workspace_mib == 1024
    assert spec.optimization_profiles == (
        OptimizationProfile((ShapeRange("image", (1, 1, 8, 8), (1, 1, 8, 8), (8, 1, 8, 8)),)),
    )
    check_network_inputs({"image": (-1, 1, 8, 8)}, spec.optimization_profiles)  # what the device checks
    assert any("default profile" in note for note in int8.notes)
    assert [(t.name, t.dtype, t.shape) for t in int8.inputs] == [("image", "float32", (None, 1, 8, 8))]
    assert [(t.name, t.dtype, t.shape) for t in int8.outputs] == [("logits", "float32", (None, 10))]
    assert not list(int8.onnx_path.parent.glob("*.cache")) and not list(int8.onnx_path.parent.glob("*calib*"))
    assert sorted(p.name for p in int8.onnx_path.parent.iterdir()) == ["build_spec.json", "model.onnx"]


def test_int8_qdq_graph_keeps_digits_accuracy_in_onnxruntime(
    int8: TensorRTResult, fp16: TensorRTResult, digits: DigitsOnnx
) -> None:
    # Accuracy in ONNX Runtime says little about the TensorRT engine built from this graph;
    # it catches broken calibration (clipped ranges, wrong axes), not TensorRT's own numerics.
    fp32_accuracy = _accuracy(fp16, digits)  # the fp16 artifact is the fp32 graph
    int8_accuracy = _accuracy(int8, digits)
    assert fp32_accuracy > 0.95
    assert abs(int8_accuracy - fp32_accuracy) <= 0.01, (fp32_accuracy, int8_accuracy)
    assert int8.weight_bytes < fp16.weight_bytes / 3  # int8 weights, float biases


@pytest.mark.parametrize("damage", ["nonzero", "uint8", "missing", "int32-bias"])
def test_qdq_check_refuses_graphs_tensorrt_would_misread(int8: TensorRTResult, damage: str) -> None:
    from onnx import TensorProto, numpy_helper

    graph = onnx.load(str(int8.onnx_path)).graph
    assert check_qdq(graph).pairs == 4  # the undamaged graph passes
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized"))
    zero_point = next(t for t in graph.initializer if t.name == dq.input[2])
    if damage == "nonzero":
        zero_point.CopyFrom(numpy_helper.from_array(np.full(zero_point.dims, 3, np.int8), zero_point.name))
    elif damage == "uint8":
        zero_point.CopyFrom(numpy_helper.from_array(np.zeros(zero_point.dims, np.uint8), zero_point.name))
    elif damage == "missing":
        del dq.input[2]
    else:
        weights = next(t for t in graph.initializer if t.name == dq.input[0])
        weights.CopyFrom(numpy_helper.from_array(np.zeros(weights.dims, np.int32), weights.name))
        assert weights.data_type == TensorProto.INT32
    with pytest.raises(ArtifactError, match=r"zero point|int32"):
        check_qdq(graph)


# ------------------------------------------------------------------ fp16


def test_fp16_ships_the_fp32_graph_unchanged_with_an_fp16_spec(fp16: TensorRTResult, digits: DigitsOnnx) -> None:
    import onnxruntime as ort

    graph, _, initializers = _graph(fp16.onnx_path)
    assert not [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {t.data_type for t in initializers.values() if t.dims and len(t.dims) > 1} == {onnx.TensorProto.FLOAT}
    spec = BuildSpec.from_json(fp16.build_spec_path.read_bytes())
    assert spec.precision == "fp16" and spec.optimization_profiles == fp16.build_spec.optimization_profiles
    x = digits.x_test[:32]
    source = ort.InferenceSession(str(digits.path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    shipped = ort.InferenceSession(str(fp16.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_array_equal(shipped, source)
    assert fp16.qdq_pairs == 0 and fp16.weight_bytes == sum(
        onnx.numpy_helper.to_array(t).nbytes for t in initializers.values()
    )


def test_fp32_ships_the_same_graph_with_an_fp32_spec_that_the_dla_refuses(
    fp16: TensorRTResult, digits: DigitsOnnx, tmp_path: Path
) -> None:
    fp32 = emit_tensorrt(digits.path, tmp_path / "fp32", precision="fp32", calibration=[{"image": digits.x_train}])
    assert fp32.onnx_path.read_bytes() == fp16.onnx_path.read_bytes()
    spec = BuildSpec.from_json(fp32.build_spec_path.read_bytes())
    assert spec.precision == "fp32" and precision_flags(spec.precision) == ()
    assert "calibration data is not used for fp32" in fp32.notes
    with pytest.raises(UsageError, match="DLA does not run fp32"):
        emit_tensorrt(digits.path, tmp_path / "dla", precision="fp32", calibration=None, dla_core=0)


def test_given_profiles_and_dla_settings_reach_the_build_spec(digits: DigitsOnnx, tmp_path: Path) -> None:
    profile = OptimizationProfile((ShapeRange("image", (1, 1, 8, 8), (16, 1, 8, 8), (64, 1, 8, 8)),))
    result = emit_tensorrt(
        digits.path,
        tmp_path,
        precision="fp16",
        calibration=None,
        profiles=[profile],
        workspace_mib=256,
        min_tensorrt_version="10.3",
        dla_core=0,
        sparsity_2_4=True,
    )
    spec = json.loads(result.build_spec_path.read_text())
    assert spec["optimization_profiles"] == [
        {"image": {"min": [1, 1, 8, 8], "opt": [16, 1, 8, 8], "max": [64, 1, 8, 8]}}
    ]
    assert (spec["workspace_mib"], spec["min_tensorrt_version"], spec["dla_core"]) == (256, "10.3", 0)
    assert spec["allow_gpu_fallback"] is True and spec["sparsity_2_4"] is True


def test_older_tensorrt_gets_fp32_weights_behind_qdq_pairs(digits: DigitsOnnx, tmp_path: Path) -> None:
    result = emit_tensorrt(
        digits.path, tmp_path, precision="int8-qdq", calibration=digits.calibration(128), min_tensorrt_version="8.6"
    )
    graph, producers, initializers = _graph(result.onnx_path)
    for node in (n for n in graph.node if n.op_type in WEIGHTED):
        weight_q = producers[producers[node.input[1]].input[0]]
        assert weight_q.op_type == "QuantizeLinear"
        assert initializers[weight_q.input[0]].data_type == onnx.TensorProto.FLOAT
    assert result.int8_weights == 0 and result.qdq_pairs == 8


def test_percentile_calibration_takes_batches_of_unequal_size(digits: DigitsOnnx, tmp_path: Path) -> None:
    # ONNX Runtime's histogram calibrators stack all batches: a short last batch used to fail there.
    batches = [{"image": digits.x_train[a:b]} for a, b in ((0, 48), (48, 96), (96, 120))]
    result = emit_tensorrt(
        digits.path, tmp_path, precision="int8-qdq", calibration=batches, calibration_method="percentile"
    )
    assert result.qdq_pairs == 4
    assert any("percentile on 3 batch(es), 120 sample(s)" in note for note in result.notes)


def test_matmul_weights_are_quantized_per_output_column(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)  # ORT reads <= 13
    onnx.save(model, str(tmp_path / "mm.onnx"))
    calibration = [{"x": rng.standard_normal((32, 16)).astype(np.float32)}]
    result = emit_tensorrt(tmp_path / "mm.onnx", tmp_path / "out", precision="int8-qdq", calibration=calibration)
    graph, producers, initializers = _graph(result.onnx_path)
    weight_dq = producers[next(n for n in graph.node if n.op_type == "MatMul").input[1]]
    assert {a.name: a.i for a in weight_dq.attribute}.get("axis") == 1
    assert numpy_helper.to_array(initializers[weight_dq.input[1]]).shape == (4,)


# ------------------------------------------------------------------ placement on a residual block


class _Residual(torch.nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: Any) -> Any:
        h = torch.relu(self.conv0(x))
        y = self.conv2(torch.relu(self.conv1(h)))
        return self.fc(torch.relu(y + h).flatten(1))


def test_residual_add_gets_a_quantized_skip_input_and_a_float_conv_branch(tmp_path: Path) -> None:
    # TensorRT fuses the Add into the Conv that feeds it when the skip input is quantized and
    # the Conv's output is not (Q/DQ placement recommendations, element-wise addition fusion).
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    _export(_Residual().eval(), x[:2], tmp_path / "res.onnx")
    result = emit_tensorrt(tmp_path / "res.onnx", tmp_path / "out", precision="int8-qdq", calibration=[{"image": x}])
    graph, producers, _ = _graph(result.onnx_path)
    (add,) = [n for n in graph.node if n.op_type == "Add"]
    kinds = sorted(producers[t].op_type for t in add.input)
    assert kinds == ["Conv", "DequantizeLinear"], kinds


# ------------------------------------------------------------------ refusals


def test_int8_without_calibration_is_refused_naming_the_tensorrt_deprecation(
    digits: DigitsOnnx, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match=r"needs calibration data \(--calib\).*deprecated in TensorRT 10"):
        emit_tensorrt(digits.path, tmp_path / "out", precision="int8-qdq", calibration=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda x: [], r"calibration set is empty"),
        (lambda x: iter(()), r"calibration set is empty"),
        (lambda x: [{"image": np.where(x[:8] > 0.5, np.nan, x[:8])}], r"batch 0, input 'image' holds NaN or Inf"),
        (lambda x: ({"image": x[i : i + 8] / (i > 0)} for i in range(0, 32, 8)), r"batch 0, input 'image' holds NaN"),
        (lambda x: [{"image": x[:8]}, {"image": np.full_like(x[:8], np.inf)}], r"batch 1, input 'image' holds NaN"),
        (lambda x: [{"pixels": x[:8]}], r"missing \['image'\]; unexpected \['pixels'\]"),
        (lambda x: [{"image": x[:8, 0]}], r"shape \[8, 8, 8\] does not fit the model's \[\?, 1, 8, 8\]"),
    ],
    ids=["empty-list", "empty-generator", "nan", "division-by-zero", "inf-later", "wrong-name", "wrong-rank"],
)
def test_bad_calibration_sets_are_refused_in_one_line(
    digits: DigitsOnnx, tmp_path: Path, make: Any, message: str
) -> None:
    with np.errstate(divide="ignore", invalid="ignore"), pytest.raises(UsageError, match=message) as info:
        emit_tensorrt(digits.path, tmp_path / "out", precision="int8-qdq", calibration=make(digits.x_train))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_profiles_that_contradict_the_graph_are_refused(digits: DigitsOnnx, tmp_path: Path) -> None:
    wrong = OptimizationProfile((ShapeRange("image", (1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8)),))
    with pytest.raises(UsageError, match="fixes at 1"):
        emit_tensorrt(digits.path, tmp_path, precision="fp16", calibration=None, profiles=[wrong])


def test_already_quantized_graphs_and_unknown_precisions_are_refused(
    int8: TensorRTResult, digits: DigitsOnnx, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="already holds"):
        emit_tensorrt(int8.onnx_path, tmp_path, precision="int8-qdq", calibration=[{"image": digits.x_train[:8]}])
    with pytest.raises(UsageError, match="TensorRT precisions are fp16, int8-qdq"):
        emit_tensorrt(digits.path, tmp_path, precision="int8", calibration=None)
    with pytest.raises(UsageError, match="min_tensorrt_version"):
        emit_tensorrt(digits.path, tmp_path, precision="fp16", calibration=None, min_tensorrt_version="ten")


def test_initializers_the_preprocessing_added_get_names_of_their_own_everywhere_they_are_read() -> None:
    """``_rename_initializers``: the renamed initializer keeps its data and every reader (a node, a
    node inside an If branch, a graph input listing it) reads the new name; the model still runs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgeship.compiler.emitters.tensorrt import _rename_initializers

    shape = helper.make_tensor("gemm_input_shape", TensorProto.INT64, [2], [1, 4])
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [4], [1, 2, 3, 4])
    branch = helper.make_graph(
        [helper.make_node("Reshape", ["x", "gemm_input_shape"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, 4])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "gemm_input_shape"], ["r"]),
            helper.make_node("Add", ["r", "bias"], ["y"]),
            helper.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=other),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info("gemm_input_shape", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4]),
        ],
        [shape, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _rename_initializers(model, {"gemm_input_shape"})

    new = "edgeship_pre_gemm_input_shape"
    assert {i.name for i in model.graph.initializer} == {new, "bias"}
    assert [v.name for v in model.graph.input] == ["x", "flag", new]
    assert model.graph.node[0].input[1] == new
    then = next(a.g for a in model.graph.node[2].attribute if a.name == "then_branch")
    assert then.node[0].input[1] == new
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32)
    y, z = session.run(None, {"x": x, "flag": np.array(True)})
    np.testing.assert_array_equal(y, [[1, 3, 5, 7]])
    np.testing.assert_array_equal(z, [[0, 1, 2, 3]])
