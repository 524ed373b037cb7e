"""Prometheus metrics of the fleet, served at ``GET /metrics`` (read token).

``FleetCollector`` reads the database at scrape time with a few aggregate queries, so every
fleet process reports the same fleet-wide numbers whichever one Prometheus scrapes. What only a
process knows (its ingest counters, its webhook deliveries) comes from ``ProcessStats`` and is
labelled with the process's ``instance`` name: sum over instances for the fleet's total.

Metric names (all prefixed ``edgeship_fleet_``):

* ``devices{state="online"|"offline"}``: enrolled devices by their last known state.
* ``rollout_devices{rollout,wave,state}``: devices per wave and state, for rollouts not ended.
* ``rollout_state{rollout,state}`` (1 for the current state) and ``rollout_current_wave{rollout}``.
* ``rollout_gate_value{rollout,wave,gate}``: the value each judged wave's gates were judged on.
* ``ingest_messages_total{instance,outcome}``: what this process's ingest did per outcome
  (``telemetry``, ``events`` stored; ``duplicates``; dropped: ``malformed``, ``spoofed``,
  ``unknown_device``, ``wrong_topic``).
* ``ingest_dropped_total{instance,reason}``: the dropped outcomes alone.
* ``ingest_lag_seconds{stat="mean"|"max"}``: received_at - ts of the events stored in the last 5 minutes.
* ``ingest_write_lag_seconds{instance}``: how long this process's last written batch waited in its queue.
* ``telemetry_rows``: raw telemetry rows kept (before retention rolls them up).
* ``alerts_open{kind}``: open alerts per kind.
* ``alert_webhook_total{instance,outcome}``: webhook deliveries ``sent``, ``failed``, ``dropped``, ``retried``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from edgeship.fleet.alerts import KINDS
from edgeship.fleet.context import FleetContext
from edgeship.fleet.models import Alert, Device, Event, Rollout, RolloutDevice, Telemetry
from edgeship.fleet.rollout_logic import ENDED_ROLLOUT

PREFIX = "edgeship_fleet"
LAG_WINDOW_S = 300.0
DROP_REASONS = ("malformed", "spoofed", "unknown_device", "wrong_topic")


@dataclass
class ProcessStats:
    """What this process knows that the database does not: read by the collector at scrape time."""

    instance: str = "local"
    ingest_counts: Callable[[], dict[str, int]] = dict
    ingest_lag: Callable[[], float | None] = lambda: None
    webhook_counts: Callable[[], dict[str, int]] = dict
    extra: dict[str, Any] = field(default_factory=dict)


class FleetCollector(Collector):
    """Reads the fleet database (and ``ProcessStats``) on every scrape."""

    def __init__(self, ctx: FleetContext, stats: ProcessStats | None = None) -> None:
        self.ctx = ctx
        self.stats = stats or ProcessStats()

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only (no database query at registration)

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        with self.ctx.db.session(readonly=True) as session:
            devices = GaugeMetricFamily(f"{PREFIX}_devices", "Enrolled devices by last known state.", labels=["state"])
            counts = dict.fromkeys((True, False), 0)
            for online, n in session.execute(select(Device.online, func.count()).group_by(Device.online)):
                counts[bool(online)] += n
            devices.add_metric(["online"], counts[True])
            devices.add_metric(["offline"], counts[False])
            yield devices
            yield from self._rollouts(session)
            lag = GaugeMetricFamily(
                f"{PREFIX}_ingest_lag_seconds",
                "received_at - ts of events stored in the last 5 minutes.",
                labels=["stat"],
            )
            mean, high = session.execute(
                select(func.avg(Event.received_at - Event.ts), func.max(Event.received_at - Event.ts)).where(
                    Event.received_at >= now - LAG_WINDOW_S
                )
            ).one()
            if mean is not None:
                lag.add_metric(["mean"], float(mean))
                lag.add_metric(["max"], float(high))
            yield lag
            yield GaugeMetricFamily(
                f"{PREFIX}_telemetry_rows",
                "Raw telemetry rows kept.",
                value=session.scalar(select(func.count()).select_from(Telemetry)) or 0,
            )
            alerts = GaugeMetricFamily(f"{PREFIX}_alerts_open", "Open alerts per kind.", labels=["kind"])
            open_counts = dict.fromkeys(KINDS, 0)
            for kind, n in session.execute(
                select(Alert.kind, func.count()).where(Alert.resolved_at.is_(None)).group_by(Alert.kind)
            ):
                open_counts[kind] = n
            for kind, n in sorted(open_counts.items()):
                alerts.add_metric([kind], n)
            yield alerts
        yield from self._process()

    def _rollouts(self, session: Any) -> Iterator[Metric]:
        rollouts = session.execute(
            select(Rollout.id, Rollout.state, Rollout.current_wave, Rollout.gate_values).where(
                Rollout.state.not_in(ENDED_ROLLOUT)
            )
        ).all()
        state = GaugeMetricFamily(f"{PREFIX}_rollout_state", "1 for the rollout's state.", labels=["rollout", "state"])
        wave = GaugeMetricFamily(
            f"{PREFIX}_rollout_current_wave", "The wave (from 1) a rollout is at.", labels=["rollout"]
        )
        gates = GaugeMetricFamily(
            f"{PREFIX}_rollout_gate_value",
            "Gate values a judged wave was judged on.",
            labels=["rollout", "wave", "gate"],
        )
        for rollout_id, rollout_state, current_wave, gate_values in rollouts:
            state.add_metric([str(rollout_id), rollout_state], 1)
            wave.add_metric([str(rollout_id)], current_wave + 1)
            for wave_key, values in (gate_values or {}).items():
                if not isinstance(values, dict) or not str(wave_key).isdigit():
                    continue
                for gate, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        gates.add_metric([str(rollout_id), str(int(wave_key) + 1), gate], float(value))
        per_wave = GaugeMetricFamily(
            f"{PREFIX}_rollout_devices", "Devices per rollout wave and state.", labels=["rollout", "wave", "state"]
        )
        ids = [r[0] for r in rollouts]
        if ids:
            rows = session.execute(
                select(RolloutDevice.rollout_id, RolloutDevice.wave, RolloutDevice.state, func.count())
                .where(RolloutDevice.rollout_id.in_(ids))
                .group_by(RolloutDevice.rollout_id, RolloutDevice.wave, RolloutDevice.state)
            )
            for rollout_id, wave_index, device_state, n in rows:
                per_wave.add_metric([str(rollout_id), str(wave_index + 1), device_state], n)
        yield from (state, wave, gates, per_wave)

    def _process(self) -> Iterator[Metric]:
        instance = self.stats.instance
        counts = self.stats.ingest_counts()
        messages = CounterMetricFamily(
            f"{PREFIX}_ingest_messages",
            "Messages this process's ingest handled, by outcome.",
            labels=["instance", "outcome"],
        )
        for outcome, n in sorted(counts.items()):
            messages.add_metric([instance, outcome], n)
        yield messages
        dropped = CounterMetricFamily(
            f"{PREFIX}_ingest_dropped",
            "Messages this process's ingest dropped, by reason.",
            labels=["instance", "reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([instance, reason], counts.get(reason, 0))
        yield dropped
        lag = self.stats.ingest_lag()
        write_lag = GaugeMetricFamily(
            f"{PREFIX}_ingest_write_lag_seconds",
            "How long this process's last written batch waited.",
            labels=["instance"],
        )
        if lag is not None:
            write_lag.add_metric([instance], lag)
        yield write_lag
        webhook = CounterMetricFamily(
            f"{PREFIX}_alert_webhook", "Alert webhook deliveries by outcome.", labels=["instance", "outcome"]
        )
        hooks = self.stats.webhook_counts()
        for outcome in ("sent", "failed", "dropped", "retried"):
            webhook.add_metric([instance, outcome], hooks.get(outcome, 0))
        yield webhook


def registry_for(ctx: FleetContext, stats: ProcessStats | None = None) -> CollectorRegistry:
    """A registry holding only the fleet's collector (not the global one: several apps per process in tests)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(ctx, stats))
    return registry


__all__ = ["DROP_REASONS", "PREFIX", "FleetCollector", "ProcessStats", "registry_for"]
