"""The Core ML emitter and the numpy reference evaluator, checked against PyTorch.

Every op the evaluator claims to compute is converted from a tiny torch module with
coremltools (fp32, iOS16 or iOS17 opsets) and evaluated; the result must match torch.
Compressed weights are checked against coremltools' own decompression. The digits CNN
runs through the runtime's Session (backend "coreml-reference") at four precisions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

from edgeship.compiler.coreml import (  # noqa: E402
    CoreMLReferenceBackend,
    ReferenceEvaluator,
    UnsupportedOpError,
    emit_coreml,
    kernels,
    register,
    supported_ops,
    unsupported_ops,
)
from edgeship.errors import UsageError  # noqa: E402
from edgeship.runtime import open_unpackaged  # noqa: E402
from edgeship.runtime.backends.registry import registered, select  # noqa: E402
from edgeship.runtime.package.manifest import Manifest, TensorSpec  # noqa: E402

RNG = np.random.default_rng(0)
F = torch.nn.functional


def _convert(module: Any, inputs: tuple[Any, ...], path: Path, min_os: str = "iOS16") -> Any:
    import coremltools as ct

    module.eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs)
        reference = module(*inputs)
    outs = reference if isinstance(reference, tuple) else (reference,)
    mlmodel = ct.convert(
        traced,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, min_os),
        inputs=[
            ct.TensorType(name=f"in{i}", shape=tuple(x.shape), dtype=np.float32 if x.is_floating_point() else np.int32)
            for i, x in enumerate(inputs)
        ],
        outputs=[ct.TensorType(name=f"out{i}") for i in range(len(outs))],
        compute_precision=ct.precision.FLOAT32,
    )
    mlmodel.save(str(path))
    return [o.numpy() for o in outs]


def _feeds(inputs: tuple[Any, ...]) -> dict[str, np.ndarray]:
    return {f"in{i}": x.numpy().astype(np.float32 if x.is_floating_point() else np.int32) for i, x in enumerate(inputs)}


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
        np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=what)
        return
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    assert err <= 1e-5 * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


def _randn(*shape: int) -> Any:
    return torch.from_numpy(RNG.standard_normal(shape).astype(np.float32))


class Fn(torch.nn.Module):
    """A module that applies ``fn`` to its inputs (parameters, if any, live in ``layers``)."""

    def __init__(self, fn: Any, *layers: torch.nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, *xs: Any) -> Any:
        return self.fn(self, *xs)


def _bn(channels: int, dims: int) -> torch.nn.Module:
    bn = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims](channels)
    with torch.no_grad():
        bn.running_mean.copy_(_randn(channels))
        bn.running_var.copy_(_randn(channels).abs() + 0.5)
        bn.weight.copy_(_randn(channels))
        bn.bias.copy_(_randn(channels))
    return bn


def _seeded(layer: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(_randn(*p.shape))
    return layer


# (id, module, inputs, MIL ops the program must contain, opset)
CASES: list[tuple[str, Any, tuple[Any, ...], set[str], str]] = [
    # convolution: padding, strides, dilations, groups, 1-D / 3-D, "same"
    ("conv2d-pad1", torch.nn.Conv2d(3, 4, 3, padding=1), (_randn(2, 3, 7, 7),), {"conv"}, "iOS16"),
    (
        "conv2d-stride-dilation",
        torch.nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=(1, 2)),
        (_randn(1, 3, 11, 9),),
        {"conv"},
        "iOS17",
    ),
    ("conv2d-groups", torch.nn.Conv2d(4, 6, (3, 2), groups=2, bias=False), (_randn(1, 4, 6, 5),), {"conv"}, "iOS16"),
    (
        "conv2d-depthwise-same",
        torch.nn.Conv2d(4, 4, 3, groups=4, padding="same"),
        (_randn(1, 4, 6, 5),),
        {"conv"},
        "iOS17",
    ),
    (
        "conv1d-same-dilated",
        torch.nn.Conv1d(2, 3, 4, padding="same", dilation=2),
        (_randn(1, 2, 10),),
        {"conv"},
        "iOS16",
    ),
    ("conv3d", torch.nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (_randn(1, 2, 4, 5, 3),), {"conv"}, "iOS16"),
    # normalization
    ("batch_norm-2d", Fn(lambda m, x: m.layers[0](x), _bn(3, 2)), (_randn(2, 3, 4, 4),), {"batch_norm"}, "iOS16"),
    ("batch_norm-1d", Fn(lambda m, x: m.layers[0](x), _bn(3, 1)), (_randn(2, 3, 5),), {"batch_norm"}, "iOS17"),
    (
        "instance_norm",
        _seeded(torch.nn.InstanceNorm2d(3, affine=True)),
        (_randn(2, 3, 4, 5),),
        {"instance_norm"},
        "iOS16",
    ),
    ("layer_norm", _seeded(torch.nn.LayerNorm(8)), (_randn(2, 5, 8),), {"layer_norm"}, "iOS17"),
    ("layer_norm-2axes", _seeded(torch.nn.LayerNorm((4, 8))), (_randn(2, 4, 8),), {"layer_norm"}, "iOS16"),
    # pooling
    ("max_pool-pad", torch.nn.MaxPool2d(3, stride=2, padding=1), (_randn(1, 2, 7, 8),), {"max_pool"}, "iOS16"),
    ("max_pool-ceil", torch.nn.MaxPool2d(2, stride=2, ceil_mode=True), (_randn(1, 2, 7, 5),), {"max_pool"}, "iOS17"),
    ("max_pool-1d", torch.nn.MaxPool1d(3, stride=1), (_randn(1, 2, 9),), {"max_pool"}, "iOS16"),
    ("avg_pool-include-pad", torch.nn.AvgPool2d(3, stride=2, padding=1), (_randn(1, 2, 7, 8),), {"avg_pool"}, "iOS16"),
    (
        "avg_pool-exclude-pad",
        torch.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        (_randn(1, 2, 7, 8),),
        {"avg_pool"},
        "iOS17",
    ),
    ("avg_pool-ceil", torch.nn.AvgPool2d(2, stride=2, ceil_mode=True), (_randn(1, 2, 7, 5),), {"avg_pool"}, "iOS16"),
    # linear algebra and activations
    ("linear", _seeded(torch.nn.Linear(6, 5)), (_randn(3, 6),), {"linear"}, "iOS16"),
    (
        "matmul-batched",
        Fn(lambda m, a, b: a @ b.transpose(-1, -2)),
        (_randn(2, 3, 4, 5), _randn(1, 3, 6, 5)),
        {"matmul"},
        "iOS17",
    ),
    ("softmax", Fn(lambda m, x: torch.softmax(x, 1)), (_randn(2, 5, 3),), {"softmax"}, "iOS16"),
    ("gelu-exact", Fn(lambda m, x: F.gelu(3 * x)), (_randn(4, 9),), {"gelu"}, "iOS16"),
    ("gelu-tanh", Fn(lambda m, x: F.gelu(3 * x, approximate="tanh")), (_randn(4, 9),), {"gelu"}, "iOS17"),
    (
        "silu-sigmoid-tanh-relu",
        Fn(lambda m, x: (F.silu(x), torch.sigmoid(8 * x), torch.tanh(x), F.relu(x))),
        (_randn(3, 7),),
        {"silu", "sigmoid", "tanh", "relu"},
        "iOS16",
    ),
    ("erf", Fn(lambda m, x: torch.erf(2 * x)), (_randn(5, 7),), {"erf"}, "iOS16"),
    (
        "binary",
        Fn(
            lambda m, a, b: (
                a + b,
                a - b,
                a * b,
                a / (b.abs() + 1),
                torch.maximum(a, b),
                torch.minimum(a, b),
                a.abs() ** b,
            )
        ),
        (_randn(3, 4), _randn(1, 4)),
        {"add", "sub", "mul", "real_div", "maximum", "minimum", "pow"},
        "iOS16",
    ),
    # reductions
    (
        "reduce",
        Fn(
            lambda m, x: (
                x.sum(1),
                x.mean((1, 2), keepdim=True),
                x.amax(-1),
                x.amin(0),
                (x * x).sum(1),
                torch.logsumexp(x, 1),
                x.norm(dim=2),
                x.norm(p=1, dim=2),
            )
        ),
        (_randn(2, 3, 4),),
        {"reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_log_sum_exp", "reduce_l2_norm"},
        "iOS16",
    ),
    (
        "reduce-arg-cumsum",
        Fn(lambda m, x: (x.argmax(1).float(), x.argmin(-1, keepdim=True).float(), torch.cumsum(x, 1))),
        (_randn(2, 5, 3),),
        {"reduce_argmax", "reduce_argmin", "cumsum"},
        "iOS17",
    ),
    # tensor shape ops
    (
        "shape-ops",
        Fn(
            lambda m, x: (
                x.reshape(2, -1),
                x.permute(2, 0, 1),
                torch.cat([x, 2 * x], 1),
                *torch.split(x, [1, 2], 1),
                x.unsqueeze(1),
                x[:, :1].squeeze(1),
            )
        ),
        (_randn(2, 3, 4),),
        {"reshape", "transpose", "concat", "split", "expand_dims", "squeeze"},
        "iOS17",
    ),
    ("reshape-iOS16", Fn(lambda m, x: x.flatten(1).reshape(3, 2, -1)), (_randn(3, 2, 4),), {"reshape"}, "iOS16"),
    ("gather-embedding", _seeded(torch.nn.Embedding(10, 4)), (torch.tensor([[1, 9, 0, 3]]),), {"gather"}, "iOS16"),
    (
        "gather-index_select",
        Fn(lambda m, x, i: torch.index_select(x, 1, i)),
        (_randn(2, 5), torch.tensor([4, 0, 2])),
        {"gather"},
        "iOS17",
    ),
    ("cast", Fn(lambda m, x: ((x * 3).int() * 2).float()), (_randn(3, 4),), {"cast"}, "iOS16"),
    # ops computed by coremltools' value_inference
    (
        "vi-unary",
        Fn(
            lambda m, x: (
                x.abs(),
                torch.exp(x),
                torch.log(x.abs() + 1),
                torch.sqrt(x.abs()),
                torch.rsqrt(x.abs() + 1),
                torch.floor(x),
                torch.ceil(x),
                torch.sign(x),
                torch.sin(x),
                torch.cos(x),
                x.clamp(-0.5, 0.7),
                torch.round(x * 3),
                torch.square(x),
            )
        ),
        (_randn(4, 5),),
        {"abs", "exp", "log", "sqrt", "rsqrt", "floor", "ceil", "sign", "sin", "cos", "clip", "round"},
        "iOS16",
    ),
    (
        "vi-activations",
        Fn(
            lambda m, x: (
                F.elu(x),
                F.leaky_relu(x, 0.1),
                F.relu6(4 * x),
                F.softplus(x),
                F.softsign(x),
                F.hardsigmoid(x),
                F.hardtanh(x),
            )
        ),
        (_randn(4, 5),),
        {"elu", "leaky_relu", "relu6", "softplus", "sigmoid_hard", "clip"},
        "iOS16",
    ),
    ("vi-prelu", _seeded(torch.nn.PReLU(3)), (_randn(2, 3, 4, 4),), {"prelu"}, "iOS17"),
    (
        "vi-compare-select",
        Fn(
            lambda m, a, b: (
                torch.where(a > b, a, b),
                (a >= b).float(),
                (a < b).float(),
                (a == a).float(),
                torch.where(a <= 0, a, 0.0),
            )
        ),
        (_randn(3, 4), _randn(3, 4)),
        {"select", "greater", "greater_equal", "less", "equal", "less_equal"},
        "iOS16",
    ),
    (
        "vi-slice-pad-tile",
        Fn(
            lambda m, x: (
                x[:, 1:3, ::2],
                x[..., -1],
                F.pad(x, (1, 2), mode="reflect"),
                F.pad(x, (1, 1, 2, 0)),
                x.repeat(1, 2, 1),
                torch.flip(x, [1]),
                torch.stack([x, x], 1),
            )
        ),
        (_randn(2, 4, 5),),
        {"slice_by_index", "pad", "tile", "reverse", "stack"},
        "iOS16",
    ),
    (
        "gather_nd",
        Fn(lambda m, x: x[:, [0, 2, -1], [1, 3, 0]]),
        (_randn(2, 4, 5, 3),),
        {"gather_nd"},
        "iOS17",
    ),
    (
        "upsample_bilinear-size",
        Fn(lambda m, x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False)),
        (_randn(1, 2, 4, 5),),
        {"upsample_bilinear"},
        "iOS17",
    ),
    (
        "upsample_bilinear-align-corners",
        Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)),
        (_randn(1, 2, 3, 4),),
        {"upsample_bilinear"},
        "iOS16",
    ),
    ("vi-topk", Fn(lambda m, x: tuple(t.float() for t in torch.topk(x, 2, dim=1))), (_randn(3, 6),), {"topk"}, "iOS17"),
    (
        "vi-floor_div-mod",
        Fn(lambda m, a, b: (torch.floor_divide(a, b.abs() + 1), torch.remainder(a, b.abs() + 1))),
        (_randn(3, 4) * 5, _randn(3, 4)),
        {"floor_div"},
        "iOS16",
    ),
]


@pytest.mark.parametrize(("name", "module", "inputs", "ops", "min_os"), CASES, ids=[c[0] for c in CASES])
def test_each_op_matches_torch(tmp_path, name, module, inputs, ops, min_os):
    want = _convert(module, inputs, tmp_path / "m.mlpackage", min_os)
    evaluator = ReferenceEvaluator(tmp_path / "m.mlpackage")
    missing = ops - set(evaluator.op_types)
    assert not missing, f"the program does not contain {missing} (it has {evaluator.op_types}); the test checks nothing"
    assert ops <= supported_ops()
    got = evaluator.run(_feeds(inputs))
    assert [o.name for o in evaluator.outputs] == [f"out{i}" for i in range(len(want))]
    for i, expected in enumerate(want):
        _close(got[f"out{i}"], expected, f"{name} output {i}")


def test_torch_reciprocal_converts_to_inverse_with_an_epsilon(tmp_path):
    """coremltools turns torch.reciprocal into MIL inverse with its default epsilon 1e-4: the program
    computes 1 / (x + 1e-4), about 1e-4 relative off torch. The evaluator follows the program."""
    x = _randn(4, 5).abs() + 0.5
    want = _convert(Fn(lambda m, x: torch.reciprocal(x)), (x,), tmp_path / "r.mlpackage")[0]
    evaluator = ReferenceEvaluator(tmp_path / "r.mlpackage")
    assert "inverse" in evaluator.op_types
    got = evaluator.run({"in0": x.numpy()})["out0"]
    _close(got, 1.0 / (x.numpy() + np.float32(1e-4)), "inverse")
    assert np.abs(got - want).max() > 1e-5


def test_quantize_and_dequantize_match_torch_fake_quantize(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    scale = np.array([0.02, 0.05, 0.1], np.float32)
    zero_point = np.array([3, -2, 0], np.int8)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 5))], opset_version=ct.target.iOS17)
    def program(x):
        per_channel = mb.quantize(input=x, scale=scale, zero_point=zero_point, axis=1, output_dtype="int8")
        per_tensor = mb.quantize(input=x, scale=np.float32(0.03), zero_point=np.uint8(128), output_dtype="uint8")
        return (
            mb.dequantize(input=per_channel, scale=scale, zero_point=zero_point, axis=1, name="channel"),
            mb.dequantize(input=per_tensor, scale=np.float32(0.03), zero_point=np.uint8(128), name="tensor"),
        )

    ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        pass_pipeline=ct.PassPipeline.EMPTY,
    ).save(str(tmp_path / "q.mlpackage"))
    evaluator = ReferenceEvaluator(tmp_path / "q.mlpackage")
    assert {"quantize", "dequantize"} <= set(evaluator.op_types)
    x = _randn(2, 3, 5) * 3  # wide enough to saturate
    got = list(evaluator.run({"x": x.numpy()}).values())
    channel = torch.fake_quantize_per_channel_affine(
        x, torch.from_numpy(scale), torch.from_numpy(zero_point.astype(np.int32)), 1, -128, 127
    )
    tensor = torch.fake_quantize_per_tensor_affine(x, 0.03, 128, 0, 255)
    _close(got[0], channel.numpy(), "per-channel int8")
    _close(got[1], tensor.numpy(), "per-tensor uint8")


def test_ops_torch_does_not_emit_match_numpy(tmp_path):
    """Ops and attributes no torch module converts to, built directly with coremltools' MIL builder."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    ids = np.array([[2, 0], [1, 1]], np.int32)

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=x.shape),
            mb.TensorSpec(shape=ids.shape, dtype=ct.converters.mil.mil.types.int32),
        ],
        opset_version=ct.target.iOS17,
    )
    def program(x, ids):
        return (
            mb.reduce_prod(x=x, axes=[1], keep_dims=True),
            mb.reduce_sum_square(x=x, axes=[0, 2]),
            mb.reduce_l1_norm(x=x, axes=[-1]),
            mb.reduce_log_sum(x=mb.abs(x=x), axes=[1]),
            mb.concat(values=[x, mb.mul(x=x, y=np.float32(2))], axis=1, interleave=True),
            mb.gather(x=x, indices=ids, axis=1, batch_dims=1),
            mb.reshape(x=x, shape=[1, 0, -1, 0]),  # iOS17: zeros count from the right
            mb.square(x=x),
            mb.softsign(x=x),
            mb.mod(x=x, y=np.float32(0.7)),
            mb.cumsum(x=x, axis=2, exclusive=True, reverse=True),
            mb.add(x=x, y=mb.constexpr_cast(source_val=np.full((2, 3, 4), 0.25, np.float16), output_dtype="fp32")),
        )

    ct.convert(
        program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17, pass_pipeline=ct.PassPipeline.EMPTY
    ).save(str(tmp_path / "b.mlpackage"))
    evaluator = ReferenceEvaluator(tmp_path / "b.mlpackage")
    assert {"reduce_prod", "reduce_sum_square", "reduce_l1_norm", "reduce_log_sum", "constexpr_cast"} <= set(
        evaluator.op_types
    )
    got = list(evaluator.run({"x": x, "ids": ids}).values())
    interleaved = np.stack([x, 2 * x], axis=2).reshape(2, 6, 4)
    gathered = np.stack([x[b][ids[b]] for b in range(2)])
    reverse_exclusive = np.flip(np.cumsum(np.flip(x, 2), 2), 2) - x
    want = [
        x.prod(1, keepdims=True),
        (x * x).sum((0, 2)),
        np.abs(x).sum(-1),
        np.log(np.abs(x).sum(1)),
        interleaved,
        gathered,
        x.reshape(1, 2, 3, 4),  # the second 0 takes x.shape[0], the last x.shape[-1]
        x * x,
        x / (1 + np.abs(x)),
        np.mod(x, 0.7),
        reverse_exclusive,
        x + 0.25,
    ]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, w.astype(np.float32), f"builder output {i}")


