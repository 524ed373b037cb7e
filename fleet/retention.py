"""Retention: raw telemetry older than ``retention.raw`` is rolled up per minute and per hour, then deleted.

This module writes ``telemetry_minute``, ``telemetry_hour`` and ``maintenance_leases``, and deletes
from ``telemetry``. ``run_maintenance`` is the job (the service runs it every ``retention.interval``;
``edgeship fleet maintenance run`` runs it once):

1. Take the ``retention`` lease (an ``UPDATE ... WHERE expired or ours``, like the scheduler's
   rollout leases): one fleet process at a time; a dead holder's lease expires.
2. Roll up in batches of ``retention.batch`` raw rows, each batch one short transaction: read the
   oldest rows before the cutoff, add their sums, counts and maxima into the minute and hour rows
   (an upsert that adds, so batches, late messages and a bucket split over several runs add up
   exactly), delete exactly those rows. A batch is all or nothing: a process killed in the middle
   leaves the rows to the next run, never counted twice. The batch transactions also take an
   advisory lock (PostgreSQL) so that even two holders (a lease that expired under a stalled
   process) never read the same rows.
3. Delete minute roll-ups older than ``retention.minute`` and hour roll-ups older than
   ``retention.hour``, in batches too.

Ingest only inserts new rows (recent timestamps) and never waits on these deletes of old ones on
PostgreSQL. On SQLite each batch holds the one write lock for a short transaction (about 0.2 s for
5000 rows on a 2-core machine) and the job pauses between batches as long as the batch took, so
ingest waits at most about one batch and gets about half of the write time while the job runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgeship.fleet.db import advisory_lock
from edgeship.fleet.models import MaintenanceLease, Telemetry, TelemetryHour, TelemetryMinute
from edgeship.fleet.settings import RetentionSettings

log = logging.getLogger("edgeship.fleet.retention")

LEASE = "retention"
_LOCK = "edgeship-fleet-retention"
ROLLUPS: tuple[tuple[type[Any], float], ...] = ((TelemetryMinute, 60.0), (TelemetryHour, 3600.0))
_SUMS: tuple[str, ...] = (
    *("n", "requests", "errors"),
    *("p99_sum", "p99_n", "cpu_sum", "cpu_n", "rss_sum", "rss_n", "temperature_sum", "temperature_n"),
)
_MAXES = ("p99_max", "drift_max", "cpu_max", "rss_max", "temperature_max")
# raw column -> roll-up prefix
_MEANS = {"p99_ms": "p99", "cpu_percent": "cpu", "rss_mib": "rss", "temperature_c": "temperature"}


@dataclass
class MaintenanceReport:
    """What one ``run_maintenance`` did."""

    ran: bool = True
    """False: another process holds the lease."""
    raw_rolled_up: int = 0
    raw_deleted: int = 0
    minute_deleted: int = 0
    hour_deleted: int = 0
    batches: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "raw_rolled_up": self.raw_rolled_up,
            "raw_deleted": self.raw_deleted,
            "minute_deleted": self.minute_deleted,
            "hour_deleted": self.hour_deleted,
            "batches": self.batches,
            **self.details,
        }


def take_lease(
    session_factory: Callable[[], AbstractContextManager[Session]], owner: str, now: float, lease_s: float
) -> bool:
    """Hold the maintenance lease until ``now + lease_s``; False when another live process holds it."""
    with session_factory() as session:
        result = session.execute(
            update(MaintenanceLease)
            .where(
                MaintenanceLease.name == LEASE,
                or_(MaintenanceLease.owner == owner, MaintenanceLease.until < now),
            )
            .values(owner=owner, until=now + lease_s)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            return True
        if session.get(MaintenanceLease, LEASE) is not None:
            return False
    try:
        with session_factory() as session:
            session.add(MaintenanceLease(name=LEASE, owner=owner, until=now + lease_s))
        return True
    except IntegrityError:  # another process created it first
        return False


def release_lease(session_factory: Callable[[], AbstractContextManager[Session]], owner: str) -> None:
    with session_factory() as session:
        session.execute(delete(MaintenanceLease).where(MaintenanceLease.name == LEASE, MaintenanceLease.owner == owner))


def rollup_batch(session: Session, cutoff: float, batch: int) -> int:
    """Roll up and delete at most ``batch`` raw telemetry rows with ``ts < cutoff``; returns how many.

    A batch is whole minutes (every device's rows of the oldest minutes still holding raw rows, as many
    minutes as fit in ``batch`` rows), or, when one minute alone holds more, part of that minute in device
    order: so each device's minute row is written once (twice where a batch boundary splits a device's
    rows), not once per batch. Taken in ``ts`` order across all devices, a batch of 5,000 rows was 1 s of a
    10,000-device fleet and every minute row was rewritten by about 30 batches; in PostgreSQL every
    rewrite leaves a dead row version, and the roll-up tables of 1.6 million raw rows grew to 519 MiB for
    100,000 live rows.
    """
    advisory_lock(session, _LOCK)
    oldest = session.scalar(select(func.min(Telemetry.ts)).where(Telemetry.ts < cutoff))
    if oldest is None:
        return 0
    start = (oldest // 60.0) * 60.0
    # The batch-th oldest row: the batch ends at the minute it falls in (whole minutes, at most ``batch`` rows).
    nth = session.scalar(select(Telemetry.ts).where(Telemetry.ts < cutoff).order_by(Telemetry.ts).offset(batch - 1))
    end = cutoff if nth is None else max((nth // 60.0) * 60.0, start + 60.0)
    end = min(end, cutoff)
    columns = (
        Telemetry.id,
        Telemetry.device_id,
        Telemetry.ts,
        Telemetry.requests,
        Telemetry.errors,
        Telemetry.p99_ms,
        Telemetry.drift_psi,
        Telemetry.cpu_percent,
        Telemetry.rss_mib,
        Telemetry.temperature_c,
    )
    rows = session.execute(
        select(*columns)
        .where(Telemetry.ts >= start, Telemetry.ts < end)
        .order_by(Telemetry.device_id, Telemetry.ts)
        .limit(batch)
    ).all()
    if not rows:
        return 0
    for model, length in ROLLUPS:
        buckets: dict[tuple[str, float], dict[str, Any]] = {}
        for row in rows:
            key = (row.device_id, (row.ts // length) * length)
            acc = buckets.get(key)
            if acc is None:
                acc = buckets[key] = {"device_id": key[0], "bucket": key[1], **dict.fromkeys(_SUMS, 0)}
                acc.update(dict.fromkeys(_MAXES))
            acc["n"] += 1
            acc["requests"] += row.requests
            acc["errors"] += row.errors
            for raw, prefix in _MEANS.items():
                value = getattr(row, raw)
                if value is not None:
                    acc[f"{prefix}_sum"] += value
                    acc[f"{prefix}_n"] += 1
                    acc[f"{prefix}_max"] = _max(acc[f"{prefix}_max"], value)
            if row.drift_psi is not None:
                acc["drift_max"] = _max(acc["drift_max"], row.drift_psi)
        _add(session, model, list(buckets.values()))
    ids = [row.id for row in rows]
    for start in range(0, len(ids), 1000):
        session.execute(delete(Telemetry).where(Telemetry.id.in_(ids[start : start + 1000])))
    return len(rows)


def _max(a: float | None, b: float) -> float:
    return b if a is None or b > a else a


def _add(session: Session, model: type[Any], values: list[dict[str, Any]]) -> None:
    """Insert roll-up rows, or add them into the rows already there (sums add, maxima take the larger)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert(model) if dialect == "postgresql" else sqlite.insert(model)
    table = model.__table__
    greatest = func.greatest if dialect == "postgresql" else func.max
    update_set: dict[str, Any] = {name: table.c[name] + insert.excluded[name] for name in _SUMS}
    for name in _MAXES:
        # max/greatest of (a, b) where either may be NULL (SQLite's max() is NULL if one is).
        mine, theirs = table.c[name], insert.excluded[name]
        update_set[name] = greatest(func.coalesce(mine, theirs), func.coalesce(theirs, mine))
    statement = insert.on_conflict_do_update(index_elements=["device_id", "bucket"], set_=update_set)
    for start in range(0, len(values), 1000):
        session.execute(statement, values[start : start + 1000])


