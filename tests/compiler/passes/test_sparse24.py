"""prune.sparse24: the 2:4 pattern on every eligible layer, kept through fine-tuning, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeship.compiler import Recipe
from edgeship.compiler.passes import run_passes
from edgeship.compiler.passes.sparse24 import is_2_4, mask_2_4
from edgeship.errors import UsageError


def steps(settings: dict) -> list:
    recipe = Recipe.from_dict({"passes": ["prune.sparse24"], "prune": {"sparse24": settings}})
    return [(s.name, s.settings) for s in recipe.passes]


def groups_of_4(weight) -> np.ndarray:
    """Zeros per group of 4 input channels, computed independently of the pass's own helpers."""
    w = weight.detach().numpy()
    w = np.moveaxis(w, 1, -1)  # input channels last: [out, *kernel, in]
    return (w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4) == 0).sum(-1)


def test_every_group_of_4_keeps_2_zeros_after_fine_tuning_and_the_function_stays_close(source, train_set, eval_set):
    import torch

    working = run_passes(source, steps({"epochs": 4, "lr": 3e-3}), training=train_set, evaluation=eval_set)
    entry = working.history[0]
    module = working.module
    assert entry["layers_2_4"] == ["head", "hidden", "left", "res", "right"]
    assert entry["dense"] == {"stem": "1 input channel(s) per group, not a multiple of 4"}
    for name in entry["layers_2_4"]:
        zeros = groups_of_4(getattr(module, name).weight)
        assert zeros.min() >= 2, name
    assert not any(n.endswith("weight_orig") for n, _ in module.named_parameters())
    assert entry["sparsity"] == pytest.approx(0.5, abs=0.01)
    # Fine-tuning moved the weights (the kept ones changed) and won back what the mask cost.
    assert entry["fine_tune"]["loss"] == "cross-entropy on labels"
    assert entry["accuracy_pruned"] < entry["accuracy_before"] - 0.2, entry  # the mask alone costs a lot here
    assert entry["accuracy_after"] >= entry["accuracy_before"] - 0.02, entry
    x = torch.from_numpy(eval_set.inputs["image"])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(module(x), source.module(x), dim=1)
    assert float(cos.mean()) > 0.9


def test_without_training_data_the_mask_alone_is_applied(source):
    working = run_passes(source, steps({}))
    assert working.history[0]["fine_tune"] is None
    assert all(is_2_4(getattr(working.module, n).weight) for n in working.history[0]["layers_2_4"])
    assert not is_2_4(working.module.stem.weight)


def test_mask_keeps_the_two_largest_magnitudes_of_each_group_along_input_channels():
    import torch

    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, -0.2, 1.0]])
    assert mask_2_4(w).tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]
    conv = torch.randn(3, 8, 2, 2)
    masked = conv * mask_2_4(conv)
    assert (groups_of_4(masked) == 2).all()
    # Grouped along dim 1, not along the flattened kernel: each (out, kh, kw) position has its own groups.
    assert is_2_4(masked) and not is_2_4(masked.transpose(1, 2).contiguous().reshape(3, 8, 2, 2) + 1)


def test_naming_a_layer_that_cannot_be_2_4_says_why(source):
    with pytest.raises(UsageError, match=r"layer 'stem' cannot be 2:4 sparse: 1 input channel\(s\) per group"):
        run_passes(source, steps({"layers": ["stem", "res"]}))
    with pytest.raises(UsageError, match=r"layer 'bn' cannot be 2:4 sparse: a BatchNorm2d has no Conv/Linear weight"):
        run_passes(source, steps({"layers": ["bn"]}))
    with pytest.raises(UsageError, match=r"no layer 'rse' \(did you mean 'res'\?\)"):
        run_passes(source, steps({"layers": ["rse"]}))


def test_only_named_layers_and_not_ignored_ones_become_sparse(source):
    working = run_passes(source, steps({"layers": ["res", "hidden"], "ignore": ["hidden"], "fine_tune": False}))
    entry = working.history[0]
    assert entry["layers_2_4"] == ["res"] and entry["dense"] == {"hidden": "ignored by the recipe"}
    assert not is_2_4(working.module.left.weight)


def test_a_model_with_no_eligible_layer_is_refused(digits):
    import torch

    from edgeship.compiler import from_module

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 + 1, 10)).eval()
    x = np.zeros((1, 65), np.float32)
    src = from_module(model, x, input_names=["x"], output_names=["y"])
    with pytest.raises(UsageError, match=r"no Conv or Linear layer of the model can be 2:4 sparse \(1: 65 input"):
        run_passes(src, steps({}))


def onnx_weights_2_4(path, layers) -> dict[str, bool]:
    """For each layer, whether its weight initializer in the ONNX graph (float, or int8 behind a
    DequantizeLinear) is still 2:4. The exporter keeps torch's layout (Gemm with transB=1)."""
    import onnx
    import torch
    from onnx import numpy_helper

    found = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        layer, _, kind = tensor.name.rpartition(".")
        if layer in layers and kind in ("weight", "weight_quantized"):
            array = numpy_helper.to_array(tensor).astype(np.float32)
            found[layer] = bool((groups_of_4(torch.from_numpy(array)) >= 2).all())
    return found


