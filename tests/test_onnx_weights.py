"""Weight-only int8 for chosen ONNX nodes: int8 on disk, the float function kept, run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.compiler.emitters.onnx_weights import quantize_symmetric, weight_only_int8, weight_only_matmul

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _graph(rng: np.random.Generator, shared: bool = False):
    """ids -> Gather(table) -> MatMul(w1) -> Gemm(w2, transB) -> Gemm(w3) -> y, plus a Conv branch."""
    from onnx import TensorProto, helper, numpy_helper

    table = rng.standard_normal((50, 8)).astype(np.float32)
    table[7] *= 40.0  # one loud row: a per-tensor scale would flatten every other row
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    w1[:, 2] *= 0.01  # one quiet output channel: per-channel scales keep it
    w2 = rng.standard_normal((5, 6)).astype(np.float32)  # Gemm with transB=1: (out, in)
    w3 = rng.standard_normal((5, 4)).astype(np.float32)
    conv = rng.standard_normal((3, 1, 2, 2)).astype(np.float32)
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(w3, "w3"),
        numpy_helper.from_array(conv, "conv_w"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed", axis=0),
        helper.make_node("MatMul", ["emb", "w1"], ["h1"], name="mm"),
        helper.make_node("Gemm", ["h1", "w2"], ["h2"], name="gemm_t", transB=1),
        helper.make_node("Gemm", ["h2", "w3"], ["y"], name="gemm"),
        helper.make_node("Conv", ["img", "conv_w"], ["z"], name="conv"),
    ]
    if shared:  # a second consumer of w1 outside the rewritten set
        nodes.append(helper.make_node("MatMul", ["emb", "w1"], ["h1b"], name="mm_twin"))
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 4, 4]),
    ]
    if shared:
        outputs.append(helper.make_tensor_value_info("h1b", TensorProto.FLOAT, [4, 6]))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [4]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 5, 5]),
        ],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _feed(rng):
    return {"ids": np.array([7, 0, 3, 49], np.int64), "img": rng.standard_normal((1, 1, 5, 5)).astype(np.float32)}


def test_quantize_symmetric_is_per_channel_and_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 9)).astype(np.float32)
    w[:, 3] *= 1e-3
    w[:, 5] = 0.0
    for axis in (0, 1, -1):
        q, scale = quantize_symmetric(w, axis)
        assert q.dtype == np.int8 and q.min() >= -127
        assert scale.shape == (w.shape[axis],) and (scale > 0).all()
        shape = [1, 1]
        shape[axis] = -1
        error = np.abs(q * scale.reshape(shape) - w)
        assert (error <= scale.reshape(shape) / 2 + 1e-9).all()
    q, _ = quantize_symmetric(w, 1)
    assert np.abs(q[:, 3]).max() == 127  # the quiet channel uses the whole int8 range
    assert not q[:, 5].any()


def test_every_weight_op_keeps_its_function_with_int8_weights():
    from onnx import numpy_helper

    rng = np.random.default_rng(1)
    model = _graph(rng)
    feed = _feed(rng)
    want = _run(model, feed)
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)

    done = weight_only_int8(model, ["embed", "mm", "gemm_t", "gemm", "conv", "no-such-node"])

    assert sorted(done) == ["conv", "embed", "gemm", "gemm_t", "mm"]
    onnx.checker.check_model(model, full_check=True)
    dtypes = {t.name: numpy_helper.to_array(t).dtype for t in model.graph.initializer}
    assert not any(name in dtypes for name in ("table", "w1", "w2", "w3", "conv_w"))  # no float copy left
    assert sum(d == np.int8 for n, d in dtypes.items() if n.endswith("_int8")) == 5
    # One scale per *output* channel, and the DequantizeLinear reads them along that axis.
    scales = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer if t.name.endswith("_wo_scale")}
    assert scales == {"w1_wo_scale": (6,), "w2_wo_scale": (5,), "w3_wo_scale": (4,), "conv_w_wo_scale": (3,)}
    axes = {n.input[0]: n.attribute[0].i for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert axes == {"w1_wo_int8": 1, "w2_wo_int8": 0, "w3_wo_int8": 1, "conv_w_wo_int8": 0}
    int8_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert int8_bytes < 0.45 * float_bytes  # small tensors: scales and zero points weigh in
    got = _run(model, feed)
    for g, w in zip(got, want):
        assert np.allclose(g, w, rtol=0.03, atol=0.03 * np.abs(w).max()), np.abs(g - w).max()
    # The embedding's loud row and its quiet rows both survive: one scale per row.
    emb = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "table_wo_row_scale"))
    assert emb.shape == (50, 1) and emb[7, 0] > 10 * np.median(emb)


def test_a_weight_shared_with_another_node_and_unnamed_targets_are_left_alone():
    rng = np.random.default_rng(2)
    model = _graph(rng, shared=True)
    feed = _feed(rng)
    want = _run(model, feed)
    assert weight_only_int8(model, ["mm", "gemm"]) == ["gemm"]  # w1 also feeds mm_twin
    assert any(t.name == "w1" for t in model.graph.initializer)
    assert weight_only_int8(model, []) == []
    got = _run(model, feed)
    assert np.array_equal(got[2], want[2])


def test_graphs_below_opset_13_are_not_rewritten():
    from onnx import helper

    rng = np.random.default_rng(3)
    model = _graph(rng)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 12))
    assert weight_only_int8(model, ["mm"]) == []


def test_matmulnbits_takes_the_named_matmul_only_and_keeps_its_function():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((256, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="chosen"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="other"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feed = {"x": rng.standard_normal((3, 256)).astype(np.float32)}
    (want,) = _run(model, feed)

    model, done = weight_only_matmul(model, ["chosen", "absent"])

    assert done == ["chosen"]
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["other"] == "MatMul" and "MatMulNBits" in ops.values()  # the other MatMul stays float
    assert any(t.name == "w2" and t.data_type == TensorProto.FLOAT for t in model.graph.initializer)
    (got,) = _run(model, feed)
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.9999 and not np.array_equal(got, want)
