"""Ingest (fleet/ingest.py): device messages into the database, on a real migrated SQLite database and, once,
through a real mosquitto with the fleet service's own MQTT clients.

A malformed, spoofed or unknown device's message is counted by reason and dropped, never a crash, and the
messages after it are stored; a redelivered message is stored once; gaps in a device's sequence numbers are
counted from the stored rows; OTA outcomes finish the device's row of its rollout, and only its own; a batch
the database refused is retried until it is stored, and counted once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from edgeship.device_agent import protocol
from edgeship.fleet.db import Database, migrate
from edgeship.fleet.ingest import Counters, Incoming, Ingest, Writer, count_gaps
from edgeship.fleet.models import Device, Event, Rollout, RolloutDevice, Telemetry
from tests.brokers import SecureBroker
from tests.fleet.fleet_fixtures import fleet_settings, open_fleet, package_row
from tests.package_fixtures import Publisher

FLEET = "f1"
DEVICES = ("d1", "d2", "d3", "d4", "d5")


def telemetry(device: str, seq: int, **changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "schema": protocol.SCHEMA,
        "type": "telemetry",
        "fleet": FLEET,
        "device": device,
        "ts": 1_800_000_000.0 + seq,
        "seq": seq,
        "interval_s": 1.0,
        "model": None,
        "requests": 10,
        "errors": 0,
        "latency": {"count": 10, "p50_ms": 1.0, "p99_ms": 2.0},
        "system": {"cpu_percent": 5.0, "rss_mib": 80.0},
        "queue": {"depth": 0, "dropped": 0},
        "ota": {"state": "IDLE", "deployment_id": None},
        **changes,
    }
    protocol.check(message)
    return message


def event(device: str, seq: int, name: str = "ota.transition", **fields: Any) -> dict[str, Any]:
    message = protocol.event(FLEET, device, seq, 1_800_000_000.0 + seq, name, **fields)
    protocol.check(message)
    return message


def status(device: str, state: str = "online") -> dict[str, Any]:
    message = protocol.status(FLEET, device, state, 1_800_000_000.0)
    protocol.check(message)
    return message


def incoming(device: str, channel: str, payload: dict[str, Any] | bytes) -> Incoming:
    body = payload if isinstance(payload, bytes) else protocol.encode(payload)
    return Incoming(f"edgeship/v1/{FLEET}/{device}/{channel}", body, time.time())


class Store:
    """A migrated SQLite database with devices d1-d5, package 1 and rollout 1, and a Writer on it."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "fleet.db"
        self.db = Database(f"sqlite:///{self.path}")
        migrate(self.db)
        self.counters = Counters()
        self.writer = Writer(self.db.engine, self.db.session, FLEET, self.counters)
        with self.db.session() as session:
            session.add_all(Device(id=d, target="linux-x86_64", enrolled_at=0.0) for d in DEVICES)
            session.flush()
            session.add(package_row(id=1, target="linux-x86_64"))
            session.flush()
            session.add(
                Rollout(id=1, name="r", package_id=1, created_at=0.0, created_by="t", updated_at=0.0, waves=["100%"])
            )

    def write(self, *items: Incoming) -> None:
        self.writer.write(list(items))

    def counts(self) -> dict[str, int]:
        return self.counters.snapshot()

    def rows(self, model: type[Any], device: str | None = None) -> list[Any]:
        with self.db.session(readonly=True) as session:
            query = select(model)
            if device is not None:
                query = query.where(model.device_id == device)
            return list(session.scalars(query))

    def device(self, device: str) -> Device:
        with self.db.session(readonly=True) as session:
            row = session.get(Device, device)
            assert row is not None
            return row

    def add_rollout_device(self, device: str, state: str, **values: Any) -> None:
        with self.db.session() as session:
            session.add(RolloutDevice(rollout_id=1, device_id=device, wave=0, state=state, **values))

    def rollout_device(self, device: str) -> RolloutDevice:
        with self.db.session(readonly=True) as session:
            row = session.get(RolloutDevice, (1, device))
            assert row is not None
            return row


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    try:
        yield s
    finally:
        s.db.dispose()


# ----------------------------------------------------------------------------- bad input


