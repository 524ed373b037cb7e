"""Telemetry, events and status in: MQTT shared subscription -> validation -> batched database writes.

Several fleet processes (or several workers in one) share the load through an MQTT 5 shared
subscription (``$share/<group>/edgeship/v1/<fleet>/+/<channel>``): the broker gives each message
to one of them. Every message is parsed with the protocol module; what fails is counted by
reason and dropped, never a crash:

* ``malformed``: not a protocol message (``protocol.parse`` says why);
* ``spoofed``: the payload names another fleet or device than its topic (the ACL stops a device
  from writing another device's topics; this catches a confused one, and anything that gets past);
* ``unknown_device``: a device that never enrolled.

Storage is at least once in, exactly once stored: a telemetry or event row is unique by
``(device, seq)`` and a redelivered message is ignored by the database (``ON CONFLICT DO
NOTHING``). Gaps in a device's sequence numbers (messages its queue dropped) are counted from
the stored rows by ``count_gaps``, not in the stream, because a shared subscription may hand one
device's messages to different workers out of order.

Back-pressure instead of loss: messages wait in a bounded in-memory queue for the writer; when
it is full, the MQTT network thread blocks, stops reading, and the broker queues for us
(``max_queued_messages 0``, docs/broker.md). Nothing is acknowledged to the broker before its batch
is committed (``Ingest._ack``), so a crash loses only work, never a message.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import Engine, Table, and_, bindparam, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgeship.device_agent import protocol
from edgeship.device_agent.topics import parse_topic, shared_filter
from edgeship.fleet.models import Device, Event, RolloutDevice, Telemetry

log = logging.getLogger("edgeship.fleet.ingest")

TERMINAL_OTA = ("COMMITTED", "FAILED", "ROLLED_BACK")


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    received_at: float
    mid: int = 0
    """The MQTT packet id, acknowledged once the message is stored (QoS > 0)."""
    qos: int = 0


class Counters:
    """What ingest did, by outcome (exported to Prometheus by the service)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def _insert_ignore(engine: Engine, model: type[Any]) -> Any:
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model).on_conflict_do_nothing(index_elements=["device_id", "seq"])
    return sqlite.insert(model).on_conflict_do_nothing(index_elements=["device_id", "seq"])