def test_same_and_same_lower_padding_put_the_odd_pad_where_core_ml_does(tmp_path):
    """pad_type "same" pads the extra element at the end, "same_lower" at the beginning (MIL builder ops)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    x = RNG.standard_normal((1, 2, 7, 6)).astype(np.float32)
    w = RNG.standard_normal((3, 2, 4, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS16)
    def program(x):
        return (
            mb.conv(x=x, weight=w, strides=[2, 2], pad_type="same"),
            mb.conv(x=x, weight=w, strides=[2, 2], pad_type="same_lower"),
            mb.conv(x=x, weight=w, strides=[1, 2], dilations=[2, 1], pad_type="valid"),
            mb.max_pool(x=x, kernel_sizes=[2, 3], strides=[2, 2], pad_type="same"),
            mb.avg_pool(
                x=x, kernel_sizes=[2, 3], strides=[2, 2], pad_type="same_lower", exclude_padding_from_average=True
            ),
        )

    ct.convert(
        program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16, pass_pipeline=ct.PassPipeline.EMPTY
    ).save(str(tmp_path / "pad.mlpackage"))
    got = list(ReferenceEvaluator(tmp_path / "pad.mlpackage").run({"x": x}).values())
    t, tw = torch.from_numpy(x), torch.from_numpy(w)
    # total "same" padding: 7 rows, kernel 4, stride 2 -> 3 (1 + 2); 6 cols, kernel 3, stride 2 -> 1 (0 + 1)
    same = F.conv2d(F.pad(t, (0, 1, 1, 2)), tw, stride=2)
    same_lower = F.conv2d(F.pad(t, (1, 0, 2, 1)), tw, stride=2)
    valid = F.conv2d(t, tw, stride=(1, 2), dilation=(2, 1))
    # max pool, kernel 2x3 stride 2: rows need 1 (0 + 1), cols need 1 (0 + 1)
    max_same = F.max_pool2d(F.pad(t, (0, 1, 0, 1), value=-np.inf), (2, 3), 2)
    padded = F.pad(t, (1, 0, 1, 0))
    ones = F.pad(torch.ones_like(t), (1, 0, 1, 0))
    avg_lower = F.avg_pool2d(padded, (2, 3), 2) / F.avg_pool2d(ones, (2, 3), 2)
    for i, want in enumerate((same, same_lower, valid, max_same, avg_lower)):
        _close(got[i], want.numpy(), f"padding case {i}")


def test_remaining_value_inference_ops_match_numpy(tmp_path):
    """Every whitelisted value_inference op that the torch cases above do not reach, against numpy."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    x = np.clip(RNG.standard_normal((3, 4)), -0.9, 0.9).astype(np.float32)
    y = RNG.standard_normal((3, 4)).astype(np.float32)
    idx = np.array([[2, 0, 1, 3], [0, 0, 3, 1], [1, 2, 2, 0]], np.int32)

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=x.shape),
            mb.TensorSpec(shape=y.shape),
            mb.TensorSpec(shape=idx.shape, dtype=ct.converters.mil.mil.types.int32),
        ],
        opset_version=ct.target.iOS17,
    )
    def program(x, y, idx):
        gt, lt = mb.greater(x=x, y=y), mb.less(x=x, y=np.float32(0))
        f32 = np.float32
        return (
            mb.acos(x=x), mb.asin(x=x), mb.atan(x=x), mb.atanh(x=x), mb.cosh(x=x), mb.sinh(x=x), mb.tan(x=x),
            mb.exp2(x=x), mb.threshold(x=x, alpha=f32(0.1)), mb.thresholded_relu(x=x, alpha=f32(0.2)),
            mb.clamped_relu(x=x, alpha=f32(0.3), beta=f32(0.5)), mb.linear_activation(x=x, alpha=f32(2), beta=f32(-1)),
            mb.scaled_tanh(x=x, alpha=f32(1.5), beta=f32(0.5)),
            mb.cast(x=mb.not_equal(x=x, y=y), dtype="fp32"),
            mb.cast(x=mb.logical_and(x=gt, y=lt), dtype="fp32"),
            mb.cast(x=mb.logical_or(x=gt, y=lt), dtype="fp32"),
            mb.cast(x=mb.logical_xor(x=gt, y=lt), dtype="fp32"),
            mb.cast(x=mb.logical_not(x=gt), dtype="fp32"),
            mb.slice_by_size(x=x, begin=[1, 1], size=[2, -1]),
            mb.band_part(x=x, lower=1, upper=0),
            mb.fill(shape=[2, 3], value=f32(1.5)),
            mb.range_1d(start=f32(0), end=f32(2), step=f32(0.5)),
            mb.argsort(x=x, axis=1, ascending=True),
            mb.gather_along_axis(x=x, indices=idx, axis=1),
            mb.scatter_along_axis(data=x, indices=idx, updates=y, axis=1, mode="update"),
            mb.l2_norm(x=mb.reshape(x=x, shape=[1, 3, 4]), epsilon=f32(1e-6)),
            mb.einsum(values=(mb.reshape(x=x, shape=[3, 1, 4]), mb.reshape(x=y, shape=[4, 1, 3])), equation="chw,whr->chr"),
            mb.flatten2d(x=mb.reshape(x=x, shape=[3, 2, 2]), axis=1),
            mb.identity(x=x),
            mb.shape(x=x),
            mb.softplus_parametric(x=mb.reshape(x=x, shape=[1, 3, 4]), alpha=np.array([1, 2, 3], f32), beta=np.array([0.5, 1, 2], f32)),
        )  # fmt: skip

    ct.convert(
        program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17, pass_pipeline=ct.PassPipeline.EMPTY
    ).save(str(tmp_path / "vi.mlpackage"))
    evaluator = ReferenceEvaluator(tmp_path / "vi.mlpackage")
    got = list(evaluator.run({"x": x, "y": y, "idx": idx}).values())
    gt, lt = x > y, x < 0
    scattered = x.copy()
    np.put_along_axis(scattered, idx, y, axis=1)
    a, b = np.array([1, 2, 3], np.float32)[:, None], np.array([0.5, 1, 2], np.float32)[:, None]
    want = [
        np.arccos(x), np.arcsin(x), np.arctan(x), np.arctanh(x), np.cosh(x), np.sinh(x), np.tan(x), np.exp2(x),
        np.maximum(x, 0.1), np.where(x < 0.2, 0, x), np.minimum(np.maximum(x, 0), 0.5) + np.minimum(np.minimum(x, 0) * 0.3, 0.5),
        2 * x - 1, 1.5 * np.tanh(0.5 * x),
        (x != y).astype(np.float32), (gt & lt).astype(np.float32), (gt | lt).astype(np.float32),
        (gt ^ lt).astype(np.float32), (~gt).astype(np.float32),
        x[1:3, 1:], np.tril(x) - np.tril(x, -2), np.full((2, 3), 1.5), np.arange(0, 2, 0.5),
        np.argsort(x, axis=1), np.take_along_axis(x, idx, 1), scattered,
        (x / np.sqrt((x * x).sum() + 1e-6))[None], np.einsum("chw,whr->chr", x.reshape(3, 1, 4), y.reshape(4, 1, 3)), x.reshape(3, 4), x,
        np.array([3, 4]), (a * np.log1p(np.exp(x * b)))[None],
    ]  # fmt: skip
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, np.asarray(w), f"value_inference output {i}")
    covered = set(evaluator.op_types) - {"const", "greater", "less", "cast", "reshape"}
    assert len(covered) == 31


