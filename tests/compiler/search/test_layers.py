"""The layer search (compiler/search/layers.py) with fake evaluators: which layers it keeps in
float, that it stops at the float budget, and that every cosine it reports was measured."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.compiler.search import layers
from edgeship.errors import UsageError


def test_search_keeps_the_costliest_layers_and_stops_at_the_float_budget():
    # Each layer costs a fixed amount of cosine when quantized; the costs add up.
    cost = {"l0": 0.001, "l1": 0.05, "l2": 0.002, "l3": 0.03, "l4": 0.0005, "l5": 0.01}

    def evaluate(keep):
        return 1.0 - sum(c for name, c in cost.items() if name not in keep)

    result = layers.search(list(cost), evaluate, 0.99, max_float_fraction=0.5)
    assert result.reached and result.kept_float == ["l1", "l3", "l5"]
    assert result.cosine == pytest.approx(0.9965) and result.all_quantized_cosine == pytest.approx(0.9065)
    assert result.scores["l1"] == pytest.approx(0.05)
    assert result.evaluations <= len(cost) + 4

    # 0.999 needs five layers in float; half of six is the budget: the three costliest, and a note.
    short = layers.search(list(cost), evaluate, 0.999, max_float_fraction=0.5)
    assert not short.reached and short.kept_float == ["l1", "l3", "l5"] and short.notes
    assert short.cosine == pytest.approx(0.9965)


def _per_feed(keep, indices, *, kept_b_hurts=None):
    # 40 feeds; quantizing "a" costs 0.002 everywhere, quantizing "b" costs 0.05 on feed 37 only.
    out = []
    for i in indices:
        cos = 0.999 - (0.0 if "a" in keep else 0.002)
        if i == 37 and "b" not in keep:
            cos -= 0.05
        if i == kept_b_hurts and "b" in keep:
            cos -= 0.01
        out.append(cos)
    return np.array(out)


def test_search_feeds_finds_the_layer_that_only_a_rare_hard_feed_needs():
    calls = []

    def measure(keep, indices):
        calls.append(list(indices))
        return _per_feed(keep, indices)

    result = layers.search_feeds(["a", "b"], measure, 40, 0.996, max_float_fraction=0.5, search_samples=4)
    assert result.kept_float == ["b"] and result.reached
    assert result.all_quantized_cosine == pytest.approx(0.947) and result.cosine == pytest.approx(0.997)
    assert 37 in calls[1] and len(calls[1]) == 4  # the search ran on the hardest four feeds
    assert calls[-1] == list(range(40))  # and the answer was checked on all of them


def test_search_feeds_reports_a_miss_on_all_feeds_even_when_the_hardest_ones_pass():
    result = layers.search_feeds(
        ["a", "b"], lambda keep, idx: _per_feed(keep, idx, kept_b_hurts=20), 40, 0.996,
        max_float_fraction=0.5, search_samples=4,
    )  # fmt: skip
    assert result.kept_float == ["b"] and not result.reached
    assert result.cosine == pytest.approx(0.987) and any("on all of them" in n for n in result.notes)


def test_search_keeps_nothing_when_everything_quantized_meets_the_target():
    result = layers.search(["a", "b"], lambda keep: 0.999, 0.995)
    assert result.kept_float == [] and result.evaluations == 1 and result.reached


def test_search_refuses_an_empty_candidate_list_and_a_bad_fraction():
    with pytest.raises(UsageError, match="no quantizable layers"):
        layers.search([], lambda keep: 1.0, 0.995)
    with pytest.raises(UsageError, match="max_float_fraction"):
        layers.search(["a"], lambda keep: 1.0, 0.995, max_float_fraction=0)
