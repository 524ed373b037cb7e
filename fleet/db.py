"""The fleet's database connection: SQLite on one machine, PostgreSQL for several fleet processes.

``Database(url)`` owns the engine; ``session()`` is a unit of work (commit on success, roll back
on an exception). ``migrate(url)`` brings a database to the newest schema with Alembic
(``fleet/migrations/``), safely when several processes start at once.

SQLite: every connection gets WAL (readers never wait for the writer), a 30 s busy timeout
(a writer waits for another instead of failing at once) and foreign keys. A write session
starts with ``BEGIN IMMEDIATE``: pysqlite's default deferred ``BEGIN`` takes the write lock
only at the first write, and in WAL mode a transaction that read an older snapshot cannot
upgrade to a writer; SQLite then fails at once with "database is locked" and the busy timeout
does not help. Taking the lock at the start makes read-modify-write sessions (a version check
followed by an insert, a state check followed by an update) serialize instead. ``session(
readonly=True)`` starts with a plain ``BEGIN`` and runs beside the writer.

PostgreSQL: a pool with ``pool_pre_ping``, so a connection to a server that restarted since
it was pooled is replaced before use, not handed out to fail. ``advisory_lock`` takes a
transaction-scoped lock on a name (PostgreSQL) and is a no-op on SQLite, whose write sessions
are already serialized.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from edgeship.errors import ConfigError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_READONLY = "edgeship_readonly"
_MIGRATE_LOCK = "edgeship-fleet-migrate"


class Database:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``) and sessions over it.

    Raises ``ConfigError`` for another kind of URL. Nothing connects until first use.
    """

    def __init__(self, url: str, *, echo: bool = False, pool_size: int = 10) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.dialect = "sqlite"
            if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
                Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, echo=echo, connect_args={"timeout": 30})
            _sqlite_events(self.engine)
        elif url.startswith("postgresql"):
            self.dialect = "postgresql"
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://") :]
            self.engine = create_engine(
                url,
                echo=echo,
                pool_pre_ping=True,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_recycle=1800,
                connect_args={"connect_timeout": 10},
            )
        else:
            raise ConfigError(f"database url {url!r}: use sqlite:///path or postgresql+psycopg://user@host/db")
        self._readonly_engine = self.engine.execution_options(**{_READONLY: True})

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """A session that commits when the block ends normally and rolls back on an exception.

        Objects stay usable after the commit (``expire_on_commit=False``), so a function may
        return the rows it wrote. ``readonly`` sessions never write (SQLite: they do not take
        the write lock); what they changed is discarded.
        """
        bind = self._readonly_engine if readonly else self.engine
        with Session(bind, expire_on_commit=False) as session:
            try:
                yield session
                if not readonly:
                    session.commit()
                # A read-only session just closes: the pool rolls its connection back, and (unlike
                # Session.rollback) closing leaves the loaded objects readable.
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        """Close every pooled connection (tests, shutdown)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"


def advisory_lock(session: Session, name: str) -> None:
    """Hold a lock on ``name`` until the session's transaction ends (PostgreSQL); no-op on SQLite.

    Two processes serializing the same decision (the version check of one package line, a
    migration) take the same name; different names never block each other.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(name)})


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _wal(cursor: Any) -> None:
    """Switch the database file to WAL (a no-op once it is). Switching needs a moment with no other writer and,
    unlike other statements, fails at once with "database is locked" instead of waiting the busy timeout: when
    several processes open a new database together (``migrate`` from several fleet processes) one of them holds
    the write lock; retry for up to 30 s."""
    import sqlite3

    if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    deadline = time.monotonic() + 30
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling is off; the "begin" listener below issues BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        _wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        readonly = connection.get_execution_options().get(_READONLY, False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def migrate(url: str | Database) -> str:
    """Upgrade the database at ``url`` to the newest schema (Alembic ``upgrade head``); returns the revision.

    Safe to run from several processes at once: the whole upgrade is one transaction under a
    lock (a PostgreSQL advisory lock; SQLite's write lock), so the second process finds the
    schema current and does nothing. Raises ``ConfigError`` for an unusable URL; database
    errors propagate as SQLAlchemy exceptions.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    database = url if isinstance(url, Database) else Database(url)
    try:
        with database.engine.connect() as connection, connection.begin():
            if database.dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(_MIGRATE_LOCK)})
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            revision = MigrationContext.configure(connection).get_current_revision()
        return revision or ""
    finally:
        if not isinstance(url, Database):
            database.dispose()


def current_revision(database: Database) -> str | None:
    """The schema revision the database is at (None: not migrated yet)."""
    from alembic.runtime.migration import MigrationContext

    with database.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision in ``fleet/migrations``."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


__all__ = ["MIGRATIONS_DIR", "Database", "advisory_lock", "current_revision", "head_revision", "migrate"]