def _expire(session: Session, model: type[Any], before: float, batch: int) -> int:
    oldest = select(model.device_id, model.bucket).where(model.bucket < before).order_by(model.bucket).limit(batch)
    result = session.execute(delete(model).where(tuple_(model.device_id, model.bucket).in_(oldest)))
    return int(result.rowcount)  # type: ignore[attr-defined]


def run_maintenance(
    session_factory: Callable[[], AbstractContextManager[Session]],
    settings: RetentionSettings,
    now: float,
    *,
    owner: str,
    lease_s: float = 120.0,
    max_batches: int | None = None,
    pause_s: float | None = None,
) -> MaintenanceReport:
    """The retention job (see the module docstring); returns what it did (``ran=False``: not our turn).

    ``max_batches`` bounds one run (the service uses it so one run never goes on for hours after a
    long outage; the rest is left to the next run). ``pause_s``: the wait between batches; by default
    none on PostgreSQL and, on SQLite, as long as the batch took (at least 0.1 s). SQLite's write lock
    is not fair: a writer waiting in its busy handler sleeps and retries, and without a pause the
    next batch takes the lock again first, so ingest would wait for the whole job.
    """
    if not take_lease(session_factory, owner, now, lease_s):
        return MaintenanceReport(ran=False)
    report = MaintenanceReport()
    cutoff = now - settings.raw
    began = time.monotonic()
    try:
        while max_batches is None or report.batches < max_batches:
            # Renew the lease as the run goes on (a long first run after an outage); lost to another: stop.
            if report.batches and not take_lease(session_factory, owner, now + time.monotonic() - began, lease_s):
                break
            started = time.monotonic()
            with session_factory() as session:
                sqlite = session.get_bind().dialect.name == "sqlite"
                done = rollup_batch(session, cutoff, settings.batch)
            if not done:
                break
            report.batches += 1
            report.raw_rolled_up += done
            report.raw_deleted += done
            wait = pause_s if pause_s is not None else (max(0.1, time.monotonic() - started) if sqlite else 0.0)
            if wait > 0:
                time.sleep(wait)
        for model, keep, attr in (
            (TelemetryMinute, settings.minute, "minute_deleted"),
            (TelemetryHour, settings.hour, "hour_deleted"),
        ):
            while True:
                with session_factory() as session:
                    advisory_lock(session, _LOCK)
                    done = _expire(session, model, now - keep, settings.batch)
                if not done:
                    break
                setattr(report, attr, getattr(report, attr) + done)
        if settings.vacuum and (report.raw_deleted or report.minute_deleted or report.hour_deleted):
            took = _vacuum(session_factory)
            if took is not None:
                report.details["vacuum_s"] = took
    finally:
        release_lease(session_factory, owner)
    if report.raw_deleted or report.minute_deleted or report.hour_deleted:
        log.info("retention: %s", report.to_json())
    return report


