"""Alerts: the table and its listing; opened and resolved by `evaluate` for offline devices, drift and halted
rollouts (SQLite and PostgreSQL); once with several processes; delivered to a real webhook server with retries;
listed by the API."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from edgeship.fleet import auth
from edgeship.fleet.alerts import Change, Notifier, evaluate, list_alerts
from edgeship.fleet.db import Database, migrate
from edgeship.fleet.models import Alert, Device, Rollout, Telemetry
from edgeship.fleet.settings import AlertSettings
from tests.brokers import SecureBroker
from tests.fleet.fleet_fixtures import ApiServer, FleetUnderTest, fleet_settings, open_fleet, package_row
from tests.fleet.webhook_server import WebhookServer
from tests.package_fixtures import Publisher

SETTINGS = AlertSettings(offline_after=300.0, drift_psi=0.25, drift_window=600.0)
NOW = 1_000_000.0


def _alert(kind: str, subject: str, opened_at: float, resolved_at: float | None = None) -> Alert:
    return Alert(
        kind=kind,
        subject=subject,
        severity="warning",
        message=f"{subject}: {kind}",
        details={"k": 1},
        opened_at=opened_at,
        resolved_at=resolved_at,
    )


def test_list_alerts_open_only_newest_first_and_paged(db_url: str):
    database = Database(db_url)
    try:
        migrate(database)
        with database.session() as session:
            session.add(_alert("device_offline", "device/d1", 1.0, resolved_at=2.0))
            session.add(_alert("device_offline", "device/d1", 3.0))
            session.add(_alert("drift", "device/d2", 4.0))
            session.add(_alert("rollout_halted", "rollout/1", 5.0))
        with database.session(readonly=True) as session:
            opened = list_alerts(session)
            assert [(a.kind, a.subject) for a in opened] == [
                ("rollout_halted", "rollout/1"),
                ("drift", "device/d2"),
                ("device_offline", "device/d1"),
            ]
            assert len(list_alerts(session, open_only=False)) == 4
            first = list_alerts(session, open_only=False, limit=2)
            rest = list_alerts(session, open_only=False, limit=2, before_id=first[-1].id)
            assert [a.opened_at for a in first + rest] == [5.0, 4.0, 3.0, 1.0]
            assert rest[-1].details == {"k": 1} and rest[-1].resolved_at == 2.0
        # A second open alert for the same (kind, subject) is refused by the database itself.
        with pytest.raises(IntegrityError), database.session() as session:
            session.add(_alert("drift", "device/d2", 6.0))
        # A resolved one beside an open one is fine.
        with database.session() as session:
            session.add(_alert("drift", "device/d2", 0.5, resolved_at=0.7))
    finally:
        database.dispose()


def _seed(database: Database) -> None:
    with database.session() as session:
        session.add_all(
            [
                Device(id="up", target="t", enrolled_at=0.0, online=True, last_seen=NOW - 10),
                Device(id="said-offline", target="t", enrolled_at=0.0, online=False, last_seen=NOW - 10),
                Device(id="silent", target="t", enrolled_at=0.0, online=True, last_seen=NOW - 301),
                Device(id="never-seen", target="t", enrolled_at=0.0),
            ]
        )
        session.flush()
        session.add(package_row(id=1))
        session.flush()
        for rid, state in ((1, "running"), (2, "halted")):
            session.add(
                Rollout(
                    id=rid,
                    name=f"r{rid}",
                    package_id=1,
                    created_at=0.0,
                    created_by="t",
                    updated_at=0.0,
                    state=state,
                    current_wave=1,
                    halt_reason="install_failure_rate 0.5 > 0.1" if state == "halted" else None,
                )
            )
        # Drift: "up" went over 0.25 within the window; "silent" was over it, but before the window.
        for i, (device, ts, psi) in enumerate(
            [
                ("up", NOW - 100, 0.1),
                ("up", NOW - 50, 0.4),
                ("silent", NOW - 700, 0.9),
                ("said-offline", NOW - 20, None),
            ]
        ):
            session.add(Telemetry(device_id=device, seq=i, ts=ts, requests=1, errors=0, drift_psi=psi))


def _open(database: Database) -> set[tuple[str, str]]:
    with database.session(readonly=True) as session:
        return {(a.kind, a.subject) for a in list_alerts(session)}


def test_evaluate_opens_and_resolves_each_kind(db_url: str):
    database = Database(db_url)
    try:
        migrate(database)
        _seed(database)
        changes = evaluate(database.session, SETTINGS, NOW)
        expected = {
            ("device_offline", "device/said-offline"),
            ("device_offline", "device/silent"),
            ("drift", "device/up"),
            ("rollout_halted", "rollout/2"),
        }
        assert {(c.alert["kind"], c.alert["subject"]) for c in changes} == expected
        assert {c.event for c in changes} == {"opened"}
        assert _open(database) == expected
        by_subject = {(c.alert["kind"], c.alert["subject"]): c.alert for c in changes}
        halted = by_subject[("rollout_halted", "rollout/2")]
        assert halted["severity"] == "critical" and "install_failure_rate" in halted["message"]
        assert "\n" not in halted["message"] and halted["details"]["halt_reason"].startswith("install_failure_rate")
        assert by_subject[("drift", "device/up")]["details"]["psi"] == pytest.approx(0.4)

        # Nothing changed: nothing happens.
        assert evaluate(database.session, SETTINGS, NOW + 1) == []

        # The conditions clear: devices back, drift back under, the rollout resumed.
        later = NOW + 60
        with database.session() as session:
            session.execute(update(Device).values(online=True, last_seen=later))
            session.add(Telemetry(device_id="up", seq=10, ts=NOW + 200, requests=1, errors=0, drift_psi=0.05))
            session.execute(update(Rollout).where(Rollout.id == 2).values(state="running"))
        # The drift alert stays while the window still holds the 0.4.
        changes = evaluate(database.session, SETTINGS, later)
        assert {(c.event, c.alert["subject"]) for c in changes} == {
            ("resolved", "device/said-offline"),
            ("resolved", "device/silent"),
            ("resolved", "rollout/2"),
        }
        assert _open(database) == {("drift", "device/up")}
        # Past the window only the 0.05 counts: resolved.
        with database.session() as session:
            session.execute(update(Device).values(last_seen=NOW + 700))
        changes = evaluate(database.session, SETTINGS, NOW + 700)
        assert [(c.event, c.alert["kind"]) for c in changes] == [("resolved", "drift")]
        assert changes[0].alert["resolved_at"] == NOW + 700
        assert _open(database) == set()

        # It happens again: a new alert (the old one stays resolved in the history).
        with database.session() as session:
            session.execute(update(Rollout).where(Rollout.id == 2).values(state="halted"))
        assert [c.event for c in evaluate(database.session, SETTINGS, NOW + 800)] == ["opened"]
        with database.session(readonly=True) as session:
            history = [(a.subject, a.resolved_at is None) for a in list_alerts(session, open_only=False)]
        assert history[0] == ("rollout/2", True) and ("rollout/2", False) in history
    finally:
        database.dispose()


def test_several_processes_make_each_change_once(db_url: str):
    databases = [Database(db_url) for _ in range(4)]
    try:
        migrate(databases[0])
        _seed(databases[0])
        results: list[list[Change]] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def run(database: Database) -> None:
            try:
                barrier.wait()
                results.append(evaluate(database.session, SETTINGS, NOW))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(d,)) for d in databases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert sorted(len(r) for r in results) == [0, 0, 0, 4]
        with databases[0].session(readonly=True) as session:
            assert len(list_alerts(session, open_only=False)) == 4
    finally:
        for d in databases:
            d.dispose()


def _change(subject: str, event: str = "opened") -> Change:
    return Change(event, {"id": 1, "kind": "drift", "subject": subject, "message": "m", "resolved_at": None})


def test_notifier_posts_json_and_retries_with_backoff():
    # The first two tries get 503 and 500; the third is accepted.
    with WebhookServer([503, 500]) as server:
        notifier = Notifier(server.url, fleet_id="f1", retries=3, backoff_s=0.05)
        try:
            notifier.send([_change("device/a")])
            (body,) = server.wait_for(1)
            assert body["event"] == "opened" and body["fleet_id"] == "f1"
            assert body["alert"]["subject"] == "device/a"
            assert [s for s, _ in server.received] == [503, 500, 200]
            assert server.headers[0]["Content-Type"] == "application/json"
        finally:
            notifier.stop()
        assert notifier.snapshot() == {"sent": 1, "retried": 2}


def test_a_failing_webhook_is_counted_and_later_deliveries_still_go():
    with WebhookServer([500, 500, 500]) as server:
        notifier = Notifier(server.url, fleet_id="f1", retries=2, backoff_s=0.01)
        try:
            notifier.send([_change("device/lost"), _change("device/kept", "resolved")])
            (body,) = server.wait_for(1)
            assert body["alert"]["subject"] == "device/kept" and body["event"] == "resolved"
        finally:
            notifier.stop()
        counts = notifier.snapshot()
        assert counts["failed"] == 1 and counts["sent"] == 1


def test_unreachable_webhook_never_blocks_the_caller():
    with WebhookServer() as server:
        url = server.url
    # The server is gone: connections are refused. send() returns at once even for more than the queue holds.
    notifier = Notifier(url, fleet_id="f1", retries=1, backoff_s=1.0, capacity=3)
    try:
        notifier.send([_change(f"device/{i}") for i in range(10)])
        # At most one in delivery (waiting 1 s before its retry) and three queued: six or more dropped.
        assert notifier.snapshot().get("dropped", 0) >= 6
    finally:
        notifier.stop()
    counts = notifier.snapshot()
    # Every change is accounted for: none was sent; failed (the one being tried) or dropped (full, or stopped).
    assert counts.get("sent", 0) == 0 and counts.get("failed", 0) + counts["dropped"] == 10


def test_service_alerts_reach_the_webhook_and_the_api(tmp_path: Path, publisher: Publisher, sqlite_url: str):
    from edgeship.fleet.service import FleetService

    with WebhookServer() as server:
        settings = fleet_settings(
            tmp_path, publisher, sqlite_url, alerts={"webhook_url": server.url, "offline_after": "1m"}
        )
        service = FleetService(settings, instance="test")  # not started: no broker needed for alerts
        try:
            migrate(service.ctx.db)
            _row, token = auth.create_token(service.ctx, "viewer", "read", actor="test")
            now = service.ctx.now()
            with service.ctx.db.session() as session:
                session.add(Device(id="gone", target="t", enrolled_at=0.0, online=True, last_seen=now - 3600))
            changes = service.check_alerts()
            assert [c.alert["subject"] for c in changes] == ["device/gone"]
            (body,) = server.wait_for(1)
            assert body["event"] == "opened" and body["alert"]["kind"] == "device_offline"
            assert body["alert"]["message"].startswith("device gone is offline")

            with service.ctx.db.session() as session:
                session.execute(update(Device).values(last_seen=now + 1))
            service.check_alerts()
            assert server.wait_for(2)[1]["event"] == "resolved"

            api = ApiServer(service.ctx).start()
            try:
                headers = {"Authorization": f"Bearer {token}"}
                assert httpx.get(f"{api.url}/api/v1/alerts", headers=headers).json() == {"items": []}
                every = httpx.get(f"{api.url}/api/v1/alerts", params={"open": "false"}, headers=headers).json()
                (item,) = every["items"]
                assert item["subject"] == "device/gone" and item["open"] is False
                page = httpx.get(
                    f"{api.url}/api/v1/alerts", params={"open": "false", "before_id": item["id"]}, headers=headers
                )
                assert page.json() == {"items": []}
                assert httpx.get(f"{api.url}/api/v1/alerts").status_code == 401
                assert httpx.get(f"{api.url}/api/v1/alerts", params={"limit": 0}, headers=headers).status_code == 422
            finally:
                api.stop()
        finally:
            service.stop()


def test_alerts_api_lists_open_alerts(fleet: FleetUnderTest):
    with fleet.ctx.db.session() as session:
        session.add(_alert("drift", "device/x", 1.0))
        session.add(_alert("drift", "device/y", 2.0, resolved_at=3.0))
    server = ApiServer(fleet.ctx).start()
    try:
        response = httpx.get(f"{server.url}/api/v1/alerts", headers={"Authorization": f"Bearer {fleet.read_token}"})
        assert response.status_code == 200
        items: list[dict[str, Any]] = response.json()["items"]
        assert [(i["subject"], i["open"], i["details"]) for i in items] == [("device/x", True, {"k": 1})]
        with fleet.ctx.db.session(readonly=True) as session:
            assert session.scalar(select(Alert.id).where(Alert.subject == "device/x")) == items[0]["id"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"alerts": {"webhook_url": "ftp://x/y"}}, "alerts.webhook_url: use http://host/path or https://host/path"),
        ({"alerts": {"drift_psi": 0}}, "alerts.drift_psi: must be a positive PSI such as 0.25, got 0"),
        ({"alerts": {"offline_after": "5 min"}}, "alerts.offline_after: '5 min' is not a duration"),
        ({"alerts": {"webhook_retries": -1}}, "alerts.webhook_retries: must be 0 or more"),
        ({"alerts": {"drift": 0.3}}, "alerts.drift: unknown setting; did you mean alerts.drift_psi?"),
        ({"retention": {"raw": 0}}, "retention.raw: must be a positive duration such as 7d"),
        ({"retention": {"raw": "30d", "minute": "7d"}}, "retention.minute (604800 s) must be at least retention.raw"),
        ({"retention": {"batch": 0}}, "retention.batch: must be between 1 and 100000 rows, got 0"),
    ],
)
def test_alert_and_retention_settings_are_checked(
    tmp_path: Path, publisher: Publisher, section: dict[str, Any], message: str
):
    from edgeship.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        fleet_settings(tmp_path, publisher, "sqlite:///x.db", **section)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_alert_and_retention_settings_parse_durations(tmp_path: Path, publisher: Publisher):
    settings = fleet_settings(
        tmp_path,
        publisher,
        "sqlite:///x.db",
        alerts={"offline_after": "2m", "webhook_url": "https://hooks.example.com/x", "drift_psi": 0.3},
        retention={"raw": "3d", "minute": "2w", "hour": "52w", "interval": "10m"},
    )
    assert (settings.alerts.offline_after, settings.alerts.drift_psi) == (120.0, 0.3)
    r = settings.retention
    assert (r.raw, r.minute, r.hour, r.interval, r.batch) == (3 * 86400, 14 * 86400, 364 * 86400, 600, 5000)


def test_through_the_broker_status_and_drift_open_and_resolve_alerts(
    tmp_path: Path, publisher: Publisher, secure_broker: SecureBroker
) -> None:
    # The whole path: a device's MQTT messages -> the service's ingest -> its alert thread -> the webhook, and
    # /metrics of that process (its ingest counters with its instance name, open alerts).
    import time

    from edgeship.device_agent import protocol
    from edgeship.fleet.api import create_app
    from edgeship.fleet.service import FleetService
    from tests.fleet.test_ingest import FLEET, status, telemetry

    broker = secure_broker.broker
    with WebhookServer() as hook:
        settings = fleet_settings(
            tmp_path,
            publisher,
            f"sqlite:///{tmp_path / 'fleet.db'}",
            broker={"url": f"mqtt://127.0.0.1:{broker.port}", "password": secure_broker.passwords["fleet-f1"]},
            scheduler={"tick_s": 60, "lease_s": 120},
            alerts={"interval_s": 0.2, "webhook_url": hook.url, "drift_psi": 0.5, "drift_window": "100w"},
        )
        ctx = open_fleet(settings)
        with ctx.db.session() as session:
            session.add(Device(id="dev-1", target="linux-x86_64", enrolled_at=0.0))
        _row, token = auth.create_token(ctx, "prom", "read", actor="t")
        ctx.close()
        service = FleetService(settings, instance="alerts-test")
        service.start()
        try:
            base = f"edgeship/v1/{FLEET}/dev-1"
            with secure_broker.probe("dev-1", tls=False) as device:
                device.connect()
                deadline = time.monotonic() + 20
                while True:  # until the fleet's ingest has subscribed and stored it
                    device.publish(f"{base}/status", protocol.encode(status("dev-1")))
                    with service.ctx.db.session(readonly=True) as session:
                        row = session.get(Device, "dev-1")
                        if row is not None and row.online:
                            break
                    assert time.monotonic() < deadline, "the fleet's ingest never stored a status"
                    time.sleep(0.2)
                device.publish(f"{base}/status", protocol.encode(status("dev-1", "offline")))
                opened = hook.wait_for(1)[0]
                assert (opened["event"], opened["alert"]["kind"]) == ("opened", "device_offline")
                assert opened["alert"]["details"]["status_offline"] is True

                drifting = telemetry("dev-1", 5, drift={"inputs": {"x": {"psi": 0.8}}, "outputs": {}})
                device.publish(f"{base}/telemetry", protocol.encode(drifting))
                bodies = hook.wait_for(3)  # the telemetry brought it back online and showed drift
                assert {(b["event"], b["alert"]["kind"]) for b in bodies[1:]} == {
                    ("resolved", "device_offline"),
                    ("opened", "drift"),
                }

            deadline = time.monotonic() + 20
            while (service.notifier.snapshot() if service.notifier else {}).get("sent", 0) < 3:
                assert time.monotonic() < deadline, "the notifier never counted its third delivery"
                time.sleep(0.05)
            api = ApiServer(service.ctx)
            api.server.config.app = create_app(service.ctx, stats=service.stats)
            api.start()
            try:
                from prometheus_client.parser import text_string_to_metric_families

                text = httpx.get(f"{api.url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                }
                assert samples[("edgeship_fleet_alerts_open", (("kind", "drift"),))] == 1
                assert samples[("edgeship_fleet_alerts_open", (("kind", "device_offline"),))] == 0
                key = ("edgeship_fleet_ingest_messages_total", (("instance", "alerts-test"), ("outcome", "telemetry")))
                assert samples[key] == 1
                webhook = ("edgeship_fleet_alert_webhook_total", (("instance", "alerts-test"), ("outcome", "sent")))
                assert samples[webhook] == 3
            finally:
                api.stop()
        finally:
            service.stop()
