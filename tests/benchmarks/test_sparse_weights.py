"""benchmarks/sparse_weights.py at CI size: the sparse-weight paths it measures still run end to end."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_sparse_weights_benchmark_shrinks_core_ml_and_flags_tensorrt(tmp_path, capsys):
    from benchmarks import sparse_weights

    assert sparse_weights.main(["--quick", "--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert len(rows) == 6
    for label in ("prune.sparse24", "prune.magnitude 0.75"):
        assert rows[f"{label} | ios17"]["weight_bytes"] < 0.8 * rows["unpruned | ios17"]["weight_bytes"]
    assert rows["prune.sparse24 | jetson-orin-nano"]["sparsity_2_4"] is True
    assert rows["prune.magnitude 0.75 | jetson-orin-nano"]["sparsity_2_4"] is False  # unstructured: no 2:4
    assert rows["unpruned | jetson-orin-nano"]["sparsity_2_4"] is False
    assert "flags" in capsys.readouterr().out
