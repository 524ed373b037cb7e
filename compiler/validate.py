"""Validation of an emitted artifact through the runtime's Session: the one way edgeship runs a model.

Numerics against the fp32 source on held-out inputs (max abs error, cosine, top-1
agreement), for every output; the headline figures are the worst output's. Task accuracy when labels are given, size, and host latency where a runtime
exists here. Produces the golden vectors (the artifact's own host outputs, with
tolerances a device must meet) and says which checks ran where.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.compiler.data import Dataset
from edgeship.compiler.emitters.base import Emitted
from edgeship.compiler.source import SourceModel
from edgeship.runtime.golden import cosine
from edgeship.runtime.package.manifest import Golden, Manifest

Array = np.ndarray[Any, Any]


@dataclass
class Metrics:
    """Validation figures of one artifact (None where a check did not run).

    ``outputs``: per output name, ``max_abs_error``, ``cosine_min`` and ``cosine_mean`` against
    the fp32 source. The headline ``max_abs_error``, ``cosine_min`` and ``cosine_mean`` are the
    worst over the outputs (``worst_output`` names the one with the lowest ``cosine_min``);
    top-1 agreement and accuracy come from the first output shaped (batch, classes).
    """

    samples: int
    backend: str | None
    max_abs_error: float | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    accuracy_fp32: float | None = None
    accuracy_drop_points: float | None = None
    size_bytes: int = 0
    weight_bytes: int = 0
    latency_median_ms: float | None = None
    latency_p90_ms: float | None = None
    checked_here: list[str] = field(default_factory=list)
    needs_hardware: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    worst_output: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def stage(emitted: Emitted, root: Path) -> Path:
    """Lay the artifact's files out under their package paths in ``root`` (hard links where possible)."""
    if root.exists():
        shutil.rmtree(root)
    for package_path, disk in emitted.files.items():
        target = root / package_path
        target.parent.mkdir(parents=True, exist_ok=True)
        if disk.is_dir():
            shutil.copytree(disk, target)
        else:
            try:
                os.link(disk, target)
            except OSError:
                shutil.copyfile(disk, target)
    return root


def validate(
    emitted: Emitted,
    manifest: Manifest,
    root: Path,
    source: SourceModel,
    held_out: Dataset,
    reference: dict[str, Array],
    *,
    golden_cases: int,
    latency_runs: int,
    backend: str = "auto",
) -> tuple[Metrics, bytes | None, Golden | None]:
    """Run the held-out set through the artifact; return metrics, golden vectors and their tolerance.

    When no backend here can run the artifact (Core ML prediction on Linux without the reference
    evaluator, a TensorRT engine), the metrics say so and the golden vectors are None.
    """
    from edgeship.errors import BackendUnavailableError
    from edgeship.runtime import open_unpackaged

    metrics = Metrics(
        samples=len(held_out), backend=None, size_bytes=emitted.size_bytes, weight_bytes=emitted.weight_bytes
    )
    not_checkable: tuple[type[Exception], ...] = (BackendUnavailableError,)
    if emitted.format == "coreml":
        from edgeship.compiler.coreml.reference import UnsupportedOpError

        not_checkable = (BackendUnavailableError, UnsupportedOpError)
    try:
        session = open_unpackaged(manifest, root, backend, threads=1)
    except not_checkable as exc:
        metrics.needs_hardware.append(f"numerics, accuracy and latency: not checked here ({exc}); needs hardware")
        return metrics, None, None
    with session:
        metrics.backend = session.backend_name
        batch = source.feed_batch
        outputs: dict[str, list[Array]] = {t.name: [] for t in source.outputs}
        for feed in held_out.batches(batch):
            result = session.run(feed)
            for name in outputs:
                outputs[name].append(np.asarray(result[name], np.float64))
        got = {k: np.concatenate(v) for k, v in outputs.items()}
        _numerics(metrics, got, reference, held_out)
        first = next(held_out.batches(batch))
        times = []
        for _ in range(latency_runs):
            start = time.perf_counter()
            session.run(first)
            times.append(time.perf_counter() - start)
        if emitted.format == "coreml":
            # The reference evaluator is numpy: its speed says nothing about a Core ML device.
            metrics.checked_here.append(f"numerics and accuracy on this host with {session.backend_name}")
            metrics.needs_hardware.append("latency on an Apple device")
        else:
            metrics.latency_median_ms = float(np.median(times) * 1e3)
            metrics.latency_p90_ms = float(np.percentile(times, 90) * 1e3)
            metrics.checked_here.append(f"numerics, accuracy and latency on this host with {session.backend_name}")
        golden_bytes, tolerance = _golden(session, held_out, batch, golden_cases, got)
    return metrics, golden_bytes, tolerance


def _numerics(metrics: Metrics, got: dict[str, Array], reference: dict[str, Array], data: Dataset) -> None:
    """Score every output against the reference; the headline figures are the worst output's."""
    for name, ref in reference.items():
        want = np.asarray(ref, np.float64)
        have = got[name]
        flat_have, flat_want = have.reshape(len(have), -1), want.reshape(len(want), -1)
        cosines = [cosine(a, b) for a, b in zip(flat_have, flat_want)]
        metrics.outputs[name] = {
            "max_abs_error": float(np.abs(have - want).max()),
            "cosine_min": float(np.min(cosines)),
            "cosine_mean": float(np.mean(cosines)),
        }
        if metrics.top1_agreement is None and have.ndim == 2 and have.shape[1] > 1:
            metrics.top1_agreement = float((have.argmax(1) == want.argmax(1)).mean())
            if data.labels is not None:
                metrics.accuracy = float((have.argmax(1) == data.labels).mean())
                metrics.accuracy_fp32 = float((want.argmax(1) == data.labels).mean())
                metrics.accuracy_drop_points = 100.0 * (metrics.accuracy_fp32 - metrics.accuracy)
    per = metrics.outputs
    # NaN sorts as the worst: a NaN cosine is a broken output.
    metrics.worst_output = min(per, key=lambda k: _nan_low(per[k]["cosine_min"]))
    metrics.cosine_min = per[metrics.worst_output]["cosine_min"]
    metrics.cosine_mean = min((p["cosine_mean"] for p in per.values()), key=_nan_low)
    metrics.max_abs_error = max((p["max_abs_error"] for p in per.values()), key=lambda v: -_nan_low(-v))


def _nan_low(value: float) -> float:
    return -np.inf if np.isnan(value) else value


def _golden(session: Any, data: Dataset, batch: int, cases: int, got: dict[str, Array]) -> tuple[bytes, Golden]:
    """Golden vectors: ``cases`` held-out samples and the artifact's own host outputs for them.

    The tolerance is 1 % of each output's range (and rtol 1e-3, cosine >= 0.999): wide
    enough for another CPU's kernels, far too tight for a runtime that computes wrong results.
    """
    n = min(cases, len(data))
    arrays: dict[str, Array] = {}
    for spec in session.inputs:
        arrays[f"input:{spec.name}"] = np.stack([data.inputs[spec.name][i : i + batch][:1] for i in range(n)])
    for name, values in got.items():
        arrays[f"output:{name}"] = np.stack([values[i : i + 1] for i in range(n)]).astype(np.float32)
    span = max(float(np.abs(v).max()) for v in got.values()) if got else 1.0
    tolerance = Golden("golden/vectors.npz", rtol=1e-3, atol=max(1e-5, 0.01 * span), cosine_min=0.999)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue(), tolerance
