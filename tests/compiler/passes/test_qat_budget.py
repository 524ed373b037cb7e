"""The budget search's QAT candidate: when int8 PTQ (every calibration, smoothing, the layer search)
misses a cosine budget, the static-int8 precision is tried again after ``quantize.qat``; when that
holds it ships, and its provenance recipe lists the pass. Core ML w8a8 of the digits CNN through the
reference evaluator."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgeship.compiler import Dataset, Recipe, compile_model
from edgeship.compiler.search.budget import Budget
from edgeship.runtime.package import TrustedKeys, generate_key, verify_package


def _compile(source: Any, digits: Any, out: Any, min_cosine: float) -> Any:
    key = generate_key()
    report = compile_model(
        source,
        ["ios17"],
        out,
        key,
        recipe=Recipe.from_dict({"name": "cnn", "variants": {"ios17": ["w8a8"]}}),
        calibration=Dataset({"image": digits[0]}),
        evaluation=Dataset({"image": digits[1]}),
        budget=Budget(min_cosine=min_cosine),
    )
    return report, key


def test_qat_is_the_last_candidate_and_ships_when_it_holds(source: Any, digits: Any, tmp_path: Any) -> None:
    # Out of reach: every candidate is tried, in order, and none ships.
    report, _ = _compile(source, digits, tmp_path / "none", 0.99999)
    trials = report.searches["ios17"]["trials"]
    assert [t["kind"] for t in trials] == ["ptq", "mixed", "qat"]
    assert not any(t["held"] for t in trials) and report.searches["ios17"]["winner"] is None
    cosine = {t["kind"]: t["cosine"] for t in trials}
    # Measured, worst held-out sample: PTQ 0.99576, mixed 0.99758, QAT 0.99762 (AMD EPYC); PTQ
    # 0.99793, QAT 0.99832 (Intel Xeon, before w8a8 had a layer search). Float kernels differ by
    # CPU, so the budget below comes from this machine's own QAT figure (training is deterministic).
    # On an AVX2-only AMD EPYC QAT did not beat PTQ (0.99816 against 0.99847): the skip below.
    best_before = max(cosine["ptq"], cosine["mixed"])
    if cosine["qat"] <= best_before:
        pytest.skip(
            f"PTQ ({cosine['ptq']:.6f}) or the layer search ({cosine['mixed']:.6f}) came as near as QAT "
            f"({cosine['qat']:.6f}) on this CPU"
        )
    budget = (best_before + cosine["qat"]) / 2  # PTQ and the layer search miss it, QAT holds it
    report, key = _compile(source, digits, tmp_path / "dist", budget)
    search = report.searches["ios17"]
    assert [t["held"] for t in search["trials"]] == [False, False, True]
    assert search["winner"] == "w8a8 (QAT)"
    (variant,) = report.variants
    manifest = verify_package(variant.package, trusted_keys=TrustedKeys.of([key.public_key()])).manifest
    assert [s.name for s in Recipe.from_dict(manifest.provenance.recipe).passes] == ["quantize.qat"]


def test_variants_are_held_to_the_model_before_quantize_passes_and_after_the_others(
    source: Any, digits: Any, tmp_path: Any
) -> None:
    """QAT moves the weights: an fp32 variant of the QAT model is then measured against the model
    before the pass (its drift counts), while after a prune pass it is held to the pruned model."""
    import numpy as np
    import torch

    from edgeship.compiler.passes import run_passes

    x_train, x_test = digits[0], digits[1]
    # labels: true keeps the last epoch (without it the pass may keep the weights it started with)
    calib, held_out = Dataset({"image": x_train[:256]}, labels=digits[2][:256]), Dataset({"image": x_test})

    def fp32_cosine(passes: list[str], settings: dict[str, Any]) -> float:
        report = compile_model(
            source,
            ["linux-x86_64"],
            tmp_path / "-".join(passes),
            generate_key(),
            recipe=Recipe.from_dict(
                {"name": "cnn", "variants": {"linux-x86_64": ["fp32"]}, "passes": passes, **settings}
            ),
            calibration=calib,
            evaluation=held_out,
        )
        (variant,) = report.variants
        return float(variant.metrics.cosine_min)

    qat = fp32_cosine(["quantize.qat"], {"quantize": {"qat": {"lr": 1e-3, "labels": True}}})
    # The same pass run by hand: its float model against the source, worst held-out image.
    steps = [
        (
            "quantize.qat",
            Recipe.from_dict({"passes": ["quantize.qat"], "quantize": {"qat": {"lr": 1e-3, "labels": True}}})
            .passes[0]
            .settings,
        )
    ]
    tuned = run_passes(source, steps, calibration=calib).module
    with torch.no_grad():
        got, want = tuned(torch.from_numpy(x_test)).numpy(), source.module(torch.from_numpy(x_test)).numpy()
    by_hand = float(min(np.dot(g, w) / np.linalg.norm(g) / np.linalg.norm(w) for g, w in zip(got, want)))
    assert by_hand < 1 - 1e-6  # lr 1e-3: the weights really moved
    assert qat == pytest.approx(by_hand, abs=1e-5)
    # After a prune pass the fp32 variant is its own model's conversion: cosine ~1.
    pruned = fp32_cosine(["prune.magnitude"], {"prune": {"magnitude": {"ratio": 0.5, "fine_tune": False}}})
    assert pruned > 1 - 1e-5