def _compressed_programs(tmp_path: Path) -> list[tuple[str, Path]]:
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 64)).eval()
    example = _randn(1, 4, 6, 6)
    traced = torch.jit.trace(model, (example,))
    configs = {
        "affine-int8": (ct.target.iOS16, cto.OpLinearQuantizerConfig(mode="linear", weight_threshold=0)),
        "lut-4bit-ios16": (ct.target.iOS16, cto.OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=0)),
        "sparse-ios16": (ct.target.iOS16, cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)),
        "blockwise-int4": (
            ct.target.iOS18,
            cto.OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=16, weight_threshold=0),
        ),
        "blockwise-uint8-offset": (
            ct.target.iOS18,
            cto.OpLinearQuantizerConfig(mode="linear", dtype="uint8", weight_threshold=0),
        ),
        "lut-per-group-ios18": (
            ct.target.iOS18,
            cto.OpPalettizerConfig(
                mode="kmeans", nbits=2, granularity="per_grouped_channel", group_size=4, weight_threshold=0
            ),
        ),
        "sparse-ios18": (ct.target.iOS18, cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)),
    }
    out = []
    for name, (target, config) in configs.items():
        mlmodel = ct.convert(
            traced,
            convert_to="mlprogram",
            minimum_deployment_target=target,
            inputs=[ct.TensorType(name="x", shape=(1, 4, 6, 6))],
            compute_precision=ct.precision.FLOAT32,
        )
        config_all = cto.OptimizationConfig(global_config=config)
        if isinstance(config, cto.OpPalettizerConfig):
            mlmodel = cto.palettize_weights(mlmodel, config_all)
        elif isinstance(config, cto.OpMagnitudePrunerConfig):
            mlmodel = cto.prune_weights(mlmodel, config_all)
        else:
            mlmodel = cto.linear_quantize_weights(mlmodel, config_all)
        path = tmp_path / f"{name}.mlpackage"
        mlmodel.save(str(path))
        out.append((name, path))
    return out


