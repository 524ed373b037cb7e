"""Retention: raw telemetry past retention.raw is rolled up per minute and per hour (exact sums, means, maxima),
then deleted, in short batches under a lease; a re-run does nothing; two jobs at once count nothing twice; ingest
writing at the same time is neither blocked for long nor lost (SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from edgeship.fleet.db import Database, migrate
from edgeship.fleet.models import MaintenanceLease, Telemetry, TelemetryHour, TelemetryMinute
from edgeship.fleet.retention import release_lease, rollup_series, run_maintenance, take_lease
from edgeship.fleet.settings import RetentionSettings
from tests.fleet.fleet_fixtures import fleet_settings
from tests.fleet.test_cli import edgeship, one_error_line
from tests.package_fixtures import Publisher

DAY = 86400.0
NOW = 1_000 * DAY  # midnight, so minute and hour buckets are easy to name
SETTINGS = RetentionSettings(raw=7 * DAY, minute=30 * DAY, hour=365 * DAY, batch=7)


def _rows(rng: random.Random, devices: int, start: float, count: int, step: float) -> list[dict[str, Any]]:
    rows = []
    for d in range(devices):
        for i in range(count):
            maybe = lambda v: None if rng.random() < 0.2 else v  # noqa: E731 - some messages lack a value
            rows.append(
                {
                    "device_id": f"d{d}",
                    "seq": i,
                    "ts": start + i * step + rng.random(),
                    "requests": rng.randrange(100),
                    "errors": rng.randrange(3),
                    "p50_ms": 1.0,
                    "p99_ms": maybe(rng.uniform(1, 50)),
                    "drift_psi": maybe(rng.uniform(0, 1)),
                    "cpu_percent": maybe(rng.uniform(0, 100)),
                    "rss_mib": maybe(rng.uniform(10, 500)),
                    "temperature_c": maybe(rng.uniform(20, 90)),
                }
            )
    return rows


def _expected(rows: list[dict[str, Any]], length: float, cutoff: float) -> dict[tuple[str, float], dict[str, Any]]:
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for r in rows:
        if r["ts"] >= cutoff:
            continue
        key = (r["device_id"], (r["ts"] // length) * length)
        acc = out.setdefault(key, {"n": 0, "requests": 0, "errors": 0})
        acc["n"] += 1
        acc["requests"] += r["requests"]
        acc["errors"] += r["errors"]
        for raw, name in (
            ("p99_ms", "p99"),
            ("cpu_percent", "cpu"),
            ("rss_mib", "rss"),
            ("temperature_c", "temperature"),
        ):
            acc.setdefault(name, [])
            if r[raw] is not None:
                acc[name].append(r[raw])
        acc.setdefault("drift", [])
        if r["drift_psi"] is not None:
            acc["drift"].append(r["drift_psi"])
    return out


def _check(database: Database, model: type[Any], expected: dict[tuple[str, float], dict[str, Any]]) -> None:
    with database.session(readonly=True) as session:
        got = {(r.device_id, r.bucket): r for r in session.scalars(select(model))}
    assert set(got) == set(expected)
    for key, e in expected.items():
        r = got[key]
        assert (r.n, r.requests, r.errors) == (e["n"], e["requests"], e["errors"])
        for name in ("p99", "cpu", "rss", "temperature"):
            values = e[name]
            assert getattr(r, f"{name}_n") == len(values)
            assert r.mean(name) == (pytest.approx(sum(values) / len(values)) if values else None)
            assert getattr(r, f"{name}_max") == (pytest.approx(max(values)) if values else None)
        assert r.drift_max == (pytest.approx(max(e["drift"])) if e["drift"] else None)


def _insert(database: Database, rows: list[dict[str, Any]]) -> None:
    with database.session() as session:
        session.execute(insert(Telemetry), rows)


def _raw_ts(database: Database) -> list[float]:
    with database.session(readonly=True) as session:
        return sorted(session.scalars(select(Telemetry.ts)))


def test_rollup_numbers_raw_rows_gone_and_rerun_does_nothing(db_url: str):
    database = Database(db_url)
    try:
        migrate(database)
        rng = random.Random(7)
        # Three devices, 150 messages each, every 50 s from 8 days ago: about 2 hours, over the 7-day cutoff.
        cutoff = NOW - SETTINGS.raw
        rows = _rows(rng, 3, cutoff - 3600 - 17, 150, 50.0)
        _insert(database, rows)
        report = run_maintenance(database.session, SETTINGS, NOW, owner="p1")
        kept = [r["ts"] for r in rows if r["ts"] >= cutoff]
        rolled = len(rows) - len(kept)
        assert 0 < rolled < len(rows)
        assert report.ran and report.raw_rolled_up == report.raw_deleted == rolled
        assert report.batches >= -(-rolled // SETTINGS.batch)  # batches of at most 7 rows
        assert _raw_ts(database) == sorted(kept)
        _check(database, TelemetryMinute, _expected(rows, 60.0, cutoff))
        _check(database, TelemetryHour, _expected(rows, 3600.0, cutoff))

        # The series a chart reads: per-minute points of one device, means and maxima.
        with database.session(readonly=True) as session:
            series = rollup_series(session, "d1", since=0.0, until=NOW)
            hourly = rollup_series(session, "d1", since=0.0, until=NOW, resolution="hour")
        minute = _expected(rows, 60.0, cutoff)
        points = sorted((b, e) for (d, b), e in minute.items() if d == "d1")
        assert [p["ts"] for p in series] == [b for b, _ in points]
        first, (_, expected_first) = series[0], points[0]
        assert first["n"] == expected_first["n"] and first["requests"] == expected_first["requests"]
        p99 = expected_first["p99"]
        assert first["p99_ms"] == (pytest.approx(sum(p99) / len(p99)) if p99 else None)
        assert sum(p["n"] for p in hourly) == sum(e["n"] for _, e in points)

        # Again at the same time: nothing to do, nothing counted twice.
        again = run_maintenance(database.session, SETTINGS, NOW, owner="p2")
        assert again.ran and again.raw_deleted == 0 and again.batches == 0
        _check(database, TelemetryMinute, _expected(rows, 60.0, cutoff))

        # An hour later the rest of the rows pass the cutoff: they add into the same buckets exactly.
        later = NOW + 2 * 3600
        run_maintenance(database.session, SETTINGS, later, owner="p1")
        assert _raw_ts(database) == []
        _check(database, TelemetryMinute, _expected(rows, 60.0, later - SETTINGS.raw))
        _check(database, TelemetryHour, _expected(rows, 3600.0, later - SETTINGS.raw))

        # Roll-ups past their own retention go: minute rows after 30 days, hour rows after 365.
        report = run_maintenance(database.session, SETTINGS, cutoff + 31 * DAY, owner="p1")
        with database.session(readonly=True) as session:
            assert session.scalar(select(func.count()).select_from(TelemetryMinute)) == 0
            hours = session.scalar(select(func.count()).select_from(TelemetryHour))
        assert (
            report.minute_deleted > 0
            and report.hour_deleted == 0
            and hours == len(_expected(rows, 3600.0, later - SETTINGS.raw))
        )
        run_maintenance(database.session, SETTINGS, cutoff + 366 * DAY + 7 * DAY, owner="p1")
        with database.session(readonly=True) as session:
            assert session.scalar(select(func.count()).select_from(TelemetryHour)) == 0
    finally:
        database.dispose()


def test_lease_one_job_at_a_time_and_taken_over_when_expired(db_url: str):
    database = Database(db_url)
    try:
        migrate(database)
        assert take_lease(database.session, "p1", 100.0, 60.0)
        assert not take_lease(database.session, "p2", 120.0, 60.0)
        assert not run_maintenance(database.session, SETTINGS, 120.0, owner="p2").ran
        assert take_lease(database.session, "p1", 130.0, 60.0)  # renewed by its holder
        assert take_lease(database.session, "p2", 191.0, 60.0)  # p1's lease expired at 190
        release_lease(database.session, "p2")
        with database.session(readonly=True) as session:
            assert session.get(MaintenanceLease, "retention") is None
    finally:
        database.dispose()


def test_two_jobs_at_once_and_ingest_writing_meanwhile(db_url: str):
    # Two jobs whose leases both look free to them (different owners, one lease expired under a stalled one):
    # the batches still serialize, so nothing is counted twice. Meanwhile an "ingest" keeps inserting new rows
    # in small transactions: none is lost or refused.
    databases = [Database(db_url) for _ in range(3)]
    try:
        migrate(databases[0])
        rng = random.Random(11)
        cutoff = NOW - SETTINGS.raw
        old = _rows(rng, 4, cutoff - 2 * 3600, 100, 60.0)
        _insert(databases[0], old)
        settings = RetentionSettings(raw=SETTINGS.raw, batch=25)
        reports: list[Any] = []
        errors: list[BaseException] = []
        writes: list[int] = []
        done = threading.Event()

        barrier = threading.Barrier(2)

        def job(database: Database, owner: str) -> None:
            try:
                barrier.wait()
                # lease_s=-1: each job's lease is expired as soon as taken (as under a stalled holder), so both run.
                reports.append(run_maintenance(database.session, settings, NOW, owner=owner, lease_s=-1.0))
            except BaseException as exc:
                errors.append(exc)

        def ingest() -> None:
            seq = 1000
            try:
                while not done.is_set() or seq < 1040:
                    with databases[2].session() as session:
                        session.execute(
                            insert(Telemetry),
                            [{"device_id": "d0", "seq": seq, "ts": NOW - 5.0, "requests": 1, "errors": 0}],
                        )
                    writes.append(seq)
                    seq += 1
            except BaseException as exc:
                errors.append(exc)

        # A lease left by a stalled holder, expired: each job takes it over (creating it, one of two would lose).
        with databases[0].session() as session:
            session.add(MaintenanceLease(name="retention", owner="stalled", until=0.0))
        writer = threading.Thread(target=ingest)
        writer.start()
        jobs = [threading.Thread(target=job, args=(databases[i], f"p{i}")) for i in range(2)]
        for t in jobs:
            t.start()
        for t in jobs:
            t.join(60)
        done.set()
        writer.join(60)
        assert errors == []
        assert [r.ran for r in reports] == [True, True]
        assert sum(r.raw_deleted for r in reports) == len(old)
        _check(databases[0], TelemetryMinute, _expected(old, 60.0, cutoff))
        _check(databases[0], TelemetryHour, _expected(old, 3600.0, cutoff))
        with databases[0].session(readonly=True) as session:
            new = session.scalars(select(Telemetry.seq).where(Telemetry.seq >= 1000)).all()
        assert sorted(new) == list(range(1000, 1000 + len(writes)))
        assert len(writes) >= 40
    finally:
        for d in databases:
            d.dispose()


def test_sqlite_ingest_gets_the_lock_between_batches(sqlite_url: str):
    # SQLite's write lock is not fair: a writer in its busy handler sleeps and retries, and a job that starts its
    # next batch at once takes the lock again first; the writer then waited for the whole job (measured: one
    # 500-row write waited 1.1 s behind seven 5000-row batches). The job pauses between batches instead, as long
    # as a batch took and at least 0.1 s (SQLite's busy handler sleeps at most 0.1 s between tries).
    database = Database(sqlite_url)
    writer_db = Database(sqlite_url)
    try:
        migrate(database)
        _insert(database, _rows(random.Random(3), 40, NOW - SETTINGS.raw - 3 * 3600, 500, 10.0))
        writes: list[float] = []
        sessions: list[tuple[float, float]] = []  # the job's transactions: (began, ended)
        done = threading.Event()

        @contextmanager
        def job_session() -> Iterator[Session]:
            with database.session() as session:
                session.connection()  # BEGIN IMMEDIATE: holds the write lock from here
                began = time.monotonic()
                yield session
            sessions.append((began, time.monotonic()))

        def ingest() -> None:
            seq = 10_000
            while not done.is_set():
                with writer_db.session() as session:
                    row = {"device_id": "w", "seq": seq, "ts": NOW, "requests": 1, "errors": 0}
                    session.execute(insert(Telemetry), [row])
                writes.append(time.monotonic())
                seq += 1

        writer = threading.Thread(target=ingest)
        writer.start()
        try:
            settings = RetentionSettings(raw=SETTINGS.raw, batch=5000)
            report = run_maintenance(job_session, settings, NOW, owner="p")  # the default pause
        finally:
            done.set()
            writer.join(60)
        # 40 devices every 10 s: 240 rows a minute, so a 5,000-row batch is 20 whole minutes (4,800 rows).
        assert report.raw_deleted == 20_000 and report.batches == 5
        # Between how many two transactions of the job that follow each other did a write get in? Not a speed
        # threshold: an order. After each of the 4 batches (the pauses); without the pauses, 0 or 1 in all.
        gaps = [(a[1], b[0]) for a, b in itertools.pairwise(sessions)]
        served = sum(1 for end, begin in gaps if any(end < w < begin for w in writes))
        assert served >= report.batches, (served, len(gaps))
    finally:
        database.dispose()
        writer_db.dispose()


def test_cli_maintenance_run(tmp_path: Path, publisher: Publisher, sqlite_url: str):
    import yaml

    settings = fleet_settings(tmp_path, publisher, sqlite_url)
    config = tmp_path / "fleet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "fleet_id": settings.fleet_id,
                "data_dir": str(settings.data_dir),
                "database_url": sqlite_url,
                "signing_keys": [str(k) for k in settings.signing_keys],
                "retention": {"raw": "1d", "batch": 2},
            }
        )
    )
    database = Database(sqlite_url)
    try:
        migrate(database)
        now = time.time()
        _insert(
            database,
            [
                {"device_id": "d", "seq": i, "ts": now - ago, "requests": 2, "errors": 0}
                for i, ago in enumerate((3 * DAY, 2 * DAY, 2 * DAY + 1, 60.0))
            ],
        )
        result = edgeship("fleet", "maintenance", "run", "-c", config, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["ran"] and report["raw_deleted"] == 3 and report["batches"] == 2
        assert len(_raw_ts(database)) == 1
        result = edgeship("fleet", "maintenance", "run", "-c", config)
        assert result.returncode == 0 and "rolled up and deleted 0 raw telemetry rows" in result.stdout
        config.write_text(config.read_text().replace("raw: 1d", "raw: 1 fortnight"))
        result = edgeship("fleet", "maintenance", "run", "-c", config)
        assert result.returncode != 0
        assert one_error_line(result) == (
            "error: retention.raw: '1 fortnight' is not a duration; write e.g. 30s, 10m, 6h, 7d or 2w"
        )
    finally:
        database.dispose()


def test_the_service_runs_the_job(tmp_path: Path, publisher: Publisher, sqlite_url: str):
    # The service's retention thread (started by FleetService.start with the other threads; here alone, no broker).
    from edgeship.fleet.service import FleetService

    settings = fleet_settings(tmp_path, publisher, sqlite_url, retention={"raw": "1d", "interval": "1s"})
    service = FleetService(settings, instance="retention-test")
    try:
        migrate(service.ctx.db)
        now = time.time()
        old = [{"device_id": "d", "seq": i, "ts": now - 2 * DAY + i, "requests": 1, "errors": 0} for i in range(30)]
        _insert(service.ctx.db, [*old, {"device_id": "d", "seq": 99, "ts": now, "requests": 1, "errors": 0}])
        service._spawn(service._retain, "edgeship-retention")
        deadline = time.monotonic() + 30
        while len(_raw_ts(service.ctx.db)) > 1:
            assert time.monotonic() < deadline, "the service's retention thread never ran"
            time.sleep(0.1)
        with service.ctx.db.session(readonly=True) as session:
            assert session.scalar(select(func.sum(TelemetryMinute.n))) == 30
    finally:
        service.stop()


@pytest.mark.parametrize("vacuum", [True, False])
def test_on_postgresql_the_job_vacuums_what_it_emptied(pg_url: str, vacuum: bool):
    """Deleted rows free nothing until VACUUM: the job runs a plain VACUUM (ANALYZE) of the telemetry tables
    (never FULL, which locks ingest out) unless ``retention.vacuum`` is off."""
    import dataclasses

    from sqlalchemy import text

    database = Database(pg_url)
    try:
        migrate(database)
        cutoff = NOW - SETTINGS.raw
        _insert(database, _rows(random.Random(3), 2, cutoff - 600, 40, 20.0))
        report = run_maintenance(database.session, dataclasses.replace(SETTINGS, vacuum=vacuum), NOW, owner="p1")
        assert report.raw_deleted > 0
        assert ("vacuum_s" in report.to_json()) is vacuum
        with database.session(readonly=True) as session:
            vacuumed = session.execute(
                text(
                    "SELECT relname, last_vacuum IS NOT NULL FROM pg_stat_user_tables "
                    "WHERE relname IN ('telemetry', 'telemetry_minute', 'telemetry_hour')"
                )
            ).all()
        assert dict(vacuumed) == dict.fromkeys(("telemetry", "telemetry_minute", "telemetry_hour"), vacuum)
    finally:
        database.dispose()


def test_a_batch_takes_whole_minutes_so_each_minute_row_is_written_once(db_url: str):
    """Batches in ``ts`` order across devices rewrote each device's minute row once per batch (in PostgreSQL a
    dead row version each time: 519 MiB of roll-up tables for 100,000 live rows). A batch is now whole
    minutes, or one minute in device order when the minute alone is bigger than a batch."""
    from edgeship.fleet.retention import rollup_batch

    database = Database(db_url)
    try:
        migrate(database)
        cutoff = NOW - SETTINGS.raw
        # 5 devices every 7 s for 20 minutes: about 43 rows a minute; batches of 100 rows.
        rows = _rows(random.Random(5), 5, cutoff - 1200, 170, 7.0)
        _insert(database, rows)
        minutes = {r["ts"] // 60 for r in rows if r["ts"] < cutoff}
        while True:
            with database.session() as session:
                done = rollup_batch(session, cutoff, 100)
            if not done:
                break
            left = {ts // 60 for ts in _raw_ts(database) if ts < cutoff}
            # Every minute is either wholly rolled up or wholly still raw, for every device.
            for minute in minutes:
                raw = [r for r in rows if r["ts"] // 60 == minute and r["ts"] < cutoff]
                kept = [ts for ts in _raw_ts(database) if ts // 60 == minute]
                assert len(kept) in (0, len(raw)), (minute, len(kept), len(raw))
            assert done <= 100 and left < minutes
            minutes = left
        # One minute holding more rows than a batch is split in device order: each device's rows stay together.
        big = [
            {"device_id": f"d{d}", "seq": 10_000 + i, "ts": cutoff - 120 + i * 0.05, "requests": 1, "errors": 0}
            for d in range(4)
            for i in range(60)
        ]
        _insert(database, big)
        with database.session() as session:
            assert rollup_batch(session, cutoff, 100) == 60 + 40  # device d0 whole, then 40 of d1
        with database.session(readonly=True) as session:
            left_by_device = dict(
                session.execute(select(Telemetry.device_id, func.count()).group_by(Telemetry.device_id)).all()
            )
        assert left_by_device.get("d0", 0) == 0 and left_by_device["d1"] == 20
    finally:
        database.dispose()