def _bad_payloads(device: str, channel: str) -> list[bytes]:
    good = {"telemetry": telemetry(device, 0), "events": event(device, 0), "status": status(device)}[channel]
    return [
        b"{not json",
        b"\xff\xfe\x00",  # not UTF-8
        b"[1, 2]",  # JSON, not an object
        b'{"schema": 1, "value": NaN}',
        json.dumps({**good, "schema": 2}).encode(),  # another protocol version
        json.dumps({**good, "type": "bogus"}).encode(),  # an unknown type
        json.dumps({**good, "type": "deploy"}).encode(),  # a command on a device topic
        json.dumps({k: v for k, v in good.items() if k != "ts"}).encode(),  # a required field missing
        json.dumps({**good, "ts": "yesterday"}).encode(),  # a field of the wrong type
        b"x" * (protocol.MAX_PAYLOAD + 1),
    ]


@pytest.mark.parametrize("channel", ["telemetry", "events", "status"])
def test_malformed_messages_are_counted_and_dropped_and_later_messages_are_stored(store: Store, channel: str) -> None:
    bad = [incoming("d1", channel, p) for p in _bad_payloads("d1", channel)]
    if channel == "events":
        bad.append(incoming("d1", channel, json.dumps({**event("d1", 0), "event": "no.such.event"}).encode()))
    if channel != "status":
        bad.append(incoming("d1", channel, b""))  # only a status may be empty (a cleared retained one)
    # Bad messages alone, then mixed with good ones in one batch, then good ones after: never fatal.
    store.write(*bad)
    store.write(incoming("d1", "telemetry", telemetry("d1", 1)), *bad, incoming("d1", "events", event("d1", 2)))
    store.write(incoming("d1", "status", status("d1")), incoming("d1", "telemetry", telemetry("d1", 3)))
    assert store.counts()["malformed"] == 2 * len(bad)
    assert sorted(t.seq for t in store.rows(Telemetry)) == [1, 3]
    assert [e.seq for e in store.rows(Event)] == [2]
    assert store.device("d1").online and store.device("d1").last_seq == 3


def test_an_empty_retained_status_is_not_counted(store: Store) -> None:
    store.write(incoming("d1", "status", b""))
    assert store.counts() == {}


def test_a_message_naming_another_device_or_fleet_than_its_topic_is_counted_spoofed(store: Store) -> None:
    store.write(
        incoming("d1", "telemetry", telemetry("d2", 0)),  # d1's topic, d2's name
        incoming("d1", "events", {**event("d1", 1), "fleet": "f2"}),  # another fleet
        incoming("d1", "status", status("d2", "offline")),  # d2 "going offline" from d1's topic
        incoming("d1", "telemetry", event("d1", 2)),  # an event on the telemetry topic
        incoming("d2", "telemetry", telemetry("d2", 0)),
    )
    assert store.counts() == {"spoofed": 4, "telemetry": 1}
    assert [(t.device_id, t.seq) for t in store.rows(Telemetry)] == [("d2", 0)]
    assert store.rows(Event) == []
    assert store.device("d2").online  # the spoofed offline status changed nothing


def test_messages_from_a_device_that_never_enrolled_are_counted_unknown_device(store: Store) -> None:
    store.write(
        incoming("ghost", "telemetry", telemetry("ghost", 0)),
        incoming("ghost", "events", event("ghost", 1)),
        incoming("ghost", "status", status("ghost")),
        incoming("d1", "telemetry", telemetry("d1", 0)),
    )
    assert store.counts() == {"unknown_device": 3, "telemetry": 1}
    assert [t.device_id for t in store.rows(Telemetry)] == ["d1"]
    with store.db.session(readonly=True) as session:
        assert session.get(Device, "ghost") is None


def test_messages_on_topics_that_are_not_a_devices_are_counted_wrong_topic(store: Store) -> None:
    store.write(
        Incoming(f"edgeship/v1/{FLEET}/d1/cmd", protocol.encode(telemetry("d1", 0)), 0.0),
        Incoming("edgeship/v1/other/d1/telemetry", protocol.encode(telemetry("d1", 0)), 0.0),
        Incoming("something/else", b"{}", 0.0),
    )
    assert store.counts() == {"wrong_topic": 3}
    assert store.rows(Telemetry) == []


# ----------------------------------------------------------------------------- exactly once, gaps


