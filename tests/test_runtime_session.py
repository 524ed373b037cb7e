"""edgeship.runtime.open and Session on real models: LiteRT and ONNX Runtime, golden vectors, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import edgeship.runtime as rt
from edgeship.errors import (
    ArtifactError,
    BackendUnavailableError,
    InputError,
    IntegrityError,
    UntrustedKeyError,
    UsageError,
)
from edgeship.runtime.package import read_manifest, unpack_package, write_package
from tests.model_fixtures import Models

PACKAGES = ["tflite-fp32", "tflite-int8", "onnx-fp32", "onnx-preprocessed"]


def open_pkg(models: Models, name: str, **kwargs):
    kwargs.setdefault("threads", 1)
    return rt.open(models.package(name), trusted_keys=models.trusted, **kwargs)


@pytest.mark.parametrize("name", PACKAGES)
def test_every_backend_here_reproduces_the_golden_vectors(models: Models, name: str):
    with open_pkg(models, name) as session:
        result = session.check_golden()
        assert result.passed, result.failures
        assert result.cases == 6
        expected_backend = "litert" if name.startswith("tflite") else "onnxruntime"
        assert session.backend_name == expected_backend


@pytest.mark.parametrize("name", ["tflite-fp32", "tflite-int8", "onnx-fp32"])
def test_accuracy_through_the_session_matches_pytorch(models: Models, name: str):
    with open_pkg(models, name) as session:
        preds = np.array([session.run({"image": x[None]})["logits"].argmax() for x in models.x_test])
    accuracy = (preds == models.y_test).mean()
    assert accuracy >= models.torch_accuracy - (0.01 if "int8" in name else 0.0)


def test_quantized_model_takes_and_returns_floats_unless_raw(models: Models):
    x = models.x_test[:1]
    with open_pkg(models, "tflite-int8") as session:
        assert session.inputs[0].dtype == np.float32 and session.outputs[0].dtype == np.float32
        out = session.run(x)["logits"]
        assert out.dtype == np.float32
    with open_pkg(models, "tflite-int8", raw=True) as raw:
        assert raw.inputs[0].dtype == np.int8
        q = raw.manifest.inputs[0].quantization
        qx = np.clip(np.rint(x / q.scale[0] + q.zero_point[0]), -128, 127).astype(np.int8)
        qout = raw.run({"image": qx})["logits"]
        assert qout.dtype == np.int8
        oq = raw.manifest.outputs[0].quantization
        np.testing.assert_allclose((qout.astype(np.float32) - oq.zero_point[0]) * oq.scale[0], out, atol=1e-6)


def test_dynamic_batch_runs_any_batch_size(models: Models):
    with open_pkg(models, "onnx-fp32") as session:
        assert session.inputs[0].shape == (None, 1, 8, 8)
        batch = session.run(models.x_test[:37])["logits"]
        single = np.concatenate([session.run(x[None])["logits"] for x in models.x_test[:37]])
    assert batch.shape == (37, 10)
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_preprocessing_from_the_manifest_is_applied(models: Models):
    nhwc = (models.x_test[:5] * 16).transpose(0, 2, 3, 1)
    with open_pkg(models, "onnx-preprocessed") as pre, open_pkg(models, "onnx-fp32") as plain:
        assert pre.inputs[0].shape == (None, 8, 8, 1)
        np.testing.assert_allclose(pre.run(nhwc)["logits"], plain.run(models.x_test[:5])["logits"], atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_wrong_input_name_says_which_and_what_was_expected(models: Models):
    with open_pkg(models, "onnx-fp32") as session:
        with pytest.raises(InputError, match=r"missing 'image'; unexpected 'img'.*takes 'image'"):
            session.run({"img": models.x_test[:1]})
        with pytest.raises(InputError, match="unexpected 'extra'"):
            session.run({"image": models.x_test[:1], "extra": models.x_test[:1]})


def test_wrong_shape_says_which_and_what_was_expected(models: Models):
    shape_error = r"input 'image' has shape \(1, 8, 8\), expected \(1, 1, 8, 8\)"
    with open_pkg(models, "tflite-fp32") as session, pytest.raises(InputError, match=shape_error):
        session.run(models.x_test[0])
    with open_pkg(models, "onnx-fp32") as session, pytest.raises(InputError, match=r"expected \(\?, 1, 8, 8\)"):
        session.run(np.zeros((2, 3, 8, 8), np.float32))


def test_wrong_dtype_says_which_and_what_was_expected(models: Models):
    with open_pkg(models, "onnx-fp32") as session:
        with pytest.raises(InputError, match="input 'image' has dtype int64, expected float32"):
            session.run(np.zeros((1, 1, 8, 8), np.int64))
        # float64 is the same kind: converted, not refused
        assert session.run(models.x_test[:1].astype(np.float64))["logits"].shape == (1, 10)


def test_package_for_another_backend_is_refused(models: Models):
    with pytest.raises(UsageError, match="runs tflite artifacts, not 'onnx'"):
        open_pkg(models, "onnx-fp32", backend="litert")
    with pytest.raises(UsageError, match="unknown backend 'tflite-gpu'"):
        open_pkg(models, "onnx-fp32", backend="tflite-gpu")


def test_core_ml_backend_says_plainly_it_needs_apple_hardware(models: Models):
    with pytest.raises((BackendUnavailableError, UsageError), match="coreml"):
        open_pkg(models, "onnx-fp32", backend="coreml")


def _repackage(models: Models, tmp_path: Path, name: str, mutate) -> Path:
    """Unpack a package, change its artifact with ``mutate``, and sign it again with the trusted key."""
    from edgeship.runtime.package import load_private_key

    unpacked = tmp_path / "unpacked"
    verified = unpack_package(models.package(name), unpacked, trusted_keys=models.trusted)
    m = verified.manifest
    contents = {f.path: (unpacked / f.path).read_bytes() for f in m.files}
    contents[m.artifact_path] = mutate(contents[m.artifact_path])
    out = tmp_path / "resigned.edgepkg"
    write_package(out, m, contents, [load_private_key(models.root / "keys/models.key")])
    return out


@pytest.mark.parametrize("name", ["tflite-fp32", "onnx-fp32"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated|damaged"),
        (lambda b: b[:4] + b"XXXX" + b[8:] if b[4:8] == b"TFL3" else b"\xff\xff\xff\xff" + b[4:], "not|damaged"),
        (lambda b: b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "not"),
    ],
    ids=["truncated", "damaged-header", "wrong-format"],
)
def test_damaged_artifact_in_a_validly_signed_package_is_refused_before_loading(
    models: Models, tmp_path: Path, name: str, damage, message: str
):
    pkg = _repackage(models, tmp_path, name, damage)
    with pytest.raises(ArtifactError, match=message):
        rt.open(pkg, trusted_keys=models.trusted)


def test_manifest_that_disagrees_with_the_model_is_refused(models: Models, tmp_path: Path):
    from dataclasses import replace

    from edgeship.runtime.package import TensorSpec, load_private_key

    unpacked = tmp_path / "u"
    m = unpack_package(models.package("onnx-fp32"), unpacked, trusted_keys=models.trusted).manifest
    bad = replace(m, inputs=(TensorSpec("image", "int8", (None, 1, 8, 8)),), golden=None)
    contents = {f.path: (unpacked / f.path).read_bytes() for f in m.files if not f.path.startswith("golden/")}
    out = tmp_path / "bad.edgepkg"
    write_package(out, bad, contents, [load_private_key(models.root / "keys/models.key")])
    with pytest.raises(ArtifactError, match="manifest says input 'image' is int8 but the model has float32"):
        rt.open(out, trusted_keys=models.trusted)


def test_signature_is_checked_unless_turned_off_explicitly(models: Models, stranger):
    with pytest.raises(UsageError, match="no trusted keys"):
        rt.open(models.package("onnx-fp32"))
    with pytest.raises(UntrustedKeyError):
        rt.open(models.package("onnx-fp32"), trusted_keys=stranger.trusted)
    with rt.open(models.package("onnx-fp32"), verify_signature=False) as session:
        assert session.signed_by is None
    with rt.open(models.package("onnx-fp32"), trusted_keys=[models.public_key]) as session:
        assert session.signed_by is not None


def test_unpacked_directory_opens_and_is_hash_checked(models: Models, tmp_path: Path):
    slot = tmp_path / "slot"
    unpack_package(models.package("tflite-fp32"), slot, trusted_keys=models.trusted)
    with rt.open(slot, trusted_keys=models.trusted) as session:
        assert session.check_golden().passed
        assert session.root == slot
    assert slot.exists(), "closing a session must not delete a directory it did not create"
    data = bytearray((slot / "model/digits.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (slot / "model/digits.tflite").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        rt.open(slot, trusted_keys=models.trusted)


def test_unlisted_file_in_unpacked_directory_is_refused(models: Models, tmp_path: Path):
    slot = tmp_path / "slot"
    unpack_package(models.package("onnx-fp32"), slot, trusted_keys=models.trusted)
    (slot / "model/evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(IntegrityError, match=r"evil\.so.*not listed"):
        rt.open(slot, trusted_keys=models.trusted)


def test_closing_a_session_removes_its_temporary_files(models: Models):
    session = open_pkg(models, "onnx-fp32")
    root = session.root
    assert root.exists()
    session.close()
    assert not root.exists()


def test_litert_options_threads_and_delegates(models: Models):
    with open_pkg(models, "tflite-fp32", threads=2, delegates=["none"]) as session:
        assert session.check_golden().passed
    with pytest.raises(UsageError, match="LiteRT delegates are"):
        open_pkg(models, "tflite-fp32", delegates=["npu"])


def test_onnxruntime_missing_provider_is_a_clear_error(models: Models):
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        open_pkg(models, "onnx-fp32", delegates=["cuda"])


# ---------------------------------------------------------------- statistics


def test_statistics_count_calls_and_describe_inputs_and_outputs(models: Models):
    with open_pkg(models, "onnx-fp32", warmup=3) as session:
        x = models.x_test[:200]
        for i in range(0, 200, 10):
            session.run(x[i : i + 10])
        snap = session.stats_snapshot()
    assert snap["latency"]["calls"] == 20  # warm-up runs are not counted
    assert snap["latency"]["p50_ms"] is not None and snap["latency"]["p50_ms"] <= snap["latency"]["p99_ms"]
    image = snap["inputs"]["image"]
    assert image["samples"] == 200
    assert image["mean"][0] == pytest.approx(float(x.mean()), rel=1e-5)
    assert image["std"][0] == pytest.approx(float(x.std()), rel=1e-4)
    assert image["min"][0] == pytest.approx(0.0) and image["max"][0] == pytest.approx(1.0)
    logits = snap["outputs"]["logits"]
    assert sum(logits["class_histogram"]) == 200
    assert 0.1 < logits["top1_confidence_mean"] <= 1.0


def test_drift_is_low_in_distribution_and_high_when_inputs_shift(models: Models):
    with open_pkg(models, "onnx-fp32") as same, open_pkg(models, "onnx-fp32") as shifted:
        for x in models.x_test[:300]:
            same.run(x[None])
            shifted.run(np.clip(1.0 - x, 0, 1)[None])  # inverted images: a camera gone wrong
        d_same = same.stats_snapshot()["inputs"]["image"]["drift"]
        d_shift = shifted.stats_snapshot()["inputs"]["image"]["drift"]
        c_shift = shifted.stats_snapshot()["outputs"]["logits"]["drift"]
    assert d_same["psi"] < 0.1 and d_same["ks"] < 0.15
    assert d_shift["psi"] > 1.0 and d_shift["ks"] > 0.9
    assert c_shift["class_psi"] > 0.25


def test_nan_inputs_are_counted_not_folded_into_the_means(models: Models):
    with open_pkg(models, "onnx-fp32") as session:
        x = models.x_test[:1].copy()
        session.run(x)
        x[0, 0, 0, 0] = np.nan
        session.run(x)
        image = session.stats_snapshot()["inputs"]["image"]
    assert image["nonfinite"] == 1 and image["samples"] == 1 and np.isfinite(image["mean"][0])


def test_stats_off_means_no_statistics(models: Models):
    with open_pkg(models, "onnx-fp32", stats=False) as session:
        session.run(models.x_test[:1])
        assert session.stats is None
        with pytest.raises(UsageError, match="statistics are off"):
            session.stats_snapshot()


def test_manifest_of_test_packages_carries_golden_and_baseline(models: Models):
    m = read_manifest(models.package("tflite-int8"), trusted_keys=models.trusted).manifest
    assert m.golden is not None and m.baseline_path == "baseline/stats.json"
    assert m.inputs[0].quantization is not None


def test_copying_a_package_directory_elsewhere_keeps_it_valid(models: Models, tmp_path: Path):
    slot = tmp_path / "slot"
    unpack_package(models.package("onnx-fp32"), slot, trusted_keys=models.trusted)
    moved = shutil.copytree(slot, tmp_path / "moved")
    with rt.open(moved, trusted_keys=models.trusted) as session:
        assert session.check_golden().passed


@pytest.mark.parametrize("name", ["two-tflite", "two-onnx"])
def test_two_input_model_binds_inputs_by_name_or_position(models: Models, name: str):
    with open_pkg(models, name) as session:
        assert [t.name for t in session.inputs] == ["tokens", "mask"]
        assert session.check_golden().passed
        ids = np.arange(16, dtype=np.int64)[None] % 100  # int64 ids also for the int32 TFLite model
        mask = np.ones((1, 16), np.float32)
        out = session.run({"mask": mask, "tokens": ids})["scores"]
        assert out.shape == (1, 4)
        with pytest.raises(InputError, match="this model has 2 inputs"):
            session.run(ids)
        with pytest.raises(InputError, match="input 'mask' has dtype int64, expected float32"):
            session.run({"tokens": ids, "mask": ids})
