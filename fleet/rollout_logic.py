"""The rollout's decisions, as pure functions: who goes in which wave, when a wave is done, whether its gates hold.

Nothing here touches the database, the broker or the clock: the scheduler (``fleet.scheduler``)
reads a ``RolloutView`` out of the database, calls ``decide``, and carries out the returned
``Decision`` in one transaction before it publishes any command. Tests drive these functions
with made-up fleets (``tests/fleet/test_rollout_logic.py``).

Rollout states::

    pending -> running -> [waiting_approval ->] running -> ... -> completed
               running <-> paused (by hand)
               running -> halted (a gate breached) -> rolling_back -> rolled_back
               any state but the ends -> aborted (by hand)

Device states in a rollout (``rollout_devices.state``)::

    pending -> commanded -> COMMITTED | FAILED | ROLLED_BACK   (the device's own OTA outcome)
                         -> timed_out   (no outcome within device_timeout_s; never blocks the wave)
    COMMITTED -> reverting -> reverted | revert_failed          (the wave is rolled back by the fleet)
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeship.errors import UsageError

TERMINAL_DEVICE = frozenset({"COMMITTED", "FAILED", "ROLLED_BACK", "timed_out", "reverted", "revert_failed", "skipped"})
ACTIVE_ROLLOUT = frozenset({"pending", "running"})
ENDED_ROLLOUT = frozenset({"completed", "rolled_back", "aborted"})


# ----------------------------------------------------------------------------- waves


@dataclass(frozen=True)
class WaveSpec:
    """A wave's cumulative reach: ``percent`` of the selected devices, or ``count`` devices, in all waves so far."""

    percent: float | None = None
    count: int | None = None

    def reach(self, total: int) -> int:
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, math.ceil(total * self.percent / 100.0))

    def to_json(self) -> str | int:
        return f"{self.percent:g}%" if self.percent is not None else int(self.count or 0)


_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")


def parse_waves(items: Sequence[str | int]) -> list[WaveSpec]:
    """Parse waves like ``["1%", "10%", "50%", "100%"]`` or ``[2, 10, 50]`` (cumulative).

    Raises ``UsageError`` for an empty list, a malformed item, a reach that does not grow, or a
    last wave that does not reach every device (percentages must end at 100%).
    """
    if not items:
        raise UsageError("a rollout needs at least one wave (e.g. --waves 1%,10%,50%,100%)")
    specs: list[WaveSpec] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            if item < 1:
                raise UsageError(f"wave {item!r}: a device count must be at least 1")
            specs.append(WaveSpec(count=item))
            continue
        match = _PERCENT.fullmatch(str(item))
        if match is None:
            if str(item).strip().isdigit():
                specs.append(WaveSpec(count=int(str(item))))
                continue
            raise UsageError(f"wave {item!r}: give a percentage ('10%') or a device count ('25')")
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise UsageError(f"wave {item!r}: a percentage must be in (0, 100]")
        specs.append(WaveSpec(percent=percent))
    for a, b in itertools.pairwise(specs):
        if a.percent is not None and b.percent is not None and b.percent <= a.percent:
            raise UsageError(f"waves must grow: {a.to_json()} is followed by {b.to_json()}")
        if a.count is not None and b.count is not None and b.count <= a.count:
            raise UsageError(f"waves must grow: {a.to_json()} is followed by {b.to_json()}")
    last = specs[-1]
    if last.percent is not None and last.percent != 100:
        raise UsageError(f"the last wave is {last.to_json()}: end with 100% so that every selected device is reached")
    return specs


def assign_waves(device_ids: Iterable[str], specs: Sequence[WaveSpec], salt: str) -> dict[str, int]:
    """Put every device in a wave: a stable pseudo-random order (by ``salt`` + id), cut at each wave's reach.

    Each wave gets at least one new device while devices remain; a count-based last wave leaves
    the rest in the last wave (every selected device is reached).
    """
    ordered = sorted(device_ids, key=lambda d: hashlib.sha256(f"{salt}/{d}".encode()).hexdigest())
    total = len(ordered)
    out: dict[str, int] = {}
    start = 0
    for index, spec in enumerate(specs):
        end = max(spec.reach(total), min(start + 1, total))
        if index == len(specs) - 1:
            end = total
        for device in ordered[start:end]:
            out[device] = index
        start = end
    return out


def late_wave(current_wave: int, last_wave: int, state: str) -> int:
    """The wave a device enrolling during a rollout joins: the one running now (or the last one, after it ended)."""
    if state in ENDED_ROLLOUT:
        return last_wave
    return min(current_wave, last_wave)


# ----------------------------------------------------------------------------- selection


