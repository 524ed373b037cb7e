"""The budget search's QAT candidate: when int8 PTQ (every calibration, smoothing, the layer search)
misses a cosine budget, the static-int8 precision is tried again after ``quantize.qat``; when that
holds it ships, and its provenance recipe lists the pass. Core ML w8a8 of the digits CNN through the
reference evaluator: it has no layer search, so QAT is what it has beyond PTQ."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgeship.compiler import Dataset, Recipe, compile_model
from edgeship.compiler.search.budget import Budget
from edgeship.runtime.package import TrustedKeys, generate_key, verify_package


def test_qat_wins_where_int8_ptq_and_the_layer_search_miss(source: Any, digits: Any, tmp_path: Any) -> None:
    key = generate_key()
    x_train, x_test = digits[0], digits[1]
    report = compile_model(
        source,
        ["ios17"],
        tmp_path / "dist",
        key,
        # measured: worst held-out cosine 0.99793 (PTQ) against 0.99832 after QAT
        recipe=Recipe.from_dict({"name": "cnn", "variants": {"ios17": ["w8a8"]}}),
        calibration=Dataset({"image": x_train}),
        evaluation=Dataset({"image": x_test}),
        budget=Budget(min_cosine=0.9981),
    )
    search = report.searches["ios17"]
    kinds = [t["kind"] for t in search["trials"]]
    assert kinds[-1] == "qat" and kinds.count("qat") == 1, kinds
    qat = search["trials"][-1]
    assert qat["held"] and all(not t["held"] for t in search["trials"][:-1])
    assert search["winner"] == "w8a8 (QAT)"
    (variant,) = report.variants
    manifest = verify_package(variant.package, trusted_keys=TrustedKeys.of([key.public_key()])).manifest
    assert [s.name for s in Recipe.from_dict(manifest.provenance.recipe).passes] == ["quantize.qat"]
