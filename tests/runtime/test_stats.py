"""TensorStats windows: a reset restarts the running statistics and keeps the drift ring."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.runtime.stats import PENDING_ROWS, TensorStats

pytestmark = pytest.mark.py310


def test_reset_window_restarts_running_statistics_but_keeps_the_ring():
    rng = np.random.default_rng(1)
    stats = TensorStats("logits", channel_axis=None, channels=1, classifier=True)
    old = rng.normal(5.0, 1.0, size=(PENDING_ROWS + 7, 10)).astype(np.float32)
    old[3, 0] = np.nan
    stats.update(old[: PENDING_ROWS // 2])
    stats.update(old[PENDING_ROWS // 2 :])  # some of it still buffered, not folded: a reset must keep it
    stats.reset_window()
    empty = stats.summary()
    assert (empty["samples"], empty["nonfinite"], empty["min"], empty["max"]) == (0, 0, [], [])
    assert len(stats.recent()) == len(old) - 1  # the sample holding NaN never entered the ring
    assert sum(empty["class_histogram"]) == len(old) - 1

    new = rng.normal(-2.0, 0.5, size=(9, 10)).astype(np.float32)
    stats.update(new)
    summary = stats.summary()
    assert summary["samples"] == 9 and summary["nonfinite"] == 0
    np.testing.assert_allclose(summary["mean"], [new.mean()], rtol=1e-5)
    np.testing.assert_allclose(summary["min"], [new.min()])
    np.testing.assert_allclose(summary["std"], [new.astype(np.float64).std()], rtol=1e-4)
    assert len(stats.recent()) == len(old) - 1 + 9