def test_a_redelivered_message_is_stored_once(store: Store) -> None:
    t, e = incoming("d1", "telemetry", telemetry("d1", 5)), incoming("d1", "events", event("d1", 6))
    store.write(t, t, e, e)  # QoS 1 redelivery inside one batch
    store.write(t, e)  # and in a later one (a fleet process restarted, a session resumed)
    assert len(store.rows(Telemetry)) == 1 and len(store.rows(Event)) == 1
    assert store.counts() == {"telemetry": 1, "events": 1, "duplicates": 4}
    # The same seq in the other table is a different message only if the device reused it: still one row each.
    assert store.device("d1").last_seq == 6


def test_gaps_in_a_devices_sequence_are_counted_from_the_stored_rows(store: Store) -> None:
    # Out of order (a shared subscription hands one device's messages to several workers): 4 and 6 are missing.
    store.write(incoming("d1", "events", event("d1", 7)), incoming("d1", "telemetry", telemetry("d1", 5)))
    store.write(*(incoming("d1", "telemetry", telemetry("d1", s)) for s in (2, 0, 1)))
    store.write(incoming("d1", "events", event("d1", 3)), incoming("d2", "telemetry", telemetry("d2", 9)))
    with store.db.session(readonly=True) as session:
        assert count_gaps(session, "d1") == 2
        assert count_gaps(session, "d2") == 0  # one message: no gap
        assert count_gaps(session, "d3") == 0  # nothing stored yet
    store.write(incoming("d1", "telemetry", telemetry("d1", 4)), incoming("d1", "telemetry", telemetry("d1", 6)))
    with store.db.session(readonly=True) as session:
        assert count_gaps(session, "d1") == 0
    assert store.device("d1").last_seq == 7  # never moves back for a late message


# ----------------------------------------------------------------------------- OTA outcomes


def test_ota_transitions_finish_the_devices_rollout_row(store: Store) -> None:
    for device in ("d1", "d2", "d3"):
        store.add_rollout_device(device, "commanded", deployment_id=f"r1-{device}", commanded_at=1.0)
    for device in ("d4", "d5"):
        store.add_rollout_device(
            device, "reverting", deployment_id=f"r1-{device}", revert_deployment_id=f"r1-revert-{device}"
        )
    store.write(incoming("d1", "events", event("d1", 0, deployment_id="r1-d1", state="DOWNLOADING")))
    assert store.rollout_device("d1").state == "commanded"  # not an outcome yet
    assert (store.device("d1").ota_state, store.device("d1").ota_deployment) == ("DOWNLOADING", "r1-d1")
    store.write(
        incoming("d1", "events", event("d1", 1, deployment_id="r1-d1", state="COMMITTED")),
        incoming(
            "d2",
            "events",
            event("d2", 0, deployment_id="r1-d2", state="FAILED", code="golden_failed", message="outputs differ"),
        ),
        incoming("d3", "events", event("d3", 0, deployment_id="r1-d3", state="ROLLED_BACK", code="latency")),
        incoming("d4", "events", event("d4", 0, deployment_id="r1-revert-d4", state="COMMITTED")),
        incoming("d5", "events", event("d5", 0, deployment_id="r1-revert-d5", state="FAILED", code="download_failed")),
    )
    rows = {d: store.rollout_device(d) for d in DEVICES}
    assert {d: r.state for d, r in rows.items()} == {
        "d1": "COMMITTED",
        "d2": "FAILED",
        "d3": "ROLLED_BACK",
        "d4": "reverted",
        "d5": "revert_failed",
    }
    assert (rows["d2"].code, rows["d2"].message, rows["d2"].finished_at) == ("golden_failed", "outputs differ", 1.8e9)
    assert rows["d5"].code == "download_failed"
    assert store.device("d1").ota_state == "COMMITTED"
    # An outcome is final: a redelivered or late event does not change it.
    store.write(incoming("d2", "events", event("d2", 1, deployment_id="r1-d2", state="COMMITTED")))
    assert store.rollout_device("d2").state == "FAILED"


def test_a_device_cannot_finish_another_devices_deployment(store: Store) -> None:
    store.add_rollout_device("d1", "commanded", deployment_id="r1-d1")
    store.add_rollout_device("d2", "reverting", deployment_id="r1-d2", revert_deployment_id="r1-revert-d2")
    # d3's own topic and name (the ACL lets it write there), but d1's and d2's deployment ids.
    store.write(
        incoming("d3", "events", event("d3", 0, deployment_id="r1-d1", state="FAILED", code="golden_failed")),
        incoming("d3", "events", event("d3", 1, deployment_id="r1-revert-d2", state="COMMITTED")),
    )
    assert store.rollout_device("d1").state == "commanded"
    assert store.rollout_device("d2").state == "reverting"


