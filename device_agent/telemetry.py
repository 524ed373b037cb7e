"""What goes into a telemetry message: the model's window of statistics and the device's vitals.

Read without extra dependencies where Linux allows: CPU time from ``time.process_time``,
RSS from ``/proc/self/statm``, temperature from ``/sys/class/thermal/thermal_zone*/temp``
(Jetson boards expose CPU/GPU/SoC zones there; the hottest is reported).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

THERMAL = Path("/sys/class/thermal")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class CpuMeter:
    """CPU use of this process between two reads, in percent of one core."""

    def __init__(self) -> None:
        self._cpu = time.process_time()
        self._wall = time.monotonic()

    def read(self) -> float:
        cpu, wall = time.process_time(), time.monotonic()
        used, elapsed = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        return round(100.0 * used / elapsed, 2) if elapsed > 0 else 0.0


def rss_mib() -> float:
    """Resident set size of this process now (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * _PAGE / (1 << 20), 2)
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / 1024, 2)


def temperature_c(root: Path = THERMAL) -> float | None:
    """The hottest readable thermal zone in degrees Celsius, or None where there is none."""
    hottest: float | None = None
    try:
        zones = list(root.glob("thermal_zone*/temp"))
    except OSError:
        return None
    for zone in zones:
        try:
            value = int(zone.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if -100 <= value <= 300 and (hottest is None or value > hottest):
            hottest = value
    return hottest


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


DRIFT_MIN_SAMPLES = 100
"""Below this many recent samples drift scores are noise (PSI of a handful of samples easily exceeds 5)."""


def drift_summary(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The drift scores of a runtime statistics snapshot, per input and output; tensors with fewer than
    ``DRIFT_MIN_SAMPLES`` recent samples are left out."""
    out: dict[str, Any] = {"inputs": {}, "outputs": {}}
    for kind in ("inputs", "outputs"):
        for name, entry in (snapshot.get(kind) or {}).items():
            d = entry.get("drift")
            if not d or int(d.get("window", 0) or 0) < DRIFT_MIN_SAMPLES:
                continue
            out[kind][name] = {k: _finite(d.get(k)) for k in ("psi", "ks", "class_psi", "confidence_ks") if k in d}
    return out


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
        return round(float(value), 6)
    return None
