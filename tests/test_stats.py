"""Runtime statistics: block folding gives the same figures as computing them directly; drift scores behave."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.runtime.stats import (
    PENDING_ROWS,
    RING,
    LatencyHistogram,
    TensorStats,
    compute_baseline,
    drift,
    ks_from_quantiles,
    psi_from_quantiles,
)

pytestmark = pytest.mark.py310


def test_buffered_statistics_equal_direct_computation_for_any_batch_sizes():
    rng = np.random.default_rng(0)
    stats = TensorStats("image", channel_axis=1, channels=3, classifier=False)
    seen = []
    for batch in [1, 1, 5, PENDING_ROWS - 3, 2, PENDING_ROWS + 10, 1, 300, 7]:
        x = rng.normal(2.0, 3.0, size=(batch, 3, 4, 4)).astype(np.float32)
        stats.update(x)
        seen.append(x)
    data = np.concatenate(seen).astype(np.float64)
    summary = stats.summary()
    assert summary["samples"] == len(data)
    np.testing.assert_allclose(summary["mean"], data.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(summary["std"], data.std(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(summary["min"], data.min(axis=(0, 2, 3)))
    np.testing.assert_allclose(summary["max"], data.max(axis=(0, 2, 3)))
    recent = stats.recent()
    np.testing.assert_allclose(recent[: len(data)], data.reshape(len(data), -1).mean(axis=1), rtol=1e-5)


def test_ring_keeps_the_most_recent_samples_only():
    stats = TensorStats("x", channel_axis=None, channels=1, classifier=False)
    for i in range(RING + 100):
        stats.update(np.full((1, 4), float(i), np.float32))
    recent = stats.recent()
    assert len(recent) == RING
    assert sorted(recent)[0] == 100 and sorted(recent)[-1] == RING + 99


def test_classifier_top1_and_confidence_per_sample():
    stats = TensorStats("logits", channel_axis=1, channels=3, classifier=True)
    stats.update(np.array([[0.0, 5.0, 0.0], [9.0, 0.0, 0.0]], np.float32))
    stats.update(np.array([[0.0, 0.0, 0.0]], np.float32))
    summary = stats.summary()
    assert summary["class_histogram"] == [2, 1]  # argmax of the all-equal row is class 0
    expected_conf = np.mean([1 / (1 + 2 * np.exp(-5)), 1 / (1 + 2 * np.exp(-9)), 1 / 3])
    assert summary["top1_confidence_mean"] == pytest.approx(expected_conf)


def test_nan_samples_are_counted_and_left_out():
    stats = TensorStats("x", channel_axis=None, channels=1, classifier=False)
    good = np.ones((3, 4), np.float32)
    bad = good.copy()
    bad[1, 2] = np.nan
    bad[2, 0] = np.inf
    stats.update(good)
    stats.update(bad)
    summary = stats.summary()
    assert summary["nonfinite"] == 2 and summary["samples"] == 4 and summary["mean"] == [1.0]


def test_psi_and_ks_are_near_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(1)
    base = np.percentile(rng.normal(size=20000), np.linspace(0, 100, 101))
    same, shifted = rng.normal(size=1000), rng.normal(1.0, 1.0, size=1000)
    assert psi_from_quantiles(base, same) < 0.05 and ks_from_quantiles(base, same) < 0.06
    assert psi_from_quantiles(base, shifted) > 0.5
    assert ks_from_quantiles(base, shifted) == pytest.approx(0.38, abs=0.06)  # Phi(0.5) - Phi(-0.5)


def test_drift_against_a_computed_baseline():
    rng = np.random.default_rng(2)
    calib = rng.normal(size=(2000, 1, 8, 8)).astype(np.float32)
    logits = rng.normal(size=(2000, 10)).astype(np.float32)
    baseline = compute_baseline({"x": [calib]}, {"y": [logits]})
    assert len(baseline["inputs"]["x"]["summary_quantiles"]) == 101
    assert baseline["outputs"]["y"]["class_frequencies"] is not None
    stats = TensorStats("x", channel_axis=1, channels=1, classifier=False)
    for row in rng.normal(size=(500, 1, 8, 8)).astype(np.float32):
        stats.update(row[None])
    assert drift(stats, baseline["inputs"]["x"])["psi"] < 0.1


def test_latency_percentiles_from_buckets():
    hist = LatencyHistogram()
    for ms in [1.0] * 90 + [10.0] * 9 + [100.0]:
        hist.add(ms / 1e3)
    summary = hist.summary()
    assert summary["calls"] == 100
    assert 1.0 <= summary["p50_ms"] <= 1.34 and 10.0 <= summary["p99_ms"] <= 13.4
    assert summary["max_ms"] == pytest.approx(100.0)