def test_an_outcome_that_arrives_after_the_device_timed_out_is_recorded(store: Store) -> None:
    store.add_rollout_device("d1", "timed_out", deployment_id="r1-d1", code="timeout")
    store.add_rollout_device(
        "d2", "revert_failed", deployment_id="r1-d2", revert_deployment_id="r1-revert-d2", code="timeout"
    )
    store.write(
        incoming("d1", "events", event("d1", 0, deployment_id="r1-d1", state="COMMITTED")),
        incoming("d2", "events", event("d2", 0, deployment_id="r1-revert-d2", state="COMMITTED")),
    )
    assert (store.rollout_device("d1").state, store.rollout_device("d1").code) == ("COMMITTED", None)
    assert store.rollout_device("d2").state == "reverted"


# ----------------------------------------------------------------------------- the database away


def test_a_batch_the_database_refused_is_retried_stored_once_and_counted_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "fleet.db"
    migrate(f"sqlite:///{path}")
    # A writer that gives up on a locked database after 0.1 s instead of waiting 30 s.
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    with sessionmaker(engine)() as session:
        session.add(Device(id="d1", target="linux-x86_64", enrolled_at=0.0))
        session.commit()
    counters = Counters()
    ingest = Ingest(
        Writer(engine, sessionmaker(engine), FLEET, counters), lambda on_message, filters: None, fleet=FLEET
    )
    # Another process holds the write lock: the database is "away" for writes until it lets go.
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    caplog.set_level(logging.WARNING, logger="edgeship.fleet.ingest")
    ingest.start()
    try:
        for item in (
            incoming("d1", "telemetry", b"{not json"),
            incoming("d1", "telemetry", telemetry("d1", 0)),
            incoming("d1", "telemetry", telemetry("d1", 1)),
            incoming("d1", "events", event("d1", 2)),
        ):
            ingest.queue.put(item)
        deadline = time.monotonic() + 30
        while sum("database write failed" in r.getMessage() for r in caplog.records) < 2:
            assert time.monotonic() < deadline, "the writer did not fail on the locked database"
            time.sleep(0.05)
        lock.execute("ROLLBACK")
        while counters.snapshot().get("events", 0) < 1:
            assert time.monotonic() < deadline, "the batch was not written after the database came back"
            time.sleep(0.05)
    finally:
        lock.close()
        ingest.stop()
    with sessionmaker(engine)() as session:
        assert sorted(session.scalars(select(Telemetry.seq))) == [0, 1]
        assert list(session.scalars(select(Event.seq))) == [2]
    assert counters.snapshot() == {"malformed": 1, "telemetry": 2, "events": 1}
    engine.dispose()


# ----------------------------------------------------------------------------- through mosquitto


