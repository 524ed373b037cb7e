"""The quality gate as a pure function: which budget applies, and what a miss says."""

from __future__ import annotations

import math

import pytest

from edgeship.compiler import quality
from edgeship.compiler.recipe import Recipe
from edgeship.compiler.validate import Metrics


def metrics(cosine: float | None, drop: float | None = None) -> Metrics:
    m = Metrics(samples=10, backend="onnxruntime", cosine_min=cosine, accuracy_drop_points=drop)
    m.worst_output = "features" if cosine is not None else None
    return m


@pytest.mark.parametrize(
    ("precision", "cosine", "drop", "passed"),
    [
        ("fp32", 0.9995, None, True),
        ("fp32", 0.9985, None, False),
        ("fp16", 0.57, 0.0, False),  # a broken fp16 fails even when accuracy holds
        ("int8-dynamic", 0.995, None, True),
        ("int8-dynamic", 0.985, None, False),
        ("int8-static", 0.90, 0.8, True),  # with labels the default is the accuracy drop
        ("int8-static", 0.999, 1.5, False),
        ("w8a8", 0.009, None, False),
        ("fp32", math.nan, None, False),
    ],
)
def test_default_budget_per_precision(precision, cosine, drop, passed):
    verdict = quality.check(Recipe(), precision, metrics(cosine, drop))
    assert verdict.passed is passed, verdict
    if not passed:
        assert verdict.reason.startswith("quality gate:") and "no package written" in verdict.reason
        assert "explicit lower budget" in verdict.reason and "another precision" in verdict.reason


def test_an_explicit_lower_budget_lets_a_variant_ship():
    low = Recipe.from_dict({"validation": {"min_cosine": {"int8-dynamic": 0.98}}})
    assert quality.check(low, "int8-dynamic", metrics(0.985)).passed
    assert not quality.check(low, "fp32", metrics(0.985)).passed  # other precisions keep the default
    off = Recipe.from_dict({"validation": {"min_cosine": 0}})
    assert quality.check(off, "fp16", metrics(0.1)).passed


def test_the_search_budget_must_hold_on_held_out_data():
    recipe = Recipe.from_dict({"quantize": {"min_cosine": 0.995}})
    verdict = quality.check(recipe, "int8-dynamic", metrics(0.9949), searched=True)
    assert not verdict.passed
    assert "held-out cosine 0.9949 (output 'features') is below 0.995 (quantize.min_cosine" in verdict.reason
    assert "max_float_fraction" in verdict.reason  # what to change: let the search set more apart
    assert quality.check(recipe, "int8-dynamic", metrics(0.9951), searched=True).passed


def test_an_accuracy_budget_replaces_the_quantized_default_only_when_labels_measure_it():
    recipe = Recipe.from_dict({"validation": {"max_accuracy_drop": 2.0}})
    assert quality.check(recipe, "int8-static", metrics(0.90, 1.5)).passed
    assert not quality.check(recipe, "int8-static", metrics(0.90, 2.5)).passed
    # No labels: the accuracy budget cannot be measured, so the cosine default holds.
    assert not quality.check(recipe, "int8-static", metrics(0.90, None)).passed


def test_a_figure_not_measured_here_is_not_gated_but_said():
    verdict = quality.check(Recipe(), "fp16", Metrics(samples=0, backend=None))
    assert verdict.passed and verdict.unchecked == ["cosine (not measured here)"]
