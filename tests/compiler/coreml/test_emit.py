"""The Core ML emitter's sparse weight storage: a pruned model's zeros stored as a bit mask plus
non-zero values, checked for size and, through the numpy reference evaluator, for numerics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

from edgeship.compiler.coreml import ReferenceEvaluator  # noqa: E402
from edgeship.compiler.coreml.emit import emit_coreml  # noqa: E402
from edgeship.compiler.coreml.reference import load_program, main_function  # noqa: E402
from edgeship.compiler.passes.sparse24 import mask_2_4  # noqa: E402


def pruned_cnn() -> Any:
    """A 32-wide CNN for 8x8 images with 2:4 zeros in every layer that can take them (not the 1-channel stem)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).eval()
    with torch.no_grad():
        for layer in (model[2], model[5], model[7]):
            layer.weight.mul_(mask_2_4(layer.weight))
    return model


def emit(model: Any, tmp_path: Path, precision: str, min_os: str, sparse: bool) -> Any:
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / f"{precision}-{min_os}-{sparse}.mlpackage"
    return emit_coreml(model, (x,), ["image"], ["logits"], precision, min_os, path, sparse_weights=sparse), x


def op_types(path: Path) -> list[str]:
    return [op.op_type for op in main_function(load_program(path)).operations]


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_pruned_weights_are_stored_sparse_smaller_with_the_same_numerics(tmp_path: Path, precision: str):
    model = pruned_cnn()
    dense, x = emit(model, tmp_path, precision, "iOS17", sparse=False)
    sparse, _ = emit(model, tmp_path, precision, "iOS17", sparse=True)
    assert op_types(sparse.path).count("constexpr_sparse_to_dense") == 3
    assert "constexpr_sparse_to_dense" not in op_types(dense.path)
    # Half the values of 3 of 4 weight tensors go, a 1-bit mask comes: about 0.55x at either precision.
    assert sparse.weight_bytes < 0.62 * dense.weight_bytes, (sparse.weight_bytes, dense.weight_bytes)
    assert any("3 of 4 weight tensors stored sparse" in n and "1 stayed dense" in n for n in sparse.notes)
    feed = {"image": x.numpy()}
    got = ReferenceEvaluator(sparse.path).run(feed)["logits"]
    want = ReferenceEvaluator(dense.path).run(feed)["logits"]
    np.testing.assert_array_equal(got, want)  # lossless: the very same weights
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4 if precision == "fp32" else 2e-2)


def test_zeros_stay_dense_where_sparse_storage_is_not_built_and_the_note_says_why(tmp_path: Path):
    model = pruned_cnn()
    quantized, _ = emit(model, tmp_path, "int8-weight-only", "iOS17", sparse=True)
    assert "constexpr_sparse_to_dense" not in op_types(quantized.path)
    assert any("stored dense at int8-weight-only" in n for n in quantized.notes)
    old_os, _ = emit(model, tmp_path, "fp16", "iOS15", sparse=True)
    assert "constexpr_sparse_to_dense" not in op_types(old_os.path)
    assert any("sparse weights need iOS16 / macOS13; min_os is iOS15" in n for n in old_os.notes)


def test_a_dense_model_is_left_dense(tmp_path: Path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    result, _ = emit(model.eval(), tmp_path, "fp16", "iOS17", sparse=True)
    assert "constexpr_sparse_to_dense" not in op_types(result.path)
    assert any("0 of 2 weight tensors stored sparse" in n for n in result.notes)


def test_layer_inputs_are_found_by_the_names_coremltools_gives_weights(tmp_path: Path):
    """``coreml_layer_inputs`` finds a root ``Sequential``'s layers (``0.weight`` becomes
    ``var_0_weight``) and leaves out two layers whose names read the same once ``.`` becomes ``_``
    (``a.b_c`` and ``a_b.c``) rather than give one the other's range."""
    from edgeship.compiler.coreml.emit import coreml_layer_inputs

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Module()
            self.a.b_c = torch.nn.Linear(8, 8)
            self.a_b = torch.nn.Module()
            self.a_b.c = torch.nn.Linear(8, 8)

        def forward(self, x: Any) -> Any:
            return self.a.b_c(x) + self.a_b.c(torch.relu(x))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), Pair()).eval()
    out = tmp_path / "m.mlpackage"
    emit_coreml(model, (torch.ones(1, 8),), ["x"], ["y"], "fp16", "iOS17", out)
    function = main_function(load_program(out))
    found = coreml_layer_inputs(function, ["0", "2", "3.a.b_c", "3.a_b.c"])
    assert set(found) == {"0", "2"}, found
    linears = [op for op in function.operations if op.op_type == "linear"]
    assert found["0"] == [linears[0].inputs["x"].name] and found["2"] == [linears[1].inputs["x"].name]


def test_w8a8_leaves_float_the_ops_whose_activation_is_zero_on_every_calibration_sample(tmp_path: Path):
    """An activation that is 0 on every calibration sample (here a channel stack a ReLU zeroes) has no
    range for an int8 scale: coremltools would derive a zero scale and refuse the model ("scale
    cannot be 0"). The ops reading or writing it keep float activations, the note names them, the
    rest of the model is quantized, and the numerics still match PyTorch."""

    class DeadBranch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.dead = torch.nn.Conv2d(8, 8, 1)
            self.head = torch.nn.Conv2d(8, 4, 3, padding=1)
            with torch.no_grad():
                self.dead.weight.fill_(-1.0)
                self.dead.bias.fill_(-1.0)

        def forward(self, x: Any) -> Any:
            s = torch.relu(self.stem(x))
            return self.head(s) + self.head(torch.relu(self.dead(s)))  # relu(-sum - 1) of a relu is 0

    torch.manual_seed(0)
    model = DeadBranch().eval()
    rng = np.random.default_rng(0)
    calibration = [{"image": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(8)]
    out = tmp_path / "w8a8.mlpackage"
    result = emit_coreml(
        model, (torch.from_numpy(calibration[0]["image"]),), ["image"], ["y"], "w8a8", "iOS17", out,
        calibration=calibration,
    )  # fmt: skip
    note = next(n for n in result.notes if "was 0 on every calibration sample" in n)
    assert note.startswith("2 op(s)"), note  # the dead conv (its ReLU's output) and the head call reading it
    assert op_types(out).count("quantize") >= 2  # the stem and the live head keep int8 activations
    evaluator = ReferenceEvaluator(out)
    for feed in calibration[:3]:
        with torch.no_grad():
            expected = model(torch.from_numpy(feed["image"])).numpy()
        got = evaluator.run(feed)["y"]
        cosine = float(np.dot(got.ravel(), expected.ravel()) / np.linalg.norm(got) / np.linalg.norm(expected))
        assert cosine > 0.99, cosine


def test_the_activations_the_zero_range_check_follows_are_those_coremltools_quantizes_after():
    from coremltools.converters.mil.mil.passes.defs.optimize_activation_quantization import (
        insert_suffix_quantize_dequantize_pair,
    )

    from edgeship.compiler.coreml.emit import _SUFFIX_ACTIVATIONS

    assert set(insert_suffix_quantize_dequantize_pair._allowed_activations) == _SUFFIX_ACTIVATIONS