def _vacuum(session_factory: Callable[[], AbstractContextManager[Session]]) -> float | None:
    """PostgreSQL: ``VACUUM (ANALYZE)`` the telemetry tables the job emptied and upserted, now rather than when
    autovacuum gets to it. Deleting frees nothing by itself: VACUUM makes the dead rows' space reusable
    (and truncates emptied pages at the table's end) and clears the roll-ups' dead versions, with a lock
    that lets ingest go on. Not ``VACUUM FULL``, which would give the space back to the disk but hold an
    exclusive lock while it rewrites the table. Returns the seconds it took (None on SQLite)."""
    with session_factory() as session:
        engine = session.get_bind()
    if engine.dialect.name != "postgresql":
        return None
    started = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:  # type: ignore[union-attr]
        connection.exec_driver_sql("VACUUM (ANALYZE) telemetry, telemetry_minute, telemetry_hour")
    return round(time.monotonic() - started, 2)


def rollup_series(
    session: Session, device_id: str, *, since: float, until: float, resolution: str = "minute"
) -> list[dict[str, Any]]:
    """A device's rolled-up telemetry between ``since`` and ``until`` (bucket starts), oldest first.

    ``resolution`` is ``minute`` or ``hour``. Each point: ``ts`` (the bucket's start), ``n``,
    ``requests``, ``errors``, ``p99_ms`` (mean) and ``p99_ms_max``, ``drift_psi_max``, and the mean
    and maximum of ``cpu_percent``, ``rss_mib``, ``temperature_c``; ``None`` where no message had it.
    Only what retention rolled up: newer data is still raw in ``telemetry``.
    """
    models: dict[str, type[TelemetryMinute] | type[TelemetryHour]] = {"minute": TelemetryMinute, "hour": TelemetryHour}
    model = models.get(resolution)
    if model is None:
        raise ValueError(f"resolution {resolution!r}: use minute or hour")
    rows: Iterable[TelemetryMinute | TelemetryHour] = session.scalars(
        select(model)
        .where(model.device_id == device_id, model.bucket >= since, model.bucket <= until)
        .order_by(model.bucket)
    )
    return [
        {
            "ts": r.bucket,
            "n": r.n,
            "requests": r.requests,
            "errors": r.errors,
            "p99_ms": r.mean("p99"),
            "p99_ms_max": r.p99_max,
            "drift_psi_max": r.drift_max,
            "cpu_percent": r.mean("cpu"),
            "cpu_percent_max": r.cpu_max,
            "rss_mib": r.mean("rss"),
            "rss_mib_max": r.rss_max,
            "temperature_c": r.mean("temperature"),
            "temperature_c_max": r.temperature_max,
        }
        for r in rows
    ]


__all__ = [
    "ROLLUPS",
    "MaintenanceReport",
    "release_lease",
    "rollup_batch",
    "rollup_series",
    "run_maintenance",
    "take_lease",
]
