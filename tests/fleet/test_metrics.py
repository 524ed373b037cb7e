"""Prometheus /metrics: scraped with a real HTTP client from a real uvicorn, parsed with prometheus_client's parser;
numbers read from the database at scrape time (so two fleet processes report the same), a read token required."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from edgeship.fleet.api import create_app
from edgeship.fleet.context import FleetContext
from edgeship.fleet.metrics import ProcessStats
from edgeship.fleet.models import Alert, Device, Event, Rollout, RolloutDevice, Telemetry
from tests.fleet.fleet_fixtures import ApiServer, FleetUnderTest, package_row


def _scrape(url: str, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _seed(ctx: FleetContext, now: float) -> None:
    with ctx.db.session() as session:
        session.add_all(
            [Device(id=f"d{i}", target="t", enrolled_at=0.0, online=i < 3, last_seen=now) for i in range(5)]
        )
        session.flush()
        session.add(package_row(id=1))
        session.flush()
        session.add(
            Rollout(
                id=7,
                name="r",
                package_id=1,
                created_at=0.0,
                created_by="t",
                updated_at=0.0,
                state="running",
                current_wave=1,
                waves=["40%", "100%"],
                gate_values={"0": {"install_failure_rate": 0.0, "latency_p99_ratio": 1.25, "drift_psi": None}},
            )
        )
        session.add(
            Rollout(id=8, name="old", package_id=1, created_at=0.0, created_by="t", updated_at=0.0, state="completed")
        )
        session.flush()
        states = ["COMMITTED", "COMMITTED", "commanded", "pending", "pending"]
        for i, state in enumerate(states):
            session.add(RolloutDevice(rollout_id=7, device_id=f"d{i}", wave=0 if i < 2 else 1, state=state))
        session.add(RolloutDevice(rollout_id=8, device_id="d0", wave=0, state="COMMITTED"))
        for i, lag in enumerate((0.5, 1.5)):
            session.add(Event(device_id="d0", seq=i, ts=now - 10 - lag, received_at=now - 10, event="ota.transition"))
        session.add(Event(device_id="d0", seq=9, ts=now - 4000, received_at=now - 3600, event="old"))
        session.add(Telemetry(device_id="d1", seq=1, ts=now, requests=1, errors=0))
        session.add(Alert(kind="drift", subject="device/d1", severity="warning", message="m", opened_at=now))
        session.add(Alert(kind="drift", subject="device/d2", severity="warning", message="m", opened_at=now))
        session.add(
            Alert(
                kind="device_offline", subject="device/d3", severity="warning", message="m", opened_at=1, resolved_at=2
            )
        )


def test_metrics_scrape(any_fleet: FleetUnderTest):
    fleet = any_fleet
    import time

    now = time.time()  # the ingest lag window is relative to the scrape's wall clock
    _seed(fleet.ctx, now)
    counts = {"telemetry": 40, "events": 2, "duplicates": 1, "malformed": 3, "unknown_device": 2}
    stats = ProcessStats(
        instance="p1",
        ingest_counts=lambda: dict(counts),
        ingest_lag=lambda: 0.25,
        webhook_counts=lambda: {"sent": 4, "failed": 1},
    )
    # Two API processes over one database: the fleet-wide numbers agree; the process's own are labelled.
    servers = [_server(fleet.ctx, stats), _server(fleet.ctx, ProcessStats(instance="p2"))]
    try:
        a, b = (_scrape(s.url, fleet.read_token) for s in servers)
        fleetwide = {k: v for k, v in a.items() if not dict(k[1]).get("instance")}
        assert fleetwide == {k: v for k, v in b.items() if not dict(k[1]).get("instance")}

        assert a[("edgeship_fleet_devices", (("state", "online"),))] == 3
        assert a[("edgeship_fleet_devices", (("state", "offline"),))] == 2
        wave = lambda w, s: ("edgeship_fleet_rollout_devices", (("rollout", "7"), ("state", s), ("wave", w)))  # noqa: E731
        assert a[wave("1", "COMMITTED")] == 2
        assert a[wave("2", "commanded")] == 1 and a[wave("2", "pending")] == 2
        assert not any(dict(k[1]).get("rollout") == "8" for k in a)  # ended rollouts are not exported
        assert a[("edgeship_fleet_rollout_state", (("rollout", "7"), ("state", "running")))] == 1
        assert a[("edgeship_fleet_rollout_current_wave", (("rollout", "7"),))] == 2
        gate = ("edgeship_fleet_rollout_gate_value", (("gate", "latency_p99_ratio"), ("rollout", "7"), ("wave", "1")))
        assert a[gate] == 1.25
        assert ("edgeship_fleet_rollout_gate_value", (("gate", "drift_psi"), ("rollout", "7"), ("wave", "1"))) not in a
        assert a[("edgeship_fleet_ingest_lag_seconds", (("stat", "mean"),))] == pytest.approx(1.0)
        assert a[("edgeship_fleet_ingest_lag_seconds", (("stat", "max"),))] == pytest.approx(1.5)
        assert a[("edgeship_fleet_telemetry_rows", ())] == 1
        assert a[("edgeship_fleet_alerts_open", (("kind", "drift"),))] == 2
        assert a[("edgeship_fleet_alerts_open", (("kind", "device_offline"),))] == 0
        assert a[("edgeship_fleet_alerts_open", (("kind", "rollout_halted"),))] == 0

        msgs = lambda i, o: ("edgeship_fleet_ingest_messages_total", (("instance", i), ("outcome", o)))  # noqa: E731
        assert a[msgs("p1", "telemetry")] == 40 and a[msgs("p1", "malformed")] == 3
        dropped = lambda r: ("edgeship_fleet_ingest_dropped_total", (("instance", "p1"), ("reason", r)))  # noqa: E731
        assert a[dropped("malformed")] == 3 and a[dropped("spoofed")] == 0 and a[dropped("unknown_device")] == 2
        assert a[("edgeship_fleet_ingest_write_lag_seconds", (("instance", "p1"),))] == 0.25
        assert a[("edgeship_fleet_alert_webhook_total", (("instance", "p1"), ("outcome", "failed")))] == 1
        assert ("edgeship_fleet_ingest_write_lag_seconds", (("instance", "p2"),)) not in b

        # Read at scrape time: a change in the database shows at the next scrape, counters move.
        with fleet.ctx.db.session() as session:
            session.execute(update(Device).values(online=True))
        counts["telemetry"] += 10
        again = _scrape(servers[0].url, fleet.read_token)
        assert again[("edgeship_fleet_devices", (("state", "offline"),))] == 0
        assert again[msgs("p1", "telemetry")] == 50
    finally:
        for s in servers:
            s.stop()


def _server(ctx: FleetContext, stats: ProcessStats) -> ApiServer:
    """ApiServer serving ``create_app(ctx, stats=stats)`` (the service passes its ProcessStats the same way)."""
    server = ApiServer(ctx)
    server.server.config.app = create_app(ctx, stats=stats)
    return server.start()


def test_metrics_needs_a_token(fleet: FleetUnderTest, tmp_path: Path):
    server = ApiServer(fleet.ctx).start()
    try:
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        bad = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["kind"] == "auth"
        # An empty fleet scrapes fine (zeros, no ingest lag sample).
        samples = _scrape(server.url, fleet.read_token)
        assert samples[("edgeship_fleet_devices", (("state", "online"),))] == 0
        assert not any(name == "edgeship_fleet_ingest_lag_seconds" for name, _ in samples)
    finally:
        server.stop()