class Writer:
    """Turns a batch of messages into database rows in one transaction (the pure-ish core of ingest)."""

    def __init__(
        self,
        engine: Engine,
        session_factory: Callable[[], AbstractContextManager[Session]],
        fleet: str,
        counters: Counters,
    ) -> None:
        self.engine = engine
        self.session_factory = session_factory
        self.fleet = fleet
        self.counters = counters
        self._known: set[str] = set()

    def write(self, batch: Sequence[Incoming]) -> None:
        """Store one batch in one transaction; raises the database's error (nothing stored, nothing counted),
        so that the caller may retry the same batch."""
        # Counted once the batch is stored: a batch retried after a database error is counted once.
        counts: Counter[str] = Counter()
        telemetry: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        statuses: list[tuple[str, dict[str, Any]]] = []
        latest: dict[str, dict[str, Any]] = {}
        for item in batch:
            parsed = self._check(item, counts)
            if parsed is None:
                continue
            device, message = parsed
            kind = message["type"]
            if kind == "status":
                statuses.append((device, message))
            elif kind == "telemetry":
                telemetry.append(_telemetry_row(device, message))
                previous = latest.get(device)
                if previous is None or previous["seq"] < message["seq"]:
                    latest[device] = message
            else:
                events.append(_event_row(device, message, item.received_at))
        if not (telemetry or events or statuses):
            self._count(counts)
            return
        with self.session_factory() as session:
            self._ensure_known(session, {d for d, _ in statuses} | {r["device_id"] for r in telemetry + events})
            counts["telemetry"] += self._insert(
                session, Telemetry, [r for r in telemetry if r["device_id"] in self._known], counts
            )
            counts["events"] += self._insert(
                session, Event, [r for r in events if r["device_id"] in self._known], counts
            )
            devices = [r["device_id"] for r in telemetry + events] + [d for d, _ in statuses]
            counts["unknown_device"] += sum(1 for d in devices if d not in self._known)
            self._apply(session, latest, events, statuses, time.time())
            session.commit()
        self._count(counts)

    def _count(self, counts: Counter[str]) -> None:
        for key, n in counts.items():
            if n:
                self.counters.add(key, n)

    def _check(self, item: Incoming, counts: Counter[str]) -> tuple[str, dict[str, Any]] | None:
        parts = parse_topic(item.topic)
        if parts is None or parts.fleet != self.fleet or parts.channel == "cmd":
            counts["wrong_topic"] += 1
            return None
        if not item.payload and parts.channel == "status":
            return None  # a cleared retained status
        try:
            message = protocol.parse(item.payload, expected=protocol.DEVICE_TYPES)
        except protocol.ProtocolError as exc:
            counts["malformed"] += 1
            log.debug("dropped a malformed message from %s: %s", parts.device, exc)
            return None
        expected_type = {"telemetry": "telemetry", "events": "event", "status": "status"}[parts.channel]
        if message["type"] != expected_type or message["device"] != parts.device or message["fleet"] != parts.fleet:
            counts["spoofed"] += 1
            log.warning("dropped a message on %s that claims device %s", item.topic, message.get("device"))
            return None
        return parts.device, message

    def _ensure_known(self, session: Session, devices: set[str]) -> None:
        missing = devices - self._known
        if missing:
            found = session.scalars(select(Device.id).where(Device.id.in_(missing))).all()
            self._known.update(found)

    def _insert(self, session: Session, model: type[Any], rows: list[dict[str, Any]], counts: Counter[str]) -> int:
        if not rows:
            return 0
        # RETURNING tells which rows were new (SQLite >= 3.35, PostgreSQL): the rest were redeliveries.
        stored = len(session.execute(_insert_ignore(self.engine, model).returning(model.seq), rows).all())
        counts["duplicates"] += len(rows) - stored
        return int(stored)

    def _apply(
        self,
        session: Session,
        latest: dict[str, dict[str, Any]],
        events: list[dict[str, Any]],
        statuses: list[tuple[str, dict[str, Any]]],
        now: float,
    ) -> None:
        """Update the devices' live state and settle rollout rows, in a few statements per batch.

        One UPDATE per device per message made a batch of 500 cost 1,000+ round trips, and ingest fell a
        minute behind 1,000 simulated devices; now each kind of change is one executemany. Per device the
        changes are merged in the order they were applied one by one before (telemetry, then events in
        arrival order, then status messages), so the last writer of each column is the same.
        """
        known = self._known
        state: dict[str, dict[str, Any]] = {}
        top_seq: dict[str, int] = {}
        for device, m in latest.items():
            if device in known:
                state[device] = _telemetry_state(m, now)
                top_seq[device] = m["seq"]
        outcomes: list[dict[str, Any]] = []
        for row in events:
            device = row["device_id"]
            if device not in known:
                continue
            values = state.setdefault(device, {})
            values.update(last_seen=now, online=True)
            top_seq[device] = max(top_seq.get(device, -1), row["seq"])
            deployment = row["deployment_id"]
            if row["event"] == "ota.transition" and deployment:
                values.update(ota_state=row["state"], ota_deployment=deployment)
                if row["state"] in TERMINAL_OTA:
                    outcomes.append(
                        {
                            "b_device": device,
                            "b_deployment": deployment,
                            "b_state": row["state"],
                            "b_revert_state": "reverted" if row["state"] == "COMMITTED" else "revert_failed",
                            "b_finished_at": row["ts"],
                            "b_code": row["code"],
                            "b_message": row["message"],
                        }
                    )
        for device, m in statuses:
            if device in known:
                state.setdefault(device, {}).update(_status_state(m, now))
        devices = cast(Table, Device.__table__)
        touched = sorted(set(state) | set(top_seq))
        if touched and session.get_bind().dialect.name == "postgresql":
            # Lock the batch's device rows in one order (by id) before the updates below, which go by column
            # set and would lock them in arrival order: two ingest processes whose batches share devices then
            # deadlocked, PostgreSQL aborted one after its deadlock_timeout, and the batch was retried.
            session.execute(
                select(devices.c.id).where(devices.c.id.in_(touched)).order_by(devices.c.id).with_for_update()
            )
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for device, values in state.items():
            by_columns.setdefault(tuple(sorted(values)), []).append(
                {"b_id": device, **{f"b_{k}": v for k, v in values.items()}}
            )
        for columns, params in by_columns.items():
            session.execute(
                update(devices)
                .where(devices.c.id == bindparam("b_id"))
                .values({c: bindparam(f"b_{c}") for c in columns}),
                params,
            )
        if top_seq:
            # last_seq only moves forward: one device's messages may reach different workers out of order.
            session.execute(
                update(devices)
                .where(devices.c.id == bindparam("b_id"), devices.c.last_seq < bindparam("b_seq"))
                .values(last_seq=bindparam("b_seq")),
                [{"b_id": d, "b_seq": seq} for d, seq in top_seq.items()],
            )
        if outcomes:
            self._settle(session, outcomes)

    @staticmethod
    def _settle(session: Session, outcomes: list[dict[str, Any]]) -> None:
        """Terminal OTA transitions settle the rollout rows of the device's own deployment."""
        rd = cast(Table, RolloutDevice.__table__)
        outcome: dict[str, Any] = {
            "finished_at": bindparam("b_finished_at"),
            "code": bindparam("b_code"),
            "message": bindparam("b_message"),
        }
        # Only the device's own deployment: a payload can name any deployment id. An outcome that comes
        # after the fleet gave up on the device (timed out) is still what the device did.
        session.execute(
            update(rd)
            .where(
                rd.c.device_id == bindparam("b_device"),
                rd.c.deployment_id == bindparam("b_deployment"),
                or_(
                    rd.c.state == "commanded",  # no IN (...): expanding parameters cannot be used with executemany
                    rd.c.state == "pending",
                    and_(rd.c.state == "timed_out", rd.c.code == "timeout"),
                ),
            )
            .values(state=bindparam("b_state"), **outcome),
            outcomes,
        )
        session.execute(
            update(rd)
            .where(
                rd.c.device_id == bindparam("b_device"),
                rd.c.revert_deployment_id == bindparam("b_deployment"),
                or_(rd.c.state == "reverting", and_(rd.c.state == "revert_failed", rd.c.code == "timeout")),
            )
            .values(state=bindparam("b_revert_state"), **outcome),
            outcomes,
        )