def test_weight_decompression_matches_coremltools(tmp_path):
    """Each constexpr_* op decompressed by our kernels equals coremltools' own decompression."""
    seen = set()
    for name, path in _compressed_programs(tmp_path):
        evaluator = ReferenceEvaluator(path)
        ours = evaluator.weights()
        constexprs = [
            op for op in evaluator.program.functions["main"].operations if op.op_type.startswith("constexpr_")
        ]
        assert constexprs, f"{name}: nothing was compressed"
        for op in constexprs:
            seen.add(op.op_type)
            theirs = op.materialized_val_inference()
            np.testing.assert_array_equal(ours[op.outputs[0].name], theirs, err_msg=f"{name}: {op.name}")
    assert {
        "constexpr_affine_dequantize",
        "constexpr_lut_to_dense",
        "constexpr_sparse_to_dense",
        "constexpr_blockwise_shift_scale",
    } <= seen


def test_packed_lut_indices_unpack_lsb_first():
    # Core ML packs n-bit indices from the least significant bit: 2-bit [0, 3, 2, 1, 3] -> 0b01101100, 0b00000011.
    packed = np.array([0b01_10_11_00, 0b11], np.uint8)
    np.testing.assert_array_equal(kernels.unpack_bits(packed, 2, 5), [0, 3, 2, 1, 3])


