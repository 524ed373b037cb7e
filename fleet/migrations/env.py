"""Alembic environment of the fleet database, used by ``fleet.db.migrate`` and by ``alembic`` itself.

``fleet.db.migrate`` passes an open connection (inside a transaction it holds a lock on) in
``config.attributes["connection"]``. Run by hand, for example to write a new revision::

    .venv/bin/alembic -c /dev/null -x url=sqlite:////tmp/fleet.db revision --autogenerate -m "what changed"

(with ``script_location`` given by ``fleet.db.MIGRATIONS_DIR``; docs/fleet.md shows the whole
command), the URL comes from ``-x url=...``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from edgeship.fleet.models import Base

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=True,
        compare_type=True,
    )


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from edgeship.fleet.db import Database

    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database with -x url=sqlite:///path/fleet.db (or postgresql+psycopg://...)")
    database = Database(url)
    try:
        with database.engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        database.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations()