def _telemetry_state(m: dict[str, Any], now: float) -> dict[str, Any]:
    """What a telemetry message says about the device's live state (``devices`` columns)."""
    model = m.get("model") or {}
    latest = {
        "ts": m["ts"],
        "requests": m["requests"],
        "errors": m["errors"],
        "latency": m["latency"],
        "system": m["system"],
        "queue": m["queue"],
        "drift": m.get("drift"),
        "interval_s": m["interval_s"],
    }
    values: dict[str, Any] = {
        "online": True,
        "last_seen": now,
        "latest": latest,
        "ota_state": m["ota"]["state"],
        "ota_deployment": m["ota"].get("deployment_id"),
    }
    if model:
        values.update(
            model_name=model["name"],
            model_version=model["version"],
            model_slot=model["slot"],
            model_digest=model["digest"],
        )
    return values


def _status_state(m: dict[str, Any], now: float) -> dict[str, Any]:
    values: dict[str, Any] = {"online": m["state"] == "online", "last_seen": now}
    model = m.get("model")
    if model:
        values.update(
            model_name=model["name"],
            model_version=model["version"],
            model_slot=model["slot"],
            model_digest=model["digest"],
        )
    return values


def _telemetry_row(device: str, m: dict[str, Any]) -> dict[str, Any]:
    drift = m.get("drift") or {}
    psis = [
        v.get("psi")
        for part in ("inputs", "outputs")
        for v in (drift.get(part) or {}).values()
        if v.get("psi") is not None
    ]
    model = m.get("model") or {}
    return {
        "device_id": device,
        "seq": m["seq"],
        "ts": m["ts"],
        "model_version": model.get("version"),
        "requests": m["requests"],
        "errors": m["errors"],
        "p50_ms": m["latency"].get("p50_ms"),
        "p99_ms": m["latency"].get("p99_ms"),
        "drift_psi": max(psis) if psis else None,
        "cpu_percent": m["system"].get("cpu_percent"),
        "rss_mib": m["system"].get("rss_mib"),
        "temperature_c": m["system"].get("temperature_c"),
    }


