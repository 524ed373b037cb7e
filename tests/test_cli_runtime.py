"""``edgeship run`` and ``edgeship bench`` as a user runs them, on real packages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.model_fixtures import Models
from tests.test_cli import edgeship


def test_run_prints_outputs_of_a_quantized_model(models: Models, tmp_path: Path):
    np.save(tmp_path / "x.npy", models.x_test[:1])
    result = edgeship("run", models.package("tflite-int8"), "-k", models.public_key, "-i", tmp_path / "x.npy")
    assert result.returncode == 0, result.stderr
    assert "logits float32 (1, 10)" in result.stdout
    assert f"argmax per row: [{models.y_test[0]}]" in result.stdout


def test_run_saves_outputs_for_npz_and_named_inputs(models: Models, tmp_path: Path):
    np.savez(tmp_path / "in.npz", image=models.x_test[:4])
    np.save(tmp_path / "x.npy", models.x_test[:4])
    for spec in (tmp_path / "in.npz", f"image={tmp_path / 'x.npy'}"):
        out = tmp_path / "out.npz"
        result = edgeship("run", models.package("onnx-fp32"), "-k", models.public_key, "-i", spec, "-o", out)
        assert result.returncode == 0, result.stderr
        with np.load(out) as saved:
            assert saved["logits"].shape == (4, 10)


def test_run_with_a_wrongly_shaped_input_is_one_line_error(models: Models, tmp_path: Path):
    np.save(tmp_path / "x.npy", np.zeros((8, 8), np.float32))
    result = edgeship("run", models.package("onnx-fp32"), "-k", models.public_key, "-i", tmp_path / "x.npy")
    assert result.returncode == 2
    assert "error: input 'image' has shape (8, 8), expected (?, 1, 8, 8)" in result.stderr


def test_run_refuses_without_key_unless_told(models: Models, tmp_path: Path):
    np.save(tmp_path / "x.npy", models.x_test[:1])
    result = edgeship("run", models.package("onnx-fp32"), "-i", tmp_path / "x.npy")
    assert result.returncode == 2 and "--key" in result.stderr
    ok = edgeship("run", models.package("onnx-fp32"), "--no-verify-signature", "-i", tmp_path / "x.npy")
    assert ok.returncode == 0, ok.stderr


def test_bench_reports_latency_throughput_and_memory(models: Models):
    result = edgeship(
        "bench",
        models.package("onnx-fp32"),
        "-k",
        models.public_key,
        "--runs",
        "30",
        "--batch",
        "8",
        "--json",
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["runs"] == 30 and report["batch"] == 8 and report["backend"] == "onnxruntime"
    assert 0 < report["min_ms"] <= report["median_ms"] <= report["p90_ms"] <= report["p99_ms"]
    assert report["samples_per_s"] == pytest.approx(report["throughput_per_s"] * 8)
    assert report["peak_rss_mib"] > 10


def test_bench_fixed_batch_model_refuses_other_batch(models: Models):
    result = edgeship("bench", models.package("tflite-fp32"), "-k", models.public_key, "--runs", "3", "--batch", "4")
    assert result.returncode == 2 and "fixed batch dimension" in result.stderr


def test_bench_peak_memory_is_its_own_not_its_parents(models: Models):
    # getrusage's ru_maxrss survives execve: a bench started by a big process reported the parent's peak.
    ballast = np.ones(80_000_000)  # 610 MiB held by this (parent) process
    result = edgeship("bench", models.package("onnx-fp32"), "-k", models.public_key, "--runs", "5", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["peak_rss_mib"] < 400 < ballast.nbytes / (1 << 20)
