"""Benchmarking a Session: latency percentiles, throughput and peak memory of the process."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edgeship.runtime.session import Session


@dataclass(frozen=True)
class BenchResult:
    """Latencies in milliseconds over ``runs`` timed calls (after ``warmup`` untimed ones)."""

    backend: str
    runs: int
    warmup: int
    batch: int
    min_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float
    samples_per_s: float
    peak_rss_mib: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``getrusage``'s ``ru_maxrss``
    survives ``execve``, so a process started by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def benchmark(
    session: Session,
    runs: int = 100,
    warmup: int = 10,
    inputs: Mapping[str, Any] | None = None,
    batch: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Time ``session.run`` on ``inputs`` (default: the package's first golden case, else random data).

    Raises ``UsageError`` through ``Session.run`` when ``inputs`` do not fit the model.
    """
    feeds = dict(inputs) if inputs is not None else session.example_inputs(batch=batch)
    for _ in range(warmup):
        session.run(feeds)
    times = np.empty(runs, np.float64)
    clock = time.perf_counter
    for i in range(runs):
        start = clock()
        session.run(feeds)
        times[i] = clock() - start
        if progress is not None:
            progress(i + 1, runs)
    first = next(iter(feeds.values()))
    actual_batch = int(np.shape(first)[0]) if np.ndim(first) else 1
    ms = times * 1e3
    total = float(times.sum())
    return BenchResult(
        backend=session.backend_name,
        runs=runs,
        warmup=warmup,
        batch=actual_batch,
        min_ms=float(ms.min()),
        median_ms=float(np.median(ms)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        throughput_per_s=runs / total if total else float("inf"),
        samples_per_s=runs * actual_batch / total if total else float("inf"),
        peak_rss_mib=peak_rss_mib(),
    )