def _event_row(device: str, m: dict[str, Any], received_at: float) -> dict[str, Any]:
    return {
        "device_id": device,
        "seq": m["seq"],
        "ts": m["ts"],
        "received_at": received_at,
        "event": m["event"],
        "deployment_id": m.get("deployment_id"),
        "state": m.get("state"),
        "code": m.get("code"),
        "message": m.get("message"),
    }


def count_gaps(session: Session, device: str) -> int:
    """Sequence numbers missing between a device's first and last stored message (its dropped messages)."""
    lows, highs, total = [], [], 0
    for model in (Telemetry, Event):
        low, high, count = session.execute(
            select(func.min(model.seq), func.max(model.seq), func.count()).where(model.device_id == device)
        ).one()
        if count:
            lows.append(low)
            highs.append(high)
            total += count
    if not total:
        return 0
    return int(max(highs) - min(lows) + 1 - total)


class Ingest:
    """MQTT consumers on the shared subscription, feeding one batching writer thread."""

    def __init__(
        self,
        writer: Writer,
        connect: Callable[[Callable[[Any, Any, Any], None], list[tuple[str, int]]], Any],
        *,
        group: str = "ingest",
        fleet: str,
        batch: int = 500,
        flush_s: float = 0.2,
        capacity: int = 20_000,
    ) -> None:
        self.writer = writer
        self.batch = batch
        self.flush_s = flush_s
        self.queue: queue.Queue[Incoming] = queue.Queue(capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeship-ingest", daemon=True)
        self.filters = [(shared_filter(group, fleet, channel), 1) for channel in ("telemetry", "events", "status")]
        self._connect = connect
        self.client: Any = None
        self.lag_s = 0.0

    def start(self) -> None:
        self._thread.start()
        self.client = self._connect(self._on_message, self.filters)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        # Blocks when the writer is behind: paho stops reading and the broker holds the messages.
        self.queue.put(Incoming(message.topic, bytes(message.payload), time.time(), message.mid, message.qos))

    def _run(self) -> None:
        while not self._stop.is_set() or not self.queue.empty():
            batch: list[Incoming] = []
            try:
                batch.append(self.queue.get(timeout=self.flush_s))
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.flush_s
            while len(batch) < self.batch and time.monotonic() < deadline:
                try:
                    batch.append(self.queue.get(timeout=max(deadline - time.monotonic(), 0.001)))
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[Incoming]) -> None:
        delay = 0.5
        while True:
            try:
                self.writer.write(batch)
                self.lag_s = time.time() - batch[0].received_at
                self._ack(batch)
                return
            except Exception as exc:  # the database went away: keep the batch, retry (never drop it)
                if self._stop.is_set():
                    log.error("ingest stopped with %d messages unwritten: %s", len(batch), exc)
                    return
                log.warning("database write failed (%s); retrying in %.1f s", type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _ack(self, batch: Sequence[Incoming]) -> None:
        """Acknowledge a stored batch to the broker (the client runs with ``manual_ack``). Until then the
        broker keeps each message for this session and sends it again after a crash; storage by
        (device, seq) makes the second copy a counted duplicate, so a killed process loses nothing."""
        client = self.client
        if client is None:
            return
        for item in batch:
            if item.qos > 0:
                client.ack(item.mid, item.qos)

    def stop(self) -> None:
        """Stop cleanly: no new messages, the queued ones stored and acknowledged, then the session ended."""
        client = self.client
        if client is not None:
            client.unsubscribe([topic for topic, _ in self.filters])
            time.sleep(0.2)  # messages the broker sent before the UNSUBACK still arrive into the queue
        self._stop.set()
        self._thread.join(30)
        if client is not None:
            # A clean stop ends the MQTT session: mosquitto would otherwise go on queueing this member's
            # share of the shared subscription for it, and the processes left would miss those messages.
            # A crash keeps the session, so a process restarted under the same id gets what it missed.
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
            client.disconnect(properties=props)
            client.loop_stop()
