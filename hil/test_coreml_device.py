"""Core ML on a real Mac: convert a small PyTorch model with coremltools, predict, compare with PyTorch.

Runs on macOS (13 or newer) with coremltools 9.0 and torch installed; see hil/README.md.
Elsewhere the tests skip with the reason; with EDGESHIP_HIL_REQUIRE=1 (set by remote runs)
a missing Mac or library fails them instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.errors import ModelLoadError
from edgeship.runtime.backends.base import BackendOptions, TensorInfo
from edgeship.runtime.backends.coreml import CoreMLBackend
from edgeship.runtime.package.manifest import Manifest, TensorSpec

REASON = CoreMLBackend.unavailable_reason()
REQUIRE = os.environ.get("EDGESHIP_HIL_REQUIRE") == "1"
needs_macos = pytest.mark.skipif(REASON is not None and not REQUIRE, reason=f"needs macOS with coremltools: {REASON}")

MANIFEST = Manifest(
    name="hil-coreml-cnn",
    version=1,
    target="macos-arm64",
    format="coreml",
    precision="fp32",
    artifact_path="model.mlpackage",
    inputs=(TensorSpec("x", "float32", (1, 1, 8, 8)),),
    outputs=(TensorSpec("logits", "float32", (1, 10)),),
    files=(),
)


def convert(directory: Path, precision: str) -> tuple[Path, Any]:
    """Trace a small CNN, convert it to an ML program at ``precision``, save it; return the path and the model."""
    ct = pytest.importorskip("coremltools")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)
    ).eval()
    example = torch.zeros(1, 1, 8, 8)
    converted = ct.convert(
        torch.jit.trace(model, example),
        inputs=[ct.TensorType(name="x", shape=example.shape, dtype=np.float32)],
        outputs=[ct.TensorType(name="logits", dtype=np.float32)],  # keep float32 I/O at fp16 precision too
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.macOS13,
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
    )
    path = directory / "model.mlpackage"
    converted.save(str(path))
    return path, model


def torch_reference(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        result: np.ndarray = model(torch.from_numpy(x)).numpy()
    return result


@needs_macos
def test_fp32_prediction_on_cpu_matches_torch(tmp_path: Path):
    path, reference = convert(tmp_path, "fp32")
    model = CoreMLBackend.load(path, MANIFEST, BackendOptions(delegates=("cpu",)))
    assert model.inputs == (TensorInfo("x", (1, 1, 8, 8), np.dtype(np.float32)),)
    assert [(o.name, o.shape, o.dtype) for o in model.outputs] == [("logits", (1, 10), np.float32)]
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    (logits,) = model.run([x])
    np.testing.assert_allclose(logits, torch_reference(reference, x), rtol=1e-4, atol=1e-4)
    model.close()


@needs_macos
@pytest.mark.parametrize("delegates", [(), ("gpu",), ("coreml-ane",)], ids=["all", "gpu", "ane"])
def test_fp16_prediction_on_every_compute_unit_stays_close_to_torch(tmp_path: Path, delegates: tuple[str, ...]):
    path, reference = convert(tmp_path, "fp16")
    model = CoreMLBackend.load(path, MANIFEST, BackendOptions(delegates=delegates))
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    (logits,) = model.run([x])
    expected = torch_reference(reference, x)
    cosine = float((logits * expected).sum() / (np.linalg.norm(logits) * np.linalg.norm(expected)))
    assert logits.dtype == np.float32 and cosine >= 0.999, f"cosine {cosine}"
    model.close()


@needs_macos
def test_a_damaged_package_is_a_model_load_error(tmp_path: Path):
    path, _ = convert(tmp_path, "fp32")
    for weights in path.rglob("weight.bin"):
        weights.write_bytes(b"\0" * 16)  # truncated weights: Core ML refuses to compile the program
    with pytest.raises(ModelLoadError, match=r"Core ML (could not|failed)"):
        model = CoreMLBackend.load(path, MANIFEST, BackendOptions(delegates=("cpu",)))
        model.run([np.zeros((1, 1, 8, 8), np.float32)])


def test_device_suite_passes_on_the_remote_mac(remote_mac: Any):
    """From a workstation: copy the repository to the Mac and run this file there, hardware required."""
    remote_mac.sync_repo()
    result = remote_mac.run_pytest("hil/test_coreml_device.py", "-k", "not remote", "-q")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