# ---------------------------------------------------------------------------- the digits CNN through the runtime


@pytest.fixture(scope="module")
def digits():
    from examples.digits import train

    torch.manual_seed(0)
    return train()


@pytest.fixture(scope="module")
def digits_reference(digits):
    with torch.no_grad():
        return digits.model(torch.from_numpy(digits.x_test)).numpy()


def _session(result, root: Path):
    manifest = Manifest(
        name="digits-cnn",
        version=1,
        target="ios17",
        format="coreml",
        precision=result.precision,
        artifact_path=result.path.name,
        inputs=result.inputs,
        outputs=result.outputs,
        files=(),
    )
    return open_unpackaged(manifest, root, backend="coreml-reference")


@pytest.mark.parametrize(
    ("precision", "max_abs", "max_drop"),
    [("fp32", 1e-4, 0.0), ("fp16", None, 0.005), ("int8-weight-only", None, 0.01), ("palettized-4bit", None, None)],
)
def test_digits_through_the_runtime_session(tmp_path, digits, digits_reference, precision, max_abs, max_drop):
    register()
    result = emit_coreml(
        digits.model,
        (torch.from_numpy(digits.x_test[:1]),),
        ["image"],
        ["logits"],
        precision,
        "iOS16",
        tmp_path / "digits.mlpackage",
    )
    assert result.inputs == (TensorSpec("image", "float32", (1, 1, 8, 8)),)
    assert result.outputs == (TensorSpec("logits", "float32", (1, 10)),)
    assert result.unchecked_ops == ()
    if precision in ("int8-weight-only", "palettized-4bit"):
        # weight_threshold 0: the small first conv (144 weights) and last linear (640) are compressed too
        assert (result.weights_compressed, result.weights_float) == (4, 0), result.notes
        assert "4 of 4 weight tensors" in result.notes[-1]
    with _session(result, tmp_path) as session:
        assert session.backend_name == "coreml-reference"
        logits = np.concatenate([session.run({"image": x[None]})["logits"] for x in digits.x_test])
    err = float(np.abs(logits - digits_reference).max())
    accuracy = float((logits.argmax(1) == digits.y_test).mean())
    print(f"digits {precision}: max abs vs torch {err:.3g}, accuracy {accuracy:.4f} (torch {digits.accuracy:.4f})")
    if max_abs is not None:
        assert err <= max_abs
    if max_drop is not None:
        assert accuracy >= digits.accuracy - max_drop - 1e-9
    else:
        assert accuracy > 0.5


