"""Statistics cheap enough to leave on in production, and drift against the package baseline.

Per call the work is constant in the history length: a latency bucket, running sums
per channel, and one summary value per sample written into a fixed ring buffer.
Drift scores (PSI and the Kolmogorov-Smirnov statistic) compare the ring buffer with
the baseline the compiler measured on the calibration set; they are computed only
when read (``RuntimeStats.snapshot``), never on the hot path.

Baseline file (``baseline/stats.json`` in a package), schema 1::

    {"schema": 1, "samples": N,
     "inputs":  {"<name>": TensorBaseline},
     "outputs": {"<name>": TensorBaseline}}

    TensorBaseline = {"channel_axis": int | null, "mean": [..], "std": [..], "min": [..], "max": [..],
                      "summary_quantiles": [101 floats]          # quantiles 0..100 % of the per-sample mean
                      "class_frequencies": [C floats] | null,    # classifier outputs: share of each top-1 class
                      "confidence_quantiles": [101 floats] | null}
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]

RING = 1024
QUANTILES = np.linspace(0.0, 100.0, 101)
# Latency buckets: 1 us .. ~100 s, 8 per decade (log-spaced), in seconds.
LATENCY_BOUNDS: tuple[float, ...] = tuple(10 ** (k / 8) * 1e-6 for k in range(0, 8 * 8 + 1))
MAX_CHANNELS = 64
PENDING_ROWS = 64
PENDING_ELEMENTS = 4096


def channel_axis_for(shape: Sequence[int | None]) -> int | None:
    """The axis statistics are kept per (image channel or small feature axis), or None for global stats."""
    if len(shape) == 4:
        for axis in (1, 3):
            dim = shape[axis]
            if dim is not None and dim <= 4:
                return axis
        return None
    if len(shape) == 2 and shape[1] is not None and shape[1] <= MAX_CHANNELS:
        return 1
    return None


def is_classifier_output(shape: Sequence[int | None]) -> bool:
    """A 2-D (batch, classes) float output with 2..4096 classes is treated as a classifier."""
    return len(shape) == 2 and shape[1] is not None and 2 <= shape[1] <= 4096


class TensorStats:
    """Running statistics of one tensor, per channel (``channel_axis``) or global.

    Small samples (up to ``PENDING_ELEMENTS`` values) are copied into a block of
    ``PENDING_ROWS`` rows and folded into the statistics one block at a time, so the
    per-call cost is a copy instead of a dozen numpy reductions; ``flush`` folds a partial
    block and every read flushes first. Larger samples are folded on the call.
    """

    def __init__(self, name: str, channel_axis: int | None, channels: int, classifier: bool) -> None:
        self.name = name
        self.channel_axis = channel_axis
        self.classifier = classifier
        self.count = 0
        self.samples = 0
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.nonfinite = 0
        self.ring = np.zeros(RING, np.float64)
        self.ring_len = 0
        self.ring_pos = 0
        self.top1 = np.zeros(RING, np.int64) if classifier else None
        self.confidence = np.zeros(RING, np.float64) if classifier else None
        self._pending: Array | None = None
        self._pending_n = 0
        self._sample_shape: tuple[int, ...] | None = None

    def update(self, x: Array) -> None:
        """Add one call's tensor (leading axis = batch when it has two or more axes)."""
        if x.ndim >= 2 and x.size <= PENDING_ELEMENTS * x.shape[0]:
            rows = x.shape[0]
            if x.shape[1:] != self._sample_shape or self._pending is None:
                self.flush()
                self._sample_shape = x.shape[1:]
                self._pending = np.empty((PENDING_ROWS, *x.shape[1:]), np.float32)
            elif self._pending_n + rows > PENDING_ROWS:
                self.flush()
            if rows <= PENDING_ROWS:
                self._pending[self._pending_n : self._pending_n + rows] = x
                self._pending_n += rows
                return
        self._fold(x)

    def flush(self) -> None:
        """Fold buffered samples into the statistics."""
        if self._pending_n and self._pending is not None:
            n, self._pending_n = self._pending_n, 0
            self._fold(self._pending[:n])

    def _fold(self, x: Array) -> None:
        xf = x if x.dtype.kind == "f" and x.dtype.itemsize >= 4 else x.astype(np.float32)
        ca = self.channel_axis
        axes = tuple(a for a in range(xf.ndim) if a != ca) if ca is not None and ca < xf.ndim else None
        if axes is None:
            s = np.atleast_1d(xf.sum(dtype=np.float64))
            sq = np.atleast_1d(np.square(xf, dtype=np.float64).sum())
            lo, hi = np.atleast_1d(xf.min()), np.atleast_1d(xf.max())
        else:
            s = xf.sum(axis=axes, dtype=np.float64)
            sq = np.square(xf, dtype=np.float64).sum(axis=axes)
            lo, hi = xf.min(axis=axes), xf.max(axis=axes)
        if not math.isfinite(float(s.sum()) + float(sq.sum())):
            # Count NaN/Inf values; fold only the samples that hold none.
            self.nonfinite += int(np.count_nonzero(~np.isfinite(xf)))
            if xf.ndim >= 2:
                finite = np.isfinite(xf.reshape(len(xf), -1)).all(axis=1)
                if finite.any():
                    self._fold(xf[finite])
            return
        if s.shape != self.sum.shape:
            return  # a shape this tensor's statistics were not set up for: skip, never fail a call
        self.count += xf.size // s.size
        self.sum += s
        self.sumsq += sq
        np.minimum(self.min, lo, out=self.min)
        np.maximum(self.max, hi, out=self.max)
        rows = len(xf) if xf.ndim >= 2 else 1
        flat = xf.reshape(rows, -1)
        where = (self.ring_pos + np.arange(rows)) % RING
        self.ring[where] = flat.mean(axis=1, dtype=np.float64)
        if self.classifier and self.top1 is not None and self.confidence is not None and xf.ndim == 2:
            self.top1[where] = flat.argmax(axis=1)
            shifted = np.exp(flat - flat.max(axis=1, keepdims=True))
            self.confidence[where] = 1.0 / shifted.sum(axis=1)
        self.ring_pos = int((self.ring_pos + rows) % RING)
        self.ring_len = min(self.ring_len + rows, RING)
        self.samples += rows

    def reset_window(self) -> None:
        """Start a new window: count, samples, mean/std/min/max and the NaN/Inf count restart.

        The ring buffers (per-sample summaries, top-1 class and confidence) are kept: they
        already are the sliding window of the last ``RING`` samples that drift is computed from.
        """
        self.flush()
        self.count = 0
        self.samples = 0
        self.sum.fill(0.0)
        self.sumsq.fill(0.0)
        self.min.fill(np.inf)
        self.max.fill(-np.inf)
        self.nonfinite = 0

    def recent(self) -> Array:
        self.flush()
        return self.ring[: self.ring_len] if self.ring_len < RING else self.ring

    def summary(self) -> dict[str, Any]:
        self.flush()
        n = max(1, self.count)
        mean = self.sum / n
        var = np.maximum(self.sumsq / n - mean * mean, 0.0)
        out: dict[str, Any] = {
            "samples": self.samples,
            "channel_axis": self.channel_axis,
            "mean": mean.tolist(),
            "std": np.sqrt(var).tolist(),
            "min": self.min.tolist() if self.count else [],
            "max": self.max.tolist() if self.count else [],
            "nonfinite": self.nonfinite,
        }
        if self.classifier and self.top1 is not None and self.confidence is not None:
            k = self.ring_len
            top = self.top1[:k] if k < RING else self.top1
            conf = self.confidence[:k] if k < RING else self.confidence
            out["class_histogram"] = np.bincount(top).tolist() if k else []
            out["top1_confidence_mean"] = float(conf.mean()) if k else None
        return out


