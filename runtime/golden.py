"""Golden vectors: inputs stored in a package with the outputs the artifact must reproduce.

File ``golden/vectors.npz`` (path named by the manifest's ``golden.path``) holds, for
each input ``x``, an array ``input:x`` and for each output ``y`` an array ``output:y``.
The leading axis counts cases: case ``i`` feeds ``input:x[i]`` (exactly as a caller
passes it to ``Session.run``: float unless the input is an integer tensor such as token
ids) and expects ``output:y[i]`` (as ``Session.run`` returns it, dequantized). A case
passes when every output is within ``atol + rtol * |expected|`` elementwise and, when the
manifest sets ``cosine_min``, its cosine similarity to the expected output is at least that.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeship.errors import ArtifactError
from edgeship.runtime.package.manifest import Golden, Manifest

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class GoldenCase:
    inputs: dict[str, Array]
    outputs: dict[str, Array]


@dataclass(frozen=True)
class GoldenResult:
    """The outcome of running the golden vectors: worst errors over all cases and outputs."""

    cases: int
    passed: bool
    max_abs_error: float
    min_cosine: float
    failures: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "passed": self.passed,
            "max_abs_error": self.max_abs_error,
            "min_cosine": self.min_cosine,
            "failures": list(self.failures),
        }


def load_golden(data: bytes, manifest: Manifest) -> list[GoldenCase]:
    """Parse golden vectors; raise ``ArtifactError`` when a tensor is missing or the case counts differ."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"golden vectors are not a valid .npz file ({exc})") from None
    names = [f"input:{t.name}" for t in manifest.inputs] + [f"output:{t.name}" for t in manifest.outputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ArtifactError(f"golden vectors lack {', '.join(missing)}; the package was built wrongly")
    counts = {len(arrays[n]) for n in names}
    if len(counts) != 1:
        raise ArtifactError(f"golden vectors have different case counts per tensor: {sorted(counts)}")
    n = counts.pop()
    return [
        GoldenCase(
            {t.name: arrays[f"input:{t.name}"][i] for t in manifest.inputs},
            {t.name: arrays[f"output:{t.name}"][i] for t in manifest.outputs},
        )
        for i in range(n)
    ]


def compare(actual: dict[str, Array], case: GoldenCase, tolerance: Golden) -> tuple[float, float, list[str]]:
    """Compare one case's outputs; return (max abs error, min cosine, failure descriptions)."""
    worst_abs, worst_cos, failures = 0.0, 1.0, []
    for name, expected in case.outputs.items():
        got = np.asarray(actual[name], dtype=np.float64)
        want = np.asarray(expected, dtype=np.float64)
        if got.shape != want.shape:
            failures.append(f"output {name!r} has shape {got.shape}, golden {want.shape}")
            continue
        diff = np.abs(got - want)
        abs_err = float(diff.max()) if diff.size else 0.0
        cos = cosine(got, want)
        worst_abs, worst_cos = max(worst_abs, abs_err), min(worst_cos, cos)
        if not np.all(diff <= tolerance.atol + tolerance.rtol * np.abs(want)):
            failures.append(
                f"output {name!r} differs by up to {abs_err:.3g} (atol {tolerance.atol}, rtol {tolerance.rtol})"
            )
        elif tolerance.cosine_min is not None and cos < tolerance.cosine_min:
            failures.append(f"output {name!r} cosine {cos:.6f} < {tolerance.cosine_min}")
    return worst_abs, worst_cos, failures


def cosine(a: Array, b: Array) -> float:
    """Cosine similarity of two arrays flattened; 1.0 when both are all zeros."""
    a, b = a.ravel(), b.ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