def test_w8a8_calibrates_with_the_evaluator_and_keeps_accuracy(tmp_path, digits, digits_reference):
    calibration = [{"image": x[None]} for x in digits.x_train[:32]]
    result = emit_coreml(
        digits.model,
        (torch.from_numpy(digits.x_test[:1]),),
        ["image"],
        ["logits"],
        "w8a8",
        "iOS17",
        tmp_path / "w8a8.mlpackage",
        calibration=calibration,
    )
    evaluator = ReferenceEvaluator(result.path)
    assert {"quantize", "dequantize", "constexpr_affine_dequantize"} <= set(evaluator.op_types)
    logits = np.concatenate([evaluator.run({"image": x[None]})["logits"] for x in digits.x_test])
    accuracy = float((logits.argmax(1) == digits.y_test).mean())
    print(f"digits w8a8: max abs vs torch {np.abs(logits - digits_reference).max():.3g}, accuracy {accuracy:.4f}")
    assert accuracy >= digits.accuracy - 0.02


def test_w8a8_without_calibration_is_refused_before_converting(tmp_path, digits):
    with pytest.raises(UsageError, match="calibration"):
        emit_coreml(
            digits.model, (torch.zeros(1, 1, 8, 8),), ["image"], ["logits"], "w8a8", "iOS17", tmp_path / "a.mlpackage"
        )