def matches(
    selector: Mapping[str, Any],
    device_target: str,
    device_tags: Mapping[str, Any],
    package_target: str,
    compatible: Iterable[str] = (),
) -> bool:
    """Whether a device is in a rollout: its target runs the package, and every selector tag matches.

    ``selector`` is ``{"tags": {"site": "plant-1", "hw": ["r2", "r3"]}}``: a tag value matches when it
    equals the selector's value, or is one of a listed alternative. ``compatible`` names more targets
    that run the package's (a TensorRT package never matches a phone: targets decide).
    """
    if device_target != package_target and device_target not in set(compatible):
        return False
    for key, wanted in (selector.get("tags") or {}).items():
        have = device_tags.get(key)
        if isinstance(wanted, list):
            if have not in wanted:
                return False
        elif have != wanted:
            return False
    return True


# ----------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class Gates:
    """Thresholds a wave must hold before the next one starts (None: that gate is off)."""

    max_install_failure_rate: float | None = 0.2
    max_rollback_rate: float | None = 0.2
    max_error_rate: float | None = 0.02
    """Absolute: the wave's error rate may exceed the control group's by at most this much."""
    max_latency_p99_ratio: float | None = 2.0
    max_drift_psi: float | None = None
    min_shadow_agreement: float | None = None
    min_devices_for_rates: int = 1
    """A rate (install failure, rollback) needs this many finished devices, a telemetry gate this many reporting."""
    early_halt: bool = True
    """Halt before the wave's soak ends on a breach that is already certain or measured (``judge_early``)."""
    min_reporting_fraction: float = 0.5
    """Early telemetry judgement waits for this fraction of the wave's committed devices to report."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Gates:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown gate {sorted(unknown)[0]!r}; gates are {', '.join(sorted(known))}")
        return cls(**dict(data))

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class WaveStats:
    """What the fleet knows about one wave when it judges it, and about the control group.

    ``control`` = devices of the rollout's selection still on the previous version.
    Rates are None when there is nothing to compute them from.
    """

    total: int
    committed: int = 0
    failed: int = 0
    rolled_back: int = 0
    timed_out: int = 0
    error_rate: float | None = None
    control_error_rate: float | None = None
    p99_ms: float | None = None
    control_p99_ms: float | None = None
    drift_psi: float | None = None
    shadow_agreement: float | None = None
    reporting: int | None = None
    """Devices of the wave that sent telemetry on the new version (None: not counted)."""

    @property
    def finished(self) -> int:
        return self.committed + self.failed + self.rolled_back + self.timed_out

    @property
    def attempted(self) -> int:
        return self.committed + self.failed + self.rolled_back


@dataclass(frozen=True)
class Breach:
    gate: str
    value: float
    threshold: float

    def describe(self) -> str:
        return f"{self.gate} {self.value:.3g} breaches {self.threshold:.3g}"


def gate_values(stats: WaveStats) -> dict[str, float | None]:
    """The values the gates are judged on (also shown in the API and the dashboard)."""
    attempted = stats.committed + stats.failed + stats.rolled_back
    install_failure = stats.failed / attempted if attempted else None
    rollback = stats.rolled_back / attempted if attempted else None
    error_increase = None
    if stats.error_rate is not None:
        error_increase = stats.error_rate - (stats.control_error_rate or 0.0)
    latency_ratio = None
    if stats.p99_ms is not None and stats.control_p99_ms:
        latency_ratio = stats.p99_ms / stats.control_p99_ms
    return {
        "install_failure_rate": install_failure,
        "rollback_rate": rollback,
        "error_rate_increase": error_increase,
        "latency_p99_ratio": latency_ratio,
        "drift_psi": stats.drift_psi,
        "shadow_agreement": stats.shadow_agreement,
    }


GATE_CHECKS: tuple[tuple[str, str, bool], ...] = (
    ("install_failure_rate", "max_install_failure_rate", False),
    ("rollback_rate", "max_rollback_rate", False),
    ("error_rate_increase", "max_error_rate", False),
    ("latency_p99_ratio", "max_latency_p99_ratio", False),
    ("drift_psi", "max_drift_psi", False),
    ("shadow_agreement", "min_shadow_agreement", True),
)
"""(value name in ``gate_values``, the ``Gates`` field that bounds it, whether that bound is a minimum)."""


OUTCOME_GATES = ("install_failure_rate", "rollback_rate")
TELEMETRY_GATES = ("error_rate_increase", "latency_p99_ratio", "drift_psi", "shadow_agreement")


def judge(gates: Gates, stats: WaveStats) -> list[Breach]:
    """The gates a finished wave breaches (empty: it may go on). Rates over fewer than
    ``min_devices_for_rates`` finished devices, and telemetry from fewer reporting devices, are not judged."""
    return judge_values(gates, _enough(gates, stats, gate_values(stats)))


def judge_early(gates: Gates, stats: WaveStats, soaking: bool) -> list[Breach]:
    """The breaches that halt a wave before its soak ends (empty: wait for the end), when ``gates.early_halt``.

    - Outcome gates, at any time in the wave: once the failures (or roll-backs) so far exceed the
      threshold *over the whole wave*, the final rate must breach it whatever the other devices do, so
      waiting adds nothing but more devices on a bad version.
    - Telemetry gates, during the soak only (``soaking``: every device of the wave has finished): judged on
      what has arrived once ``min_reporting_fraction`` of the committed devices (and at least
      ``min_devices_for_rates``) reported on the new version. The soak is the observation window; a breach
      that is already measured on most of the wave does not need the rest of it.
    """
    if not gates.early_halt or stats.total == 0:
        return []
    breaches = []
    for name, count, field_name in (
        ("install_failure_rate", stats.failed, "max_install_failure_rate"),
        ("rollback_rate", stats.rolled_back, "max_rollback_rate"),
    ):
        threshold = getattr(gates, field_name)
        if threshold is None or stats.attempted < gates.min_devices_for_rates:
            continue
        if count / stats.total > threshold:
            breaches.append(Breach(name, count / stats.attempted, threshold))
    if breaches or not soaking or not stats.committed or stats.reporting is None:
        return breaches
    needed = max(gates.min_devices_for_rates, math.ceil(gates.min_reporting_fraction * stats.committed))
    if stats.reporting < needed:
        return []
    values = gate_values(stats)
    return judge_values(gates, {k: values[k] for k in TELEMETRY_GATES})


def _enough(gates: Gates, stats: WaveStats, values: dict[str, float | None]) -> dict[str, float | None]:
    out = dict(values)
    if stats.attempted < gates.min_devices_for_rates:
        out.update(dict.fromkeys(OUTCOME_GATES))
    if stats.reporting is not None and stats.reporting < gates.min_devices_for_rates:
        out.update(dict.fromkeys(TELEMETRY_GATES))
    return out


def judge_values(gates: Gates, values: Mapping[str, float | None]) -> list[Breach]:
    """The gates that ``values`` (as ``gate_values`` returns them, or as stored) breach."""
    breaches = []
    for name, field_name, is_minimum in GATE_CHECKS:
        threshold = getattr(gates, field_name)
        value = values.get(name)
        if threshold is None or value is None:
            continue
        if (value < threshold) if is_minimum else (value > threshold):
            breaches.append(Breach(name, value, threshold))
    return breaches


# ----------------------------------------------------------------------------- the rollout step


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    wave: int
    state: str
    commanded_at: float | None = None
    online: bool = True


@dataclass(frozen=True)
class RolloutView:
    state: str
    current_wave: int
    wave_count: int
    soak_s: float
    device_timeout_s: float
    max_per_minute: int | None
    require_approval: bool
    wave_done_at: float | None
    commanded_last_minute: int = 0


@dataclass
class Decision:
    """What the scheduler must do now; empty when there is nothing to do."""

    command: list[str] = field(default_factory=list)
    time_out: list[str] = field(default_factory=list)
    mark_wave_done: bool = False
    judge_wave: bool = False
    watch: bool = False
    """The wave is still running or soaking: the caller may look for an early halt (``judge_early``)."""
    next_wave: int | None = None
    wait_approval: bool = False
    complete: bool = False


def decide(rollout: RolloutView, devices: Sequence[DeviceView], now: float) -> Decision:
    """The next steps of a running rollout (``judge_wave``: the caller evaluates the gates and then calls
    ``after_judgement``). A pending rollout starts at wave 0; paused, halted and ended ones do nothing."""
    decision = Decision()
    if rollout.state not in ACTIVE_ROLLOUT:
        return decision
    wave = rollout.current_wave
    in_wave = [d for d in devices if d.wave == wave]
    # Per-device timeouts: a commanded device that has not finished in time is marked and stops counting.
    for d in in_wave:
        if d.state == "commanded" and d.commanded_at is not None and now - d.commanded_at > rollout.device_timeout_s:
            decision.time_out.append(d.device_id)
    timed_out = set(decision.time_out)
    # Commands, at most max_per_minute (a rate, not a burst).
    room = len(in_wave)
    if rollout.max_per_minute is not None:
        room = max(rollout.max_per_minute - rollout.commanded_last_minute, 0)
    for d in in_wave:
        if d.state == "pending" and room > 0:
            decision.command.append(d.device_id)
            room -= 1
    unfinished = [
        d
        for d in in_wave
        if d.state not in TERMINAL_DEVICE and d.device_id not in timed_out and d.device_id not in decision.command
    ]
    if unfinished or decision.command:
        decision.watch = True
        return decision
    if rollout.wave_done_at is None:
        decision.mark_wave_done = True
        if rollout.soak_s > 0:
            decision.watch = True
            return decision
    elif now - rollout.wave_done_at < rollout.soak_s:
        decision.watch = True
        return decision
    decision.judge_wave = True
    return decision


def after_judgement(rollout: RolloutView, breaches: Sequence[Breach]) -> tuple[str, int]:
    """The rollout's state and wave after a finished wave was judged: halted, waiting for approval,
    the next wave, or completed."""
    if breaches:
        return "halted", rollout.current_wave
    if rollout.current_wave + 1 >= rollout.wave_count:
        return "completed", rollout.current_wave
    if rollout.require_approval:
        return "waiting_approval", rollout.current_wave
    return "running", rollout.current_wave + 1
