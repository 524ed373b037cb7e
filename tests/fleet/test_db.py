"""The fleet database: Alembic migrations give exactly the models' schema (SQLite and PostgreSQL), several
processes may migrate at once, write sessions serialize on SQLite, and a dropped PostgreSQL connection
is replaced before use."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select, text

from edgeship.errors import ConfigError
from edgeship.fleet.db import Database, advisory_lock, current_revision, head_revision, migrate
from edgeship.fleet.models import ApiToken, Audit, Base


def test_migrated_schema_is_exactly_the_models(db_url: str):
    database = Database(db_url)
    try:
        assert current_revision(database) is None
        assert migrate(database) == head_revision()
        with database.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        assert current_revision(database) == head_revision()
    finally:
        database.dispose()


def test_migrate_is_idempotent_and_concurrent(db_url: str):
    # Four processes starting at once all run `upgrade head`: one creates the schema, the others find it current.
    with ThreadPoolExecutor(4) as pool:
        revisions = list(pool.map(lambda _: migrate(db_url), range(4)))
    assert revisions == [head_revision()] * 4
    assert migrate(db_url) == head_revision()


def test_session_commits_on_success_and_rolls_back_on_error(db_url: str):
    database = Database(db_url)
    try:
        migrate(database)
        with database.session() as session:
            session.add(Audit(at=1.0, actor="t", action="a.ok", subject="s", details={"k": [1, 2]}))
        with pytest.raises(RuntimeError), database.session() as session:
            session.add(Audit(at=2.0, actor="t", action="a.lost", subject="s", details={}))
            session.flush()
            raise RuntimeError("boom")
        with database.session(readonly=True) as session:
            rows = session.scalars(select(Audit)).all()
            assert [(r.action, r.details) for r in rows] == [("a.ok", {"k": [1, 2]})]
            # Objects stay usable after the session (expire_on_commit=False).
        assert rows[0].actor == "t"
    finally:
        database.dispose()


def test_sqlite_pragmas(sqlite_url: str):
    database = Database(sqlite_url)
    try:
        with database.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        database.dispose()


def test_read_modify_write_sessions_serialize_without_lost_updates(db_url: str):
    # Each worker reads a counter and writes it back incremented, in one session. On SQLite a deferred
    # BEGIN would fail with "database is locked" (no busy wait for a snapshot upgrade) or lose updates;
    # BEGIN IMMEDIATE makes them queue. On PostgreSQL the row lock (FOR UPDATE) does the same.
    database = Database(db_url)
    try:
        migrate(database)
        with database.session() as session:
            session.add(ApiToken(name="counter", token_hash="0" * 64, role="read", created_at=0.0))
        errors: list[BaseException] = []

        def bump() -> None:
            try:
                for _ in range(10):
                    with database.session() as session:
                        row = session.scalars(
                            select(ApiToken).where(ApiToken.name == "counter").with_for_update()
                        ).one()
                        row.created_at = row.created_at + 1
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with database.session(readonly=True) as session:
            assert session.scalars(select(ApiToken.created_at)).one() == 40.0
    finally:
        database.dispose()


def test_a_connection_the_server_dropped_is_replaced_before_use(pg_url: str):
    # What a PostgreSQL restart does to pooled connections: the server ends them. pool_pre_ping notices
    # and reconnects, so the next session works instead of failing with "server closed the connection".
    database = Database(pg_url, pool_size=2)
    try:
        with database.session() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        killer = Database(pg_url)
        try:
            with killer.engine.connect() as conn:
                assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one() is True
        finally:
            killer.dispose()
        with database.session() as session:
            assert session.execute(text("SELECT 1")).scalar_one() == 1
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        database.dispose()


def test_advisory_lock_serializes_on_postgresql(pg_url: str):
    database = Database(pg_url)
    try:
        order: list[str] = []
        held = threading.Event()

        def first() -> None:
            with database.session() as session:
                advisory_lock(session, "package:m")
                held.set()
                session.execute(text("SELECT pg_sleep(0.3)"))
                order.append("first")

        worker = threading.Thread(target=first)
        worker.start()
        held.wait(10)
        with database.session() as session:
            advisory_lock(session, "package:m")
            order.append("second")
        worker.join()
        assert order == ["first", "second"]
    finally:
        database.dispose()


def test_other_urls_are_refused():
    with pytest.raises(ConfigError, match="use sqlite:///path or postgresql"):
        Database("mysql://u@h/db")