class _Block(torch.nn.Module):
    """A small pre-norm transformer encoder block over token ids with an attention mask (MiniLM-like)."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, tokens: int = 8) -> None:
        super().__init__()
        self.d, self.heads, self.tokens = d, heads, tokens
        self.emb = torch.nn.Embedding(vocab, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, ids: Any, mask: Any) -> Any:
        d, h, t = self.d, self.heads, self.tokens  # fixed sizes: coremltools cannot trace x.shape arithmetic
        x = self.emb(ids)
        q, k, v = (y.reshape(1, t, h, d // h).transpose(1, 2) for y in self.qkv(self.ln1(x)).split(d, dim=-1))
        scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5 + (1.0 - mask[:, None, None, :]) * -1e4
        x = x + self.o((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(1, t, d))
        x = x + self.down(F.gelu(self.up(self.ln2(x))))
        return x.mean(1)


@pytest.mark.parametrize(("precision", "min_os"), [("fp32", "iOS16"), ("fp16", "iOS17")])
def test_transformer_block_matches_torch(tmp_path, precision, min_os):
    torch.manual_seed(0)
    block = _Block().eval()
    ids = torch.tensor([[3, 17, 42, 0, 9, 9, 1, 30]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    result = emit_coreml(block, (ids, mask), ["ids", "mask"], ["pooled"], precision, min_os, tmp_path / "b.mlpackage")
    assert result.inputs[0] == TensorSpec("ids", "int32", (1, 8))
    evaluator = ReferenceEvaluator(result.path)
    assert {"gather", "layer_norm", "linear", "matmul", "softmax", "gelu", "reduce_mean"} <= set(evaluator.op_types)
    got = evaluator.run({"ids": ids.numpy().astype(np.int32), "mask": mask.numpy()})["pooled"]
    with torch.no_grad():
        want = block(ids, mask).numpy()
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    if precision == "fp32":
        _close(got, want, "block fp32")
    else:
        assert cosine > 0.9999 and np.abs(got - want).max() < 5e-3


class _IntMaskBlock(_Block):
    """The block taking an int32 mask, as a tokenizer gives it: the cast to float becomes a
    constant-folded or computed var the activation passes must find a range for."""

    def forward(self, ids: Any, mask: Any) -> Any:
        return super().forward(ids, mask.to(torch.float32))


def test_w8a8_quantizes_a_transformer_block_with_an_int_mask(tmp_path):
    # MiniLM failed here with coremltools' bare KeyError 'cast_31': an add reading a cast mask
    # had no activation range. The block must now quantize and stay close to torch.
    torch.manual_seed(0)
    block = _IntMaskBlock().eval()
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
    samples = [{"ids": rng.integers(0, 50, (1, 8)).astype(np.int32), "mask": mask} for _ in range(16)]
    example = (torch.from_numpy(samples[0]["ids"]), torch.from_numpy(mask))
    result = emit_coreml(
        block, example, ["ids", "mask"], ["pooled"], "w8a8", "iOS17", tmp_path / "b.mlpackage", calibration=samples
    )
    evaluator = ReferenceEvaluator(result.path)
    assert "quantize" in evaluator.op_types
    for sample in samples[:4]:
        got = evaluator.run(sample)["pooled"]
        with torch.no_grad():
            want = block(*(torch.from_numpy(sample[k]) for k in ("ids", "mask"))).numpy()
        cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cosine > 0.99, cosine


class _OutlierBlock(_Block):
    """The block with BERT's outlier: one channel of the residual stream 60x the others."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.emb.weight[:, 0] *= 60.0

    def forward(self, ids: Any, mask: Any) -> Any:
        return super().forward(ids, mask)[:, 1:]  # the other channels: what the outlier's scale rounds away


