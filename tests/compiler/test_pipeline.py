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
from edgeship.compiler.pipeline import mixed_target
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


def _compile_cli(tmp_path, images, *budget):
    """``edgeship compile`` of the small CNN for android-arm64 (TFLite) with a budget; the recipe
    offers int8-dynamic and fp16, so the candidates are int8-dynamic, its mixed precision, fp16."""
    import torch

    program = torch.export.export(small_cnn(), (torch.from_numpy(images[:1]),))
    torch.export.save(program, str(tmp_path / "cnn.pt2"))
    np.savez(tmp_path / "calib.npz", image=images)
    subprocess.run([sys.executable, "-m", "edgeship", "keys", "generate", "--out", tmp_path / "keys"], check=True)
    (tmp_path / "recipe.yaml").write_text(
        "variants:\n  android-arm64: [int8-dynamic, fp16]\nvalidation:\n  latency_runs: 2\n"
    )
    args = [
        sys.executable, "-m", "edgeship", "compile", tmp_path / "cnn.pt2", "-t", "android-arm64",
        "--recipe", tmp_path / "recipe.yaml", "--calib", tmp_path / "calib.npz", "--key", tmp_path / "keys/edgeship.key",
        "--out", tmp_path / "dist", "--input-names", "image", "--output-names", "logits", *budget,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_a_cosine_budget_packages_the_cheapest_candidate_that_holds_it_and_reports_every_candidate(images, tmp_path):
    import json

    # int8 on this CNN reaches about 0.9999 (measured): 0.99999 is out of its reach, fp16's is 1 - 4e-8.
    result = _compile_cli(tmp_path, images, "--min-cosine", "0.99999")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "dist/cnn-v1-report.json").read_text())
    search = report["search"]["android-arm64"]
    names = [t["name"] for t in search["trials"]]
    # The layer search aims a little above the held-out budget (pipeline.mixed_target).
    assert mixed_target(0.99999) > 0.99999
    assert names == ["int8-dynamic", f"int8-dynamic mixed (layer search to cosine {mixed_target(0.99999)})", "fp16"]
    assert [t["held"] for t in search["trials"]] == [False, False, True]
    for trial in search["trials"]:
        assert trial["size_bytes"] > 0 and trial["latency_ms"] > 0 and trial["metrics"]["cosine_min"] == trial["cosine"]
        assert (trial["cosine"] >= 0.99999) == trial["held"]
    assert search["winner"] == "fp16" and "fp16 wins" in search["reason"] and "2 cheaper" in search["reason"]
    assert report["winner"] == {"target": "android-arm64", "precision": "fp16"}
    # Only the winner is packaged, and its provenance rebuilds it: fp16, no layer search.
    (package,) = (tmp_path / "dist").glob("*.edgepkg")
    manifest = verify_package(package, trusted_keys=_trusted(tmp_path)).manifest
    assert manifest.precision == "fp16"
    assert Recipe.from_dict(manifest.provenance.recipe).variants["android-arm64"] == ("fp16",)
    page = (tmp_path / "dist/cnn-v1-report.html").read_text()
    assert "Budget search for android-arm64" in page and page.count("class='point winner'") == 2
    assert "fp16 wins" in result.stdout and "int8-dynamic mixed" in result.stdout


def test_an_impossible_budget_exits_non_zero_names_the_closest_candidate_and_writes_no_package(images, tmp_path):
    result = _compile_cli(tmp_path, images, "--min-cosine", "1.0", "--max-size-mb", "0.0001")
    assert result.returncode != 0
    message = result.stderr
    assert "no candidate holds the budget (3 tried)" in message and "the closest is fp16" in message
    assert "No package written" in message and "--max-size-mb" in message
    assert not list((tmp_path / "dist").glob("*.edgepkg"))
    assert "no candidate holds" in (tmp_path / "dist/cnn-v1-report.html").read_text()


def test_calibration_data_without_a_named_precision_searches_under_the_default_budget(source, images, tmp_path):
    recipe = Recipe.from_dict({"validation": {"latency_runs": 2}})
    report = compile_model(
        source, ["android-arm64"], tmp_path, KEY, recipe=recipe, calibration=Dataset({"image": images})
    )
    search = report.searches["android-arm64"]
    (variant,) = report.variants
    first = search["trials"][0]
    # The smallest candidate first (static int8, the calibration data allows it), under the
    # default gate for quantized precisions without labels.
    assert first["name"] == "int8-static" and first["budget"] == "cosine >= 0.99"
    # w8a16 is offered by the profile but tried only when the recipe names it (an NPU format).
    listed = [t["name"] for t in search["trials"]] + search["not_tried"]
    assert "fp16" in listed and not any(name.startswith("w8a16") for name in listed)
    assert variant.error is None and variant.precision == search["winner_precision"]
    assert variant.package is not None and variant.package.name.endswith(f"-{variant.precision}-v1.edgepkg")


def _trusted(tmp_path):
    from edgeship.runtime.package import load_public_key

    return TrustedKeys.of([load_public_key(tmp_path / "keys/edgeship.pub")])