def test_tensorrt_package_of_a_2_4_model_asks_the_device_build_for_sparse_weights(
    source, train_set, eval_set, tmp_path
):
    import json

    from edgeship.compiler import compile_model
    from edgeship.runtime.backends.tensorrt import _build_engine
    from edgeship.runtime.backends.tensorrt_spec import BuildSpec
    from edgeship.runtime.package import TrustedKeys, generate_key, unpack_package
    from tests.runtime.backends.fake_tensorrt import BuilderFlag, FakeTensorRTModule

    key = generate_key()
    recipe = Recipe.from_dict(
        {
            "name": "sparse",
            "variants": {"jetson-orin-nano": ["fp16"]},
            "validation": {"latency_runs": 2},
            "passes": ["prune.sparse24"],
            "prune": {"sparse24": {"epochs": 4, "lr": 3e-3}},
        }
    )
    report = compile_model(
        source, ["jetson-orin-nano"], tmp_path / "out", key, recipe=recipe, training=train_set, evaluation=eval_set
    )
    (variant,) = report.variants
    assert variant.error is None and variant.package is not None, variant.error
    assert any(
        "2:4 sparse weights (prune.sparse24) in 5 layer(s): head, hidden, left, res, right" in n for n in variant.notes
    )
    unpacked = tmp_path / "unpacked"
    unpack_package(variant.package, unpacked, trusted_keys=TrustedKeys.of([key.public_key()]), durable=False)
    spec = BuildSpec.from_json((unpacked / "model" / "build_spec.json").read_bytes())
    assert spec.sparsity_2_4 and spec.precision == "fp16"
    layers = json.loads(report.report_json.read_text())["passes"][0]["layers_2_4"]
    assert onnx_weights_2_4(unpacked / "model" / "model.onnx", layers) == dict.fromkeys(layers, True)
    # The device's build turns it into the builder flag (up to the TensorRT boundary: a recording fake).
    trt = FakeTensorRTModule()
    _build_engine(trt, type("L", (), {"errors": []})(), unpacked / "model" / "model.onnx", spec)  # type: ignore[arg-type]
    assert trt.configs[0].flags == {BuilderFlag.FP16, BuilderFlag.SPARSE_WEIGHTS}


def test_int8_qdq_weights_keep_the_2_4_zeros_and_a_pass_history_the_weights_contradict_sets_no_flag(
    source, train_set, eval_set, tmp_path
):
    from edgeship.compiler import emitters
    from edgeship.compiler.emitters import EmitRequest
    from edgeship.targets import get as get_profile

    profile = get_profile("jetson-orin-nano")
    working = run_passes(source, steps({"epochs": 1}), training=train_set)
    calib = train_set.take(64)
    emitted = emitters.get("tensorrt-onnx").emit(
        EmitRequest(working.as_source(), profile, "int8-qdq", tmp_path / "int8", calib, passes=tuple(working.history))
    )
    spec = json.loads(emitted.files["model/build_spec.json"].read_text())
    assert spec["sparsity_2_4"] is True and spec["precision"] == "int8"
    layers = working.history[0]["layers_2_4"]
    assert onnx_weights_2_4(emitted.files["model/model.onnx"], layers) == dict.fromkeys(layers, True)
    # A history naming 2:4 layers whose weights are dense (a later pass retrained them): no flag, a note.
    dense = emitters.get("tensorrt-onnx").emit(
        EmitRequest(source, profile, "fp16", tmp_path / "fp16", passes=({"layers_2_4": ["res"]},))
    )
    assert json.loads(dense.files["model/build_spec.json"].read_text())["sparsity_2_4"] is False
    assert any("layers res lost the 2:4 pattern" in n for n in dense.notes)


def test_core_ml_package_of_a_pruned_model_stores_its_zeros_sparse(source, train_set, eval_set, tmp_path):
    pytest.importorskip("coremltools")
    from edgeship.compiler import compile_model
    from edgeship.compiler.coreml.reference import load_program, main_function
    from edgeship.runtime.package import TrustedKeys, generate_key, unpack_package

    key = generate_key()
    recipe = Recipe.from_dict(
        {
            "variants": {"ios17": ["fp16"]},
            "validation": {"latency_runs": 1},
            "passes": ["prune.sparse24"],
            "prune": {"sparse24": {"epochs": 4, "lr": 3e-3}},
        }
    )
    report = compile_model(
        source, ["ios17"], tmp_path / "out", key, recipe=recipe, training=train_set, evaluation=eval_set
    )
    (variant,) = report.variants
    assert variant.error is None and variant.package is not None, variant.error
    assert any("5 of 6 weight tensors stored sparse" in n for n in variant.notes), variant.notes
    entry = json.loads(report.report_json.read_text())["passes"][0]
    assert abs(variant.metrics.accuracy - entry["accuracy_after"]) < 0.01  # the reference evaluator ran it
    unpack_package(variant.package, tmp_path / "pkg", trusted_keys=TrustedKeys.of([key.public_key()]), durable=False)
    program = load_program(tmp_path / "pkg" / "model" / "model.mlpackage")
    assert [op.op_type for op in main_function(program).operations].count("constexpr_sparse_to_dense") == 5