class _NormOutlierBlock(_Block):
    """The block whose LayerNorms scale one channel 30x, as BERT's do: the linears after them
    read an outlier channel, the embedding table (whose int8 rows it would spoil) has none."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.ln1.weight[0] *= 30.0
            self.ln2.weight[0] *= 30.0


def _w8a8_cosines(
    tmp_path: Any, name: str, block_type: type[_Block] = _OutlierBlock, **search: Any
) -> tuple[list[float], Any]:
    torch.manual_seed(0)
    block = block_type().eval()
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(24):
        mask = np.ones((1, 8), np.float32)
        mask[0, int(rng.integers(3, 9)) :] = 0.0
        samples.append({"ids": rng.integers(0, 50, (1, 8)).astype(np.int32), "mask": mask})
    example = (torch.from_numpy(samples[0]["ids"]), torch.from_numpy(samples[0]["mask"]))
    result = emit_coreml(
        block, example, ["ids", "mask"], ["pooled"], "w8a8", "iOS17", tmp_path / name, calibration=samples[:16],
        **search,
    )  # fmt: skip
    evaluator = ReferenceEvaluator(result.path)
    out = []
    for sample in samples[16:]:
        got = evaluator.run(sample)["pooled"]
        with torch.no_grad():
            want = block(*(torch.from_numpy(sample[k]) for k in ("ids", "mask"))).numpy()
        out.append(float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)))
    return out, result


def test_w8a8_keeps_the_residual_stream_and_the_attention_mask_in_float(tmp_path, monkeypatch):
    # Quantizing an add's inputs and a linear's output puts the residual stream (outlier channel)
    # and the -1e4 mask through one int8 scale each; MiniLM collapsed to cosine 0.16 that way.
    from edgeship.compiler.coreml import emit

    kept, _ = _w8a8_cosines(tmp_path, "kept.mlpackage")
    monkeypatch.setattr(emit, "W8A8_FLOAT_OP_TYPES", ())
    monkeypatch.setattr(emit, "W8A8_FLOAT_OUTPUT_OP_TYPES", ())
    everything, _ = _w8a8_cosines(tmp_path, "all.mlpackage")
    print(f"outlier block w8a8 worst cosine: {min(kept):.4f} (add/linear outputs float), {min(everything):.4f} (all)")
    # The linear inputs still carry the outlier (per-tensor int8, what quantize.smooth is for): 0.96.
    assert min(kept) > 0.95
    assert min(everything) < min(kept) - 0.1


def test_w8a8_layer_search_sets_apart_the_linears_that_read_the_outlier(tmp_path):
    # All int8 the block misses 0.99 (one int8 scale for the outlier channel and the rest); the
    # search leaves the input activations of the most sensitive linears float, their weights
    # int8, and the answer holds on samples it never saw.
    plain, _ = _w8a8_cosines(tmp_path, "plain.mlpackage", _NormOutlierBlock)
    searched, result = _w8a8_cosines(
        tmp_path, "searched.mlpackage", _NormOutlierBlock, min_cosine=0.995, max_float_fraction=0.5
    )
    found = result.search
    print(f"norm outlier block w8a8: {min(plain):.4f} all int8, {min(searched):.4f} with {found.kept_float} float")
    assert min(plain) < 0.99
    assert found.reached and found.cosine >= 0.995 and found.all_quantized_cosine < 0.99
    assert 0 < len(found.kept_float) <= 2 and found.candidates == 4  # qkv, o, up, down
    assert any(note.startswith("set apart by sensitivity") for note in result.notes)
    assert min(searched) > 0.99
    from edgeship.compiler.coreml.reference import load_program, main_function

    linears = [op for op in main_function(load_program(result.path)).operations if op.op_type == "linear"]
    quantized_inputs = {op.inputs["x"].op.op_type for op in linears if op.inputs["x"].op is not None}
    assert "dequantize" in quantized_inputs  # the linears not set apart still read int8 activations
    assert result.weights_compressed == 5  # the table and 4 linears: setting apart keeps every weight int8


# ---------------------------------------------------------------------------- refusals and unsupported ops


def test_other_coremltools_version_is_refused_with_the_pin(monkeypatch):
    import coremltools

    from edgeship.compiler.coreml import reference
    from edgeship.compiler.coreml.backend import importlib as backend_importlib

    monkeypatch.setattr(coremltools, "__version__", "8.3")
    reference.coremltools_module.cache_clear()
    try:
        with pytest.raises(reference.CoreMLVersionError, match=r"coremltools==9\.0.*8\.3"):
            reference.coremltools_module()
    finally:
        monkeypatch.undo()
        reference.coremltools_module.cache_clear()
    monkeypatch.setattr(backend_importlib.metadata, "version", lambda name: "8.3")
    reason = CoreMLReferenceBackend.unavailable_reason()
    assert reason is not None and "9.0" in reason and "8.3" in reason


@pytest.mark.parametrize(
    ("precision", "min_os", "needed"),
    [("int4-block", "iOS17", "iOS18"), ("w8a8", "iOS16", "iOS17"), ("int4-block", "macOS14", "macOS15")],
)
def test_precision_the_os_cannot_run_is_refused_naming_the_os(tmp_path, precision, min_os, needed):
    module = torch.nn.Linear(4, 2)
    with pytest.raises(UsageError) as info:
        emit_coreml(module, (torch.zeros(1, 4),), ["x"], ["y"], precision, min_os, tmp_path / "m.mlpackage")
    message = str(info.value)
    assert "\n" not in message
    assert precision in message and min_os in message and needed in message
    assert not (tmp_path / "m.mlpackage").exists()


def test_unknown_precision_and_os_are_refused(tmp_path):
    module = torch.nn.Linear(4, 2)
    with pytest.raises(UsageError, match="int3"):
        emit_coreml(module, (torch.zeros(1, 4),), ["x"], ["y"], "int3", "iOS17", tmp_path / "m.mlpackage")
    with pytest.raises(UsageError, match="iOS9"):
        emit_coreml(module, (torch.zeros(1, 4),), ["x"], ["y"], "fp16", "iOS9", tmp_path / "m.mlpackage")


def test_unsupported_op_is_named_and_listed(tmp_path):
    module = Fn(lambda m, x: F.pixel_shuffle(x, 2))
    _convert(module, (_randn(1, 8, 3, 3),), tmp_path / "ps.mlpackage")
    assert "pixel_shuffle" not in supported_ops()
    assert unsupported_ops(tmp_path / "ps.mlpackage") == ["pixel_shuffle"]
    with pytest.raises(UnsupportedOpError) as info:
        ReferenceEvaluator(tmp_path / "ps.mlpackage")
    assert info.value.op_type == "pixel_shuffle"
    assert "Apple hardware" in str(info.value)


def test_reference_backend_ranks_below_core_ml_and_is_picked_on_linux():
    register()
    names = list(registered())
    assert names.index("coreml") < names.index("coreml-reference")
    assert CoreMLReferenceBackend.unavailable_reason() is None
    import platform

    if platform.system() != "Darwin":
        assert select("coreml") is CoreMLReferenceBackend


def test_the_reference_evaluator_is_no_device_runtime():
    # The compiler registers it so that its validation runs Core ML through the runtime Session; a
    # device agent in the same process must still refuse Core ML packages it cannot serve.
    from edgeship.device_agent.updater import Refused, _check_requirements
    from edgeship.errors import BackendUnavailableError

    register()
    if sys.platform != "darwin":
        assert select("coreml").name == "coreml-reference"
    with pytest.raises(BackendUnavailableError, match=r"no backend can run 'coreml' artifacts here"):
        select("coreml", device=True)
    with pytest.raises(Refused) as refused:
        _check_requirements({"format": "coreml", "runtime": {"name": "coreml", "version": "8"}})
    assert refused.value.code == "unsupported" and "cannot run coreml models" in str(refused.value)