def test_bad_messages_through_the_broker_are_counted_and_the_service_keeps_ingesting(
    tmp_path: Path, publisher: Publisher, secure_broker: SecureBroker
) -> None:
    from edgeship.fleet.service import FleetService

    broker = secure_broker.broker
    settings = fleet_settings(
        tmp_path,
        publisher,
        f"sqlite:///{tmp_path / 'fleet.db'}",
        broker={"url": f"mqtt://127.0.0.1:{broker.port}", "password": secure_broker.passwords["fleet-f1"]},
        scheduler={"tick_s": 60, "lease_s": 120},
    )
    ctx = open_fleet(settings)
    with ctx.db.session() as session:
        session.add_all(Device(id=d, target="linux-x86_64", enrolled_at=0.0) for d in ("dev-1", "dev-2"))
    ctx.close()
    service = FleetService(settings, instance="ingest-test")
    service.start()
    try:
        base = f"edgeship/v1/{FLEET}/dev-1"
        with (
            secure_broker.probe("dev-1", tls=False) as device,
            secure_broker.probe("fleet-f1", tls=False) as fleet_account,
        ):
            device.connect()
            fleet_account.connect()

            def online() -> bool:
                device.publish(f"{base}/status", protocol.encode(status("dev-1")))
                with service.ctx.db.session(readonly=True) as session:
                    row = session.get(Device, "dev-1")
                    return row is not None and row.online

            deadline = time.monotonic() + 20
            while not online():  # the fleet's ingest has subscribed
                assert time.monotonic() < deadline, "the fleet's ingest never stored a status"
                time.sleep(0.2)
            for channel in ("telemetry", "events", "status"):
                assert not device.publish(f"{base}/{channel}", b'{"schema": 1, "type": "telemetry",').is_failure
            device.publish(f"{base}/telemetry", json.dumps({"schema": 1, "type": "no-such-type"}))
            device.publish(f"{base}/telemetry", protocol.encode(telemetry("dev-2", 0) | {"fleet": FLEET}))
            good = protocol.encode(telemetry("dev-1", 0))
            device.publish(f"{base}/telemetry", good)
            device.publish(f"{base}/telemetry", good)  # redelivered
            device.publish(f"{base}/events", protocol.encode(event("dev-1", 1, "agent.started")))
            # The fleet's own account may write anywhere: a device that never enrolled.
            fleet_account.publish(f"edgeship/v1/{FLEET}/ghost/telemetry", protocol.encode(telemetry("ghost", 0)))
        expected = {"malformed": 4, "spoofed": 1, "unknown_device": 1, "duplicates": 1, "telemetry": 1, "events": 1}
        deadline = time.monotonic() + 20
        while not all(service.counters.snapshot().get(k, 0) >= n for k, n in expected.items()):
            assert time.monotonic() < deadline, service.counters.snapshot()
            time.sleep(0.05)
        time.sleep(0.5)  # nothing more arrives
        assert service.counters.snapshot() == expected
        with service.ctx.db.session(readonly=True) as session:
            assert [(t.device_id, t.seq) for t in session.scalars(select(Telemetry))] == [("dev-1", 0)]
            assert [(e.device_id, e.seq) for e in session.scalars(select(Event))] == [("dev-1", 1)]
            dev1 = session.get(Device, "dev-1")
            assert dev1 is not None and dev1.online and dev1.last_seq == 1
    finally:
        service.stop()


def test_messages_received_but_not_yet_stored_come_back_after_a_crash(
    tmp_path: Path, publisher: Publisher, secure_broker: SecureBroker
) -> None:
    """The ingest acknowledges a QoS 1 message only after its batch is committed: a process that dies with
    messages in memory (here: the database stalled, so the writer holds them) never acknowledged them,
    and the broker hands them to the same session when it comes back. With acknowledgement on receipt
    (paho's default) these messages were gone."""
    from edgeship.fleet.service import FleetService

    broker = secure_broker.broker
    path = tmp_path / "fleet.db"
    settings = fleet_settings(
        tmp_path,
        publisher,
        f"sqlite:///{path}",
        broker={"url": f"mqtt://127.0.0.1:{broker.port}", "password": secure_broker.passwords["fleet-f1"]},
    )
    open_fleet(settings).close()
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    with sessionmaker(engine)() as session:
        session.add(Device(id="dev-1", target="linux-x86_64", enrolled_at=0.0))
        session.commit()
    service = FleetService(settings, instance="crash-test")  # for its MQTT client settings; not started

    def ingest() -> Ingest:
        writer = Writer(engine, sessionmaker(engine), FLEET, Counters())
        return Ingest(writer, service._ingest_client("f1-ingest-crash-test-0"), fleet=FLEET)

    base = f"edgeship/v1/{FLEET}/dev-1"
    first = ingest()
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the database stalls: nothing can be stored
    first.start()
    try:
        with secure_broker.probe("dev-1", tls=False) as device:
            device.connect()
            deadline = time.monotonic() + 20
            while not first.client.is_connected():
                assert time.monotonic() < deadline, "the ingest did not connect"
                time.sleep(0.05)
            time.sleep(0.5)  # its subscription is in place
            for seq in range(50):
                assert not device.publish(f"{base}/telemetry", protocol.encode(telemetry("dev-1", seq))).is_failure
            time.sleep(1.0)  # all 50 delivered to the ingest, held in memory behind the stalled database
        # The process dies: no DISCONNECT, no acknowledgement, its memory gone.
        first.client.loop_stop()
        first.client.socket().close()
        first._stop.set()
        first._thread.join(30)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    second = ingest()
    second.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            with sessionmaker(engine)() as session:
                stored = sorted(session.scalars(select(Telemetry.seq).where(Telemetry.device_id == "dev-1")))
            if len(stored) >= 50 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert stored == list(range(50))
    finally:
        second.stop()
        service.ctx.close()
        engine.dispose()
