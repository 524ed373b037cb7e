"""The device side stays light: importing it must not load heavy ML frameworks."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "tensorflow", "onnx", "coremltools", "jax", "litert_torch")


@pytest.mark.py310
@pytest.mark.parametrize(
    "module",
    [
        "edgeship.runtime",
        "edgeship.runtime.package",
        "edgeship.runtime.check",
        "edgeship.device_agent",
        "edgeship.device_agent.daemon",
        "edgeship.device_agent.mqtt_link",
        "edgeship.device_agent.tuf_client",
        "edgeship.cli",
        "edgeship.cli.agent",
    ],
)
def test_device_side_imports_without_heavy_frameworks(module: str):
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"


def test_top_level_folders_are_the_same_modules_as_the_subpackages():
    import edgeship.runtime.package as via_package
    from edgeship.runtime.package import reader

    assert reader.__name__ == "edgeship.runtime.package.reader"
    assert via_package.__file__ is not None and "edgeship" in via_package.__name__
    assert "runtime" not in sys.modules and "runtime.package" not in sys.modules
