"""benchmarks/compression.py at CI size: the pruning and distillation paths it measures still run end to end."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_compression_benchmark_compiles_times_and_distills(tmp_path, capsys):
    from benchmarks import compression

    assert compression.main(["--quick", "--seconds", "0.2", "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    entry = out["pruning"]["entry"]
    assert entry["pass"] == "prune.channels" and entry["after"]["params"] < entry["before"]["params"] / 2
    artifacts = out["pruning"]["artifacts"]
    assert set(artifacts) == {"unpruned fp32", "unpruned int8-static", "pruned fp32", "pruned int8-static"}
    assert artifacts["pruned fp32"]["size_bytes"] < artifacts["unpruned fp32"]["size_bytes"]
    assert all(a["latency_ms"] > 0 and a["accuracy"] is not None for a in artifacts.values())
    assert {k: len(v) for k, v in out["distillation"]["accuracy"].items()} == {"kd": 1, "labels": 1}
    printed = capsys.readouterr().out
    assert "machine: " in printed and "flags" in printed and "(a) structured pruning" in printed