class LatencyHistogram:
    """Log-spaced latency buckets; percentiles are read from bucket upper bounds (<= 33% relative error)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.total = 0
        self.sum = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.total += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds

    def percentile(self, p: float) -> float | None:
        if not self.total:
            return None
        rank = p / 100.0 * self.total
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else self.max
        return self.max

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.total,
            "mean_ms": (self.sum / self.total * 1e3) if self.total else None,
            "p50_ms": _ms(self.percentile(50)),
            "p90_ms": _ms(self.percentile(90)),
            "p99_ms": _ms(self.percentile(99)),
            "max_ms": self.max * 1e3 if self.total else None,
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1e3


# ---------------------------------------------------------------- drift


def psi(expected: Array, actual: Array, eps: float = 1e-4) -> float:
    """Population stability index between two distributions given as bin shares (each summing to 1)."""
    e = np.clip(np.asarray(expected, np.float64), eps, None)
    a = np.clip(np.asarray(actual, np.float64), eps, None)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def psi_from_quantiles(quantiles: Array, values: Array, bins: int = 10) -> float:
    """PSI of ``values`` against a baseline known by its quantiles (equal-mass bins from the baseline)."""
    edges = np.unique(np.interp(np.linspace(0, 100, bins + 1), QUANTILES, quantiles))
    if len(edges) < 3:
        return 0.0 if np.all(values == edges[0]) else float("inf")
    inner = edges[1:-1]
    expected = np.diff(np.interp(edges, quantiles, QUANTILES)) / 100.0
    expected[0] += np.interp(edges[0], quantiles, QUANTILES) / 100.0
    counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(inner) + 1)
    return psi(expected, counts / max(1, counts.sum()))


def ks_from_quantiles(quantiles: Array, values: Array) -> float:
    """Kolmogorov-Smirnov statistic of ``values`` against a baseline CDF interpolated from its quantiles."""
    if len(values) == 0:
        return 0.0
    x = np.sort(values)
    n = len(x)
    cdf_base = np.interp(x, quantiles, QUANTILES / 100.0, left=0.0, right=1.0)
    upper = np.arange(1, n + 1) / n
    lower = np.arange(0, n) / n
    return float(max(np.max(upper - cdf_base), np.max(cdf_base - lower)))


# ---------------------------------------------------------------- baseline


@dataclass(frozen=True)
class Baseline:
    """The drift baseline of a package, parsed from ``baseline/stats.json``."""

    inputs: Mapping[str, Mapping[str, Any]]
    outputs: Mapping[str, Mapping[str, Any]]
    samples: int

    @classmethod
    def from_bytes(cls, data: bytes) -> Baseline:
        obj = json.loads(data.decode("utf-8"))
        if not isinstance(obj, dict) or obj.get("schema") != 1:
            raise ValueError("baseline schema is not 1")
        return cls(obj.get("inputs", {}), obj.get("outputs", {}), int(obj.get("samples", 0)))


def compute_baseline(inputs: Mapping[str, Iterable[Array]], outputs: Mapping[str, Iterable[Array]]) -> dict[str, Any]:
    """Baseline statistics of calibration batches, in the format ``Baseline`` reads.

    ``inputs``/``outputs`` map a tensor name to its batches (leading axis = samples), as the
    caller passes them to ``Session.run`` and as it returns them.
    """
    result: dict[str, Any] = {"schema": 1, "samples": 0, "inputs": {}, "outputs": {}}
    for kind, tensors in (("inputs", inputs), ("outputs", outputs)):
        for name, batches in tensors.items():
            data = np.concatenate([np.asarray(b, dtype=np.float64).reshape(np.shape(b)) for b in batches], axis=0)
            result["samples"] = max(result["samples"], int(data.shape[0]))
            axis = channel_axis_for(data.shape)
            axes = tuple(a for a in range(data.ndim) if a != axis) if axis is not None else None
            per_sample = data.reshape(data.shape[0], -1).mean(axis=1)
            entry: dict[str, Any] = {
                "channel_axis": axis,
                "mean": np.atleast_1d(data.mean(axis=axes)).tolist(),
                "std": np.atleast_1d(data.std(axis=axes)).tolist(),
                "min": np.atleast_1d(data.min(axis=axes)).tolist(),
                "max": np.atleast_1d(data.max(axis=axes)).tolist(),
                "summary_quantiles": np.percentile(per_sample, QUANTILES).tolist(),
                "class_frequencies": None,
                "confidence_quantiles": None,
            }
            if kind == "outputs" and is_classifier_output(data.shape):
                top = data.argmax(axis=1)
                entry["class_frequencies"] = (np.bincount(top, minlength=data.shape[1]) / len(top)).tolist()
                shifted = np.exp(data - data.max(axis=1, keepdims=True))
                entry["confidence_quantiles"] = np.percentile(1.0 / shifted.sum(axis=1), QUANTILES).tolist()
            result[kind][name] = entry
    return result


def drift(tensor: TensorStats, base: Mapping[str, Any]) -> dict[str, Any]:
    """Drift scores of one tensor's recent samples against its baseline entry."""
    recent = tensor.recent()  # flushes buffered samples
    out: dict[str, Any] = {"window": len(recent)}
    quantiles = np.asarray(base.get("summary_quantiles", []), np.float64)
    if len(recent) and len(quantiles) == len(QUANTILES):
        out["psi"] = psi_from_quantiles(quantiles, recent)
        out["ks"] = ks_from_quantiles(quantiles, recent)
    freqs = base.get("class_frequencies")
    if freqs and tensor.top1 is not None and tensor.ring_len:
        top = tensor.top1[: tensor.ring_len]
        counts = np.bincount(top, minlength=len(freqs))[: len(freqs)]
        out["class_psi"] = psi(np.asarray(freqs), counts / max(1, counts.sum()))
    conf_q = base.get("confidence_quantiles")
    if conf_q and tensor.confidence is not None and tensor.ring_len:
        out["confidence_ks"] = ks_from_quantiles(np.asarray(conf_q), tensor.confidence[: tensor.ring_len])
    return out
