"""The layer search on real models (compiler/search/fronts.py): it keeps the layer that int8 breaks in float.

The model is a small MLP whose middle layer reads an activation with one channel 1000x larger
than the others (the first layer's row scaled up, the middle layer's column scaled down, so
the float function is unchanged). Int8 with a per-tensor activation scale then wipes out the
other 31 channels of that layer's input, so quantizing the middle layer alone ruins the output
while the other two quantize harmlessly: a search that does not keep exactly that layer in
float, or that claims a cosine it did not measure, fails here. Real ONNX Runtime and LiteRT,
through the runtime Session as the search runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeship.compiler.quantizers.onnx import OnnxQuantizer
from edgeship.compiler.quantizers.tflite import TFLiteQuantizer
from edgeship.compiler.search import fronts
from edgeship.errors import UsageError

TARGET = 0.995


def _outlier_mlp(factor: float = 1000.0):
    import torch

    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(16, 32)
            self.fc2 = torch.nn.Linear(32, 32)
            self.fc3 = torch.nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[0] *= factor
        model.fc1.bias[0] = factor * model.fc1.bias[0].abs()
        model.fc2.weight[:, 0] /= factor
    return model


@pytest.fixture(scope="module")
def mlp():
    import torch

    torch.set_num_threads(1)
    model = _outlier_mlp()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(6)]
    with torch.no_grad():
        reference = [{"y": model(torch.from_numpy(f["x"])).numpy()} for f in feeds]
    return model, feeds, reference


@pytest.fixture(scope="module")
def onnx_model(mlp, tmp_path_factory):
    import onnx
    import torch

    model, feeds, _ = mlp
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    torch.onnx.export(
        model,
        (torch.from_numpy(feeds[0]["x"]),),
        str(path),
        dynamo=True,
        external_data=False,
        input_names=["x"],
        output_names=["y"],
        verbose=False,
    )
    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer}
    by_layer = {}
    for node in graph.node:
        for name in node.input:
            if name in weights and "weight" in name:
                by_layer[name.split(".")[0]] = node.name
    assert set(by_layer) == {"fc1", "fc2", "fc3"}, by_layer
    return path, by_layer


def test_onnx_search_keeps_the_outlier_layer_in_float_and_reaches_the_target(mlp, onnx_model, tmp_path):
    _, feeds, reference = mlp
    path, by_layer = onnx_model
    # reduce_range: 7-bit weights, so an AVX2 CPU without VNNI computes what a VNNI CPU does
    # (its u8 x s8 kernel saturates pairs of products in int16 and fc1 would need float too).
    quantize = OnnxQuantizer("int8-dynamic", fallback="float", reduce_range=True)
    all_int8 = tmp_path / "all.onnx"
    quantize(path, all_int8, [])
    result = fronts.onnx_float_nodes(path, quantize, feeds, reference, TARGET, max_float_fraction=0.5)

    assert result.all_quantized_cosine < 0.99  # the model really is broken by int8 everywhere
    assert result.kept_float == [by_layer["fc2"]]
    assert result.reached and result.cosine >= TARGET
    assert max(result.scores, key=lambda name: result.scores[name]) == by_layer["fc2"]
    assert result.evaluations <= len(result.scores) + 4  # O(candidates), not O(candidates^2)
    # The reported cosine is the one of the model it describes, re-measured independently.
    mixed = tmp_path / "mixed.onnx"
    quantize(path, mixed, result.kept_float)
    assert _onnx_cosine(mixed, feeds, reference) == pytest.approx(result.cosine, abs=1e-6)
    assert _onnx_cosine(all_int8, feeds, reference) == pytest.approx(result.all_quantized_cosine, abs=1e-6)


def test_onnx_static_qdq_quantizes_gemm_inputs_only_so_only_the_layer_reading_the_outlier_stays_float(
    mlp, onnx_model, tmp_path
):
    # ORT's default would put Q/DQ on each Gemm's output too: fc1's output (the outlier tensor)
    # would then be rounded to 8 bits when fc1 is quantized, and both fc1 and fc2 had to stay
    # float. With Q/DQ on inputs only, fc1 computes in int8 and hands fc2 a float tensor.
    import onnx

    _, feeds, reference = mlp
    path, by_layer = onnx_model
    quantize = OnnxQuantizer("int8-qdq", calibration=feeds, fallback="float")
    all_int8 = tmp_path / "all.onnx"
    quantize(path, all_int8, [])
    graph = onnx.load(str(all_int8)).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    quantized_inputs = [producer.get(node.input[0]) for node in graph.node if node.op_type == "QuantizeLinear"]
    assert quantized_inputs and not {"Gemm", "MatMul"} & set(quantized_inputs), quantized_inputs

    result = fronts.onnx_float_nodes(path, quantize, feeds, reference, TARGET, max_float_fraction=1.0)
    assert result.all_quantized_cosine < 0.99
    assert result.kept_float == [by_layer["fc2"]], result.summary()
    assert result.reached and result.cosine >= TARGET
    assert max(result.scores, key=lambda name: result.scores[name]) == by_layer["fc2"]


def test_tflite_search_keeps_the_outlier_op_in_float_and_reaches_the_target(mlp, tmp_path):
    import litert_torch
    import torch

    model, feeds, reference = mlp
    fp32 = tmp_path / "mlp.tflite"
    litert_torch.convert(model, (torch.from_numpy(feeds[0]["x"]),)).export(str(fp32))
    quantize = TFLiteQuantizer("int8-dynamic", fallback="float")
    candidates = quantize.candidates(fp32)
    assert len(candidates) == 3, candidates  # the three FULLY_CONNECTED ops

    result = fronts.tflite_float_ops(fp32, quantize, feeds, reference, TARGET, max_float_fraction=0.5)

    assert result.all_quantized_cosine < 0.99
    assert result.reached and result.cosine >= TARGET, result.summary()
    assert len(result.kept_float) == 1 and "fc2" in result.kept_float[0], result.kept_float
    mixed = tmp_path / "mixed.tflite"
    quantize(fp32, mixed, result.kept_float)
    # Re-measured independently, in a bare LiteRT interpreter (the model's I/O is float).
    assert float(fronts.cosines(_litert_outputs(mixed, feeds), reference).min()) == pytest.approx(
        result.cosine, abs=1e-6
    )
    # The kept op really is float: its weights stay float32, the other two are int8.
    assert _tflite_weight_dtypes(mixed) == {"float32": 1, "int8": 2}


def test_auto_fallback_takes_float_where_int8_weights_lose_the_outlier_compensation(mlp, onnx_model):
    # fc2's weights facing the loud channel were divided by 1000: an int8 step per output channel
    # rounds them to zero, so weight-only fc2 cannot reach the target; float fc2 can.
    _, feeds, reference = mlp
    path, by_layer = onnx_model
    quantize = OnnxQuantizer("int8-dynamic", reduce_range=True)
    result, used = fronts.choose(fronts.onnx_float_nodes, path, quantize, feeds, reference, TARGET, 0.5, "auto")
    assert used == "float" and quantize.fallback == "float"
    assert result.kept_float == [by_layer["fc2"]] and result.reached
    assert any("weight-only fallback reached" in n for n in result.notes)
    with pytest.raises(UsageError, match="fallback is one of"):
        fronts.choose(fronts.onnx_float_nodes, path, quantize, feeds, reference, TARGET, 0.5, "fp16")


def test_a_weight_only_tflite_model_sets_layers_apart_as_float_in_one_search(mlp, tmp_path):
    import litert_torch
    import torch

    model, feeds, reference = mlp
    fp32 = tmp_path / "mlp.tflite"
    litert_torch.convert(model, (torch.from_numpy(feeds[0]["x"]),)).export(str(fp32))
    quantize = TFLiteQuantizer("int8-weight-only")
    assert not quantize.can_weight_only
    searches = []

    def front(*args, **kwargs):
        searches.append(args[1].fallback)
        return fronts.tflite_float_ops(*args, **kwargs)

    result, used = fronts.choose(front, fp32, quantize, feeds, reference, TARGET, 0.5, "auto")
    assert used == "float" and searches == ["float"]
    assert result.reached and len(result.kept_float) == 1 and "fc2" in result.kept_float[0]


@pytest.fixture(scope="module")
def loud_sample():
    """A plain MLP and feeds whose first sample is 300x louder than the rest: one activation scale
    per tensor (ORT's dynamic int8, static int8 from calibration) flattens the quiet samples, while
    int8 *weights* are harmless. The weight-only fallback reaches the target at int8 size."""
    import torch

    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    ).eval()
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(6):
        x = rng.standard_normal((4, 16)).astype(np.float32)
        x[0] *= 300.0
        feeds.append({"x": x})
    with torch.no_grad():
        reference = [{"y": model(torch.from_numpy(f["x"])).numpy()} for f in feeds]
    return model, feeds, reference


def test_onnx_weight_only_fallback_reaches_the_target_with_every_weight_int8(loud_sample, tmp_path):
    import onnx
    import torch
    from onnx import numpy_helper

    model, feeds, reference = loud_sample
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (torch.from_numpy(feeds[0]["x"]),), str(path), dynamo=True, external_data=False,
                      input_names=["x"], output_names=["y"], verbose=False)  # fmt: skip
    quantize = OnnxQuantizer("int8-dynamic")
    result = fronts.onnx_float_nodes(path, quantize, feeds, reference, TARGET, max_float_fraction=1.0)

    assert result.all_quantized_cosine < 0.99, result.summary()
    assert result.reached and result.kept_float, result.summary()
    mixed = tmp_path / "mixed.onnx"
    quantize(path, mixed, result.kept_float)
    assert _onnx_cosine(mixed, feeds, reference) == pytest.approx(result.cosine, abs=1e-6)
    big = [numpy_helper.to_array(t) for t in onnx.load(str(mixed)).graph.initializer if np.prod(t.dims) >= 128]
    assert len(big) == 3 and all(w.dtype in (np.int8, np.uint8) for w in big), [w.dtype for w in big]
    # The same search with a float fallback leaves those weights float32.
    quantize.fallback = "float"
    quantize(path, mixed, result.kept_float)
    big = [numpy_helper.to_array(t) for t in onnx.load(str(mixed)).graph.initializer if np.prod(t.dims) >= 128]
    assert sum(w.dtype == np.float32 for w in big) == len(result.kept_float)


def test_tflite_weight_only_fallback_in_static_int8_keeps_int8_weights(tmp_path):
    # A 60x channel: static int8 (one scale per activation tensor) leaves the other channels a
    # few steps, while fc2's weights facing it are only 60x smaller than the rest of their output
    # channel, which an int8 step still roughly resolves. So the layers around the loud tensor need float
    # *compute*, not float weights: the fallback keeps every weight int8 and reaches the target.
    import litert_torch
    import torch

    model = _outlier_mlp(60.0)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(6)]
    with torch.no_grad():
        reference = [{"y": model(torch.from_numpy(f["x"])).numpy()} for f in feeds]
    fp32 = tmp_path / "mlp.tflite"
    litert_torch.convert(model, (torch.from_numpy(feeds[0]["x"]),)).export(str(fp32))
    quantize = TFLiteQuantizer("int8-static", calibration=feeds)
    result = fronts.tflite_float_ops(fp32, quantize, feeds, reference, TARGET, max_float_fraction=1.0)

    assert result.all_quantized_cosine < TARGET, result.summary()  # measured 0.9935
    assert result.reached and result.kept_float, result.summary()
    from edgeship.compiler.emitters.tflite import weight_bytes

    mixed, floats = tmp_path / "mixed.tflite", tmp_path / "floats.tflite"
    quantize(fp32, mixed, result.kept_float)
    # Every weight is stored int8 (the kept ops read theirs through a DEQUANTIZE).
    assert _tflite_weight_dtypes(mixed)["int8"] == 3
    # The search ran this int8-I/O model as a device does: the runtime quantized the float feeds
    # and dequantized the outputs with the scales the model carries.
    with fronts.open_candidate(mixed, feeds[0], reference[0]) as session:
        assert session.backend_name == "litert"
        assert session.manifest.inputs[0].dtype == "int8" and session.manifest.inputs[0].quantization is not None
        got = [session.run(f) for f in feeds]
    assert float(fronts.cosines(got, reference).min()) == pytest.approx(result.cosine, abs=1e-6)
    quantize.fallback = "float"
    quantize(fp32, floats, result.kept_float)
    assert _tflite_weight_dtypes(floats).get("int8", 0) == 3 - len(result.kept_float)
    assert weight_bytes(mixed) < weight_bytes(floats)


def _onnx_cosine(path: Path, feeds, reference) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [{"y": session.run(["y"], f)[0]} for f in feeds]
    return float(fronts.cosines(got, reference).min())


def _litert_outputs(path: Path, feeds) -> list[dict[str, np.ndarray]]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    (detail,) = interp.get_input_details()
    assert np.dtype(detail["dtype"]) == np.float32
    runner = interp.get_signature_runner()
    return [{"y": next(iter(runner(args_0=f["x"]).values()))} for f in feeds]


def _tflite_weight_dtypes(path: Path) -> dict[str, int]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    counts: dict[str, int] = {}
    for detail in interp.get_tensor_details():
        if len(detail["shape"]) == 2 and tuple(detail["shape"]) in ((32, 16), (32, 32), (8, 32)):
            dtype = np.dtype(detail["dtype"]).name
            counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def test_a_missing_model_is_named_before_any_work(tmp_path):
    quantize = OnnxQuantizer("int8-dynamic")
    with pytest.raises(UsageError, match=r"ONNX model .*absent\.onnx does not exist"):
        fronts.onnx_float_nodes(tmp_path / "absent.onnx", quantize, [], [], TARGET)
    with pytest.raises(UsageError, match=r"TFLite model .*absent\.tflite does not exist"):
        fronts.tflite_float_ops(tmp_path / "absent.tflite", TFLiteQuantizer(), [], [], TARGET)


def test_feeds_that_do_not_fit_the_model_are_refused_with_the_counts(mlp, onnx_model, tmp_path):
    import litert_torch
    import torch

    model, feeds, reference = mlp
    path, _ = onnx_model
    with pytest.raises(UsageError, match="no feeds to search"):
        fronts.onnx_float_nodes(path, OnnxQuantizer("int8-dynamic"), [], [], TARGET)
    fp32 = tmp_path / "mlp.tflite"
    litert_torch.convert(model, (torch.from_numpy(feeds[0]["x"]),)).export(str(fp32))
    two = [{"x": f["x"], "extra": f["x"]} for f in feeds]
    with pytest.raises(UsageError, match="has 1 inputs and 1 outputs; the feeds give 2 inputs"):
        fronts.tflite_float_ops(fp32, TFLiteQuantizer(), two, reference, TARGET)
