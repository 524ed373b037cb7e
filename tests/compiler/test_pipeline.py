"""compile_model's own duties, through real compiles of small models: the provenance rebuilds the
recipe, TensorRT honours skip rules, a searched budget must hold on held-out data, and a variant
that misses its quality gate gets no package (and the command exits non-zero); one variant's failure
stays that variant's."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgeship.compiler import Dataset, Recipe, SourceModel, compile_model, emitters, from_module
from edgeship.compiler.emitters import EmitRequest, Emitted
from edgeship.compiler.emitters.onnx import OnnxEmitter
from edgeship.runtime.package import TrustedKeys, generate_key, unpack_package, verify_package

KEY = generate_key()
TRUSTED = TrustedKeys.of([KEY.public_key()])


def small_cnn():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    ).eval()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((48, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def source(images):
    return from_module(small_cnn(), images[:1], input_names=["image"], output_names=["logits"])


def test_the_package_provenance_rebuilds_the_recipe(source, images, tmp_path):
    recipe = Recipe.from_dict(
        {
            "name": "cnn",
            "version": 3,
            "label": "provenance",
            "variants": {"linux-x86_64": ["int8-dynamic"]},
            "calibration": {"samples": 40},
            "validation": {"held_out": 8, "golden_cases": 2, "latency_runs": 2, "min_cosine": {"fp16": 0.99}},
            "tflite": {"static_io": "float"},
            "quantize": {
                "min_cosine": 0.95,
                "max_float_fraction": 0.5,
                "fallback": "float",
                "reduce_range": True,
                "types": {"Gather": {"skip": True}},
            },
        }
    )
    report = compile_model(
        source, ["linux-x86_64"], tmp_path, KEY, recipe=recipe, calibration=Dataset({"image": images})
    )
    (variant,) = report.variants
    assert variant.error is None, variant.error
    manifest = verify_package(variant.package, trusted_keys=TRUSTED).manifest
    assert Recipe.from_dict(manifest.provenance.recipe, "provenance") == recipe


def _gemm_inputs_quantized(package) -> list[bool]:
    """For each Gemm/MatMul of the package's model.onnx: are its inputs read through DequantizeLinear?"""
    dest = package.with_suffix(".unpacked")
    unpack_package(package, dest, trusted_keys=TRUSTED, durable=False)
    model = onnx.load(str(dest / "model/model.onnx"))
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    return [
        all(producers.get(t) == "DequantizeLinear" for t in n.input[:2])
        for n in model.graph.node
        if n.op_type in ("Gemm", "MatMul")
    ]


def test_tensorrt_keeps_a_skipped_layer_float_in_the_qdq_graph(source, images, tmp_path):
    def build(quantize):
        recipe = Recipe.from_dict(
            {
                "variants": {"jetson-orin-nano": ["int8-qdq"]},
                "validation": {"latency_runs": 2},
                "quantize": quantize,
            }
        )
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        report = compile_model(
            source, ["jetson-orin-nano"], out, KEY, recipe=recipe, calibration=Dataset({"image": images})
        )
        (variant,) = report.variants
        assert variant.error is None, variant.error
        return variant

    plain = build({})
    assert _gemm_inputs_quantized(plain.package) == [True]
    skipped = build({"types": {"Gemm": {"skip": True}}})
    assert _gemm_inputs_quantized(skipped.package) == [False]
    assert any(n.startswith("kept in float by the recipe's skip rules (1 nodes)") for n in skipped.notes)
    assert skipped.metrics.weight_bytes > plain.metrics.weight_bytes  # the Gemm keeps fp32 weights


def test_a_budget_met_on_calibration_but_not_on_held_out_data_fails_the_variant(source, images, tmp_path):
    # Calibrated on dim inputs, validated on bright ones: static int8 ranges from calibration clip
    # the held-out activations. The layer search (on calibration data) meets the budget; held out misses it.
    dim = images * 0.05
    bright = np.random.default_rng(1).standard_normal((32, 1, 8, 8)).astype(np.float32) * 4
    recipe = Recipe.from_dict(
        {
            "variants": {"linux-x86_64": ["int8-qdq"]},
            "validation": {"latency_runs": 2},
            "quantize": {"min_cosine": 0.99},
        }
    )
    report = compile_model(
        source, ["linux-x86_64"], tmp_path, KEY, recipe=recipe,
        calibration=Dataset({"image": dim}), evaluation=Dataset({"image": bright}),
    )  # fmt: skip
    (variant,) = report.variants
    searched = next(n for n in variant.notes if "set " in n and "layers apart" in n)
    assert "target 0.99 reached" in searched
    assert variant.metrics.cosine_min < 0.99
    assert variant.package is None and "quantize.min_cosine, checked on held-out data" in variant.error
    assert not list(tmp_path.glob("*.edgepkg"))


def test_the_compile_command_exits_non_zero_and_says_what_to_change(tmp_path):
    import torch

    from tests.compiler.test_validate import two_outputs

    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    program = torch.export.export(two_outputs(), (torch.from_numpy(x[:1]),))
    torch.export.save(program, str(tmp_path / "two.pt2"))
    np.savez(tmp_path / "calib.npz", x=x)
    subprocess.run([sys.executable, "-m", "edgeship", "keys", "generate", "--out", tmp_path / "keys"], check=True)
    (tmp_path / "recipe.yaml").write_text("variants:\n  linux-x86_64: [fp32, fp16]\nvalidation:\n  latency_runs: 2\n")
    args = [
        sys.executable, "-m", "edgeship", "compile", tmp_path / "two.pt2", "-t", "linux-x86_64",
        "--recipe", tmp_path / "recipe.yaml", "--calib", tmp_path / "calib.npz", "--key", tmp_path / "keys/edgeship.key",
        "--out", tmp_path / "dist", "--input-names", "x", "--output-names", "logits,features",
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "1 of 2 variants failed" in result.stderr
    assert "quality gate" in result.stdout and "explicit lower budget" in result.stdout
    assert [p.name for p in (tmp_path / "dist").glob("*.edgepkg")] == ["two-linux-x86_64-fp32-v1.edgepkg"]
    # The message's advice works: an explicit lower budget for fp16 lets it ship.
    (tmp_path / "recipe.yaml").write_text(
        "variants:\n  linux-x86_64: [fp32, fp16]\nvalidation:\n  latency_runs: 2\n  min_cosine: {fp16: 0.9}\n"
    )
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "dist/two-linux-x86_64-fp16-v1.edgepkg").is_file()


@pytest.fixture(scope="module")
def linear() -> SourceModel:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return from_module(torch.nn.Linear(8, 4).eval(), torch.randn(1, 8), input_names=["x"], output_names=["y"])


def test_an_artifact_the_runtime_cannot_load_fails_its_variant_and_the_others_are_packaged(linear, tmp_path):
    class Truncating(OnnxEmitter):
        """The real ONNX emitter, whose model file then loses its second half (as a converter bug would)."""

        def emit(self, request: EmitRequest) -> Emitted:
            emitted = super().emit(request)
            model = emitted.files[emitted.artifact]
            model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
            return emitted

    emitters.register(Truncating, replace=True)
    try:
        report = compile_model(linear, ["linux-x86_64", "android-arm64"], tmp_path, generate_key())
    finally:
        emitters.unregister("onnx")
    by_target = {v.target: v for v in report.variants}
    broken = by_target["linux-x86_64"]
    assert broken.package is None and broken.error is not None
    assert broken.error.startswith("validation could not run the artifact:"), broken.error
    assert by_target["android-arm64"].error is None and by_target["android-arm64"].package is not None
    assert report.report_json.is_file()  # the report names both