def test_an_accuracy_budget_without_labels_is_refused_before_any_work(source, images, tmp_path):
    from edgeship.compiler.search.budget import Budget
    from edgeship.errors import UsageError

    with pytest.raises(UsageError, match="--max-accuracy-drop needs labels"):
        compile_model(
            source, ["android-arm64"], tmp_path, KEY,
            calibration=Dataset({"image": images}), budget=Budget(max_accuracy_drop=0.5),
        )  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_a_budget_search_exports_the_model_once_for_all_its_candidates(source, images, tmp_path, monkeypatch):
    from edgeship.compiler.emitters import onnx as onnx_emitter
    from edgeship.compiler.search.budget import Budget

    exports = []
    real = onnx_emitter.export_fp32

    def counted(model, path):
        exports.append(path)
        real(model, path)

    monkeypatch.setattr(onnx_emitter, "export_fp32", counted)
    recipe = Recipe.from_dict({"validation": {"latency_runs": 2}})
    # No int8 candidate reaches cosine 0.99999 on this CNN: the search goes through to fp16.
    report = compile_model(
        source, ["linux-x86_64"], tmp_path, KEY, recipe=recipe,
        calibration=Dataset({"image": images}), budget=Budget(min_cosine=0.99999),
    )  # fmt: skip
    trials = report.searches["linux-x86_64"]["trials"]
    # One export of the model, one more of the model the QAT candidate trained (a different model).
    assert len(trials) >= 4 and [t["kind"] for t in trials].count("qat") == 1
    assert len(exports) == 2 and sum(".fp32-cache-quantize.qat" in str(p) for p in exports) == 1
    # Each candidate still quantized its own copy: int8 artifacts are smaller than the float ones.
    size = {t["name"]: t["size_bytes"] for t in trials}
    assert size["int8-dynamic"] < size["fp16"] and all(t["seconds"] > 0 for t in trials)


def _tiny_bert_search(tmp_path, min_cosine):
    """int8-qdq of a BERT whose LayerNorms have outlier channels, searched to ``min_cosine``."""
    pytest.importorskip("transformers")
    from edgeship.compiler.search.budget import Budget
    from tests.compiler.passes.test_smooth import source_of, tiny_bert, tokens

    return compile_model(
        source_of(tiny_bert(outliers=25.0)),
        ["linux-x86_64"],
        tmp_path / "dist",
        KEY,
        recipe=Recipe.from_dict({"name": "bert", "variants": {"linux-x86_64": ["int8-qdq"]}}),
        calibration=Dataset(tokens(32, 1)),
        evaluation=Dataset(tokens(16, 2)),
        budget=Budget(min_cosine=min_cosine),
    )


def test_a_budget_search_on_a_transformer_tries_smoothed_ptq_and_its_winner_records_the_pass(tmp_path):
    """A BERT whose LayerNorms have outlier channels (as trained BERTs do): plain static int8 misses a
    tight cosine budget, the smoothed candidate (``quantize.smooth``) comes after the other calibration
    and before mixed precision, and when it wins its provenance recipe lists the pass."""
    report = _tiny_bert_search(tmp_path, 0.9998)
    search = report.searches["linux-x86_64"]
    trials = {t["name"]: t for t in search["trials"]}
    names = [t["name"] for t in search["trials"]]
    # measured: plain and percentile 0.99961, smoothed 0.99994
    assert names == ["int8-qdq", "int8-qdq (percentile calibration)", "int8-qdq (smoothed PTQ)"]
    plain, smoothed = trials["int8-qdq"], trials["int8-qdq (smoothed PTQ)"]
    assert smoothed["error"] is None and 1 - smoothed["cosine"] < (1 - plain["cosine"]) / 3
    assert search["winner"] == "int8-qdq (smoothed PTQ)"
    (variant,) = report.variants
    manifest = verify_package(variant.package, trusted_keys=TRUSTED).manifest
    assert [s.name for s in Recipe.from_dict(manifest.provenance.recipe).passes] == ["quantize.smooth"]


def test_a_mixed_candidate_searches_from_the_smoothed_model_when_smoothing_came_closer(tmp_path):
    """The layer search starts from its precision's closest PTQ: here the smoothed one (0.99994
    against plain 0.99961, measured), so the mixed trial is built on the smoothed model and its
    name says so; nothing reaches 0.99998, so no package and the closest candidate is named."""
    report = _tiny_bert_search(tmp_path, 0.99998)
    trials = report.searches["linux-x86_64"]["trials"]
    assert [t["kind"] for t in trials] == ["ptq", "calibration", "smoothed", "mixed", "qat"]
    mixed = trials[3]
    assert mixed["smoothed"] and mixed["name"].startswith("int8-qdq mixed (smoothed, layer search to cosine")
    assert mixed["min_cosine"] == mixed_target(0.99998)
    assert mixed["cosine"] > trials[0]["cosine"]  # built on the smoothed model, not the plain one
    (variant,) = report.variants
    assert variant.package is None and variant.error is not None and "no candidate holds" in variant.error
