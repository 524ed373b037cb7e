"""The recipe: what a package's provenance records must rebuild the same recipe (every field)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeship.compiler.recipe import LayerRule, QuantizeRules, Recipe
from edgeship.errors import UsageError

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static", "int8-qdq", "w8a8")
names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12)
unit = st.floats(0, 1, allow_nan=False)
rules = st.builds(LayerRule, st.none() | st.booleans())

recipes = st.builds(
    Recipe,
    name=st.none() | names,
    version=st.integers(1, 10**6),
    label=st.none() | names,
    variants=st.dictionaries(names, st.lists(st.sampled_from(PRECISIONS), min_size=1, max_size=3).map(tuple)),
    calibration_samples=st.integers(1, 10_000),
    calibration_method=st.sampled_from(["minmax", "percentile", "entropy"]),
    held_out=st.integers(1, 10_000),
    golden_cases=st.integers(1, 64),
    latency_runs=st.integers(1, 500),
    max_accuracy_drop=st.none() | st.floats(0, 100, allow_nan=False),
    min_cosine=st.none() | unit | st.dictionaries(st.sampled_from(PRECISIONS), unit, min_size=1),
    tflite_static_io=st.sampled_from(["int8", "float"]),
    quantize=st.builds(
        QuantizeRules,
        global_rule=rules,
        min_cosine=st.none() | unit,
        max_float_fraction=st.floats(0, 1, exclude_min=True),
        fallback=st.sampled_from(["auto", "weight-only", "float"]),
        reduce_range=st.booleans(),
        types=st.dictionaries(names, rules, max_size=3),
        names=st.dictionaries(names, rules, max_size=3),
    ),
)


@given(recipes)
def test_provenance_json_rebuilds_the_same_recipe(recipe):
    # Through JSON text, as the manifest stores it.
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())), "provenance") == recipe


def _every_field_set() -> Recipe:
    return Recipe.from_dict(
        {
            "name": "digits",
            "version": 7,
            "label": "nightly",
            "variants": {"linux-x86_64": ["fp32", "int8-dynamic"]},
            "calibration": {"samples": 99, "method": "percentile"},
            "validation": {
                "held_out": 33,
                "golden_cases": 3,
                "latency_runs": 4,
                "max_accuracy_drop": 0.5,
                "min_cosine": {"int8-dynamic": 0.98},
            },
            "tflite": {"static_io": "float"},
            "passes": ["prune.channels", "distill.kd"],
            "seed": 11,
            "prune": {"channels": {"ratio": 0.25, "epochs": 2}},
            "distill": {"kd": {"temperature": 3.0, "student_ratio": 0.5}},
            "quantize": {
                "min_cosine": 0.995,
                "max_float_fraction": 0.1,
                "fallback": "float",
                "reduce_range": True,
                "global": {"skip": True},
                "types": {"Gather": {"skip": True}},
                "names": {"/classifier/Gemm": {"skip": False}},
            },
        }
    )


def test_the_hand_case_sets_every_field_away_from_its_default():
    """Guards the round trip against a field added later and left out of ``to_dict``."""
    recipe, default = _every_field_set(), Recipe()
    for f in dataclasses.fields(Recipe):
        assert getattr(recipe, f.name) != getattr(default, f.name), f.name
    for f in dataclasses.fields(QuantizeRules):
        assert getattr(recipe.quantize, f.name) != getattr(default.quantize, f.name), f.name
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_min_cosine_is_one_number_or_per_precision():
    assert Recipe.from_dict({"validation": {"min_cosine": 0.9}}).min_cosine_for("fp16") == 0.9
    per = Recipe.from_dict({"validation": {"min_cosine": {"int8-static": 0.98}}})
    assert per.min_cosine_for("int8-static") == 0.98 and per.min_cosine_for("fp16") is None
    with pytest.raises(UsageError, match=r"validation\.min_cosine\.fp16 must be a cosine in 0\.\.1"):
        Recipe.from_dict({"validation": {"min_cosine": {"fp16": 1.5}}})
    with pytest.raises(UsageError, match=r"validation\.min_cosine must be a number >= 0"):
        Recipe.from_dict({"validation": {"min_cosine": "high"}})


def test_unknown_validation_key_stays_an_error():
    with pytest.raises(UsageError, match=r"validation: unknown key 'min_cosin' \(did you mean 'min_cosine'\?\)"):
        Recipe.from_dict({"validation": {"min_cosin": 0.9}})


def test_a_layer_search_that_may_set_nothing_apart_is_refused_when_the_recipe_loads():
    # It used to load and fail later, inside the emitter, as a candidate that could not be built.
    with pytest.raises(UsageError, match=r"max_float_fraction is the share of layers .* in \(0, 1\], not 0.0"):
        Recipe.from_dict({"quantize": {"max_float_fraction": 0.0}})
