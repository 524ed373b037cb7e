"""The LiteRT backend on a device that has only tflite-runtime 2.14 (numpy 1), driven by subprocess.

``make test`` creates ``.venv-tflite`` with tflite-runtime 2.14.0, numpy 1.26 and edgeship's
base install (no ai-edge-litert), so the backend must fall back to ``tflite_runtime``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.model_fixtures import Models

VENV = Path(__file__).resolve().parent.parent / ".venv-tflite" / "bin" / "python"

SCRIPT = """
import json, sys
import numpy, edgeship.runtime as rt
from edgeship.runtime.backends.litert import interpreter_module
results = {"numpy": numpy.__version__, "interpreter": interpreter_module().__name__}
for path in sys.argv[2:]:
    with rt.open(path, trusted_keys=[sys.argv[1]], threads=1) as s:
        g = s.check_golden()
        results[path] = {"backend": s.backend_name, "passed": g.passed, "max_abs_error": g.max_abs_error}
print(json.dumps(results))
"""


@pytest.mark.skipif(not VENV.exists(), reason=".venv-tflite is missing: run 'make test', which creates it")
def test_tflite_runtime_214_runs_fp32_and_static_int8_packages(models: Models):
    packages = [str(models.package("tflite-fp32")), str(models.package("tflite-int8"))]
    proc = subprocess.run(
        [str(VENV), "-c", SCRIPT, str(models.public_key), *packages], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["numpy"].startswith("1.")
    assert results["interpreter"] == "tflite_runtime.interpreter"
    for path in packages:
        assert results[path]["backend"] == "litert"
        assert results[path]["passed"], results[path]
