"""Fixtures for the fleet manager's tests: databases (SQLite file, a fresh PostgreSQL database), a whole
fleet context on disk (settings, migrated database, TUF repository, package store), a controllable
clock, and the fleet API served by a real uvicorn on a free port.

PostgreSQL: the machine's server on 127.0.0.1:5432 (trust auth, user postgres). Each test gets its
own database ``edgeship_test_<random>``, dropped afterwards (``WITH (FORCE)`` ends stray connections).
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeship.fleet import auth
from edgeship.fleet.context import FleetContext
from edgeship.fleet.db import migrate
from edgeship.fleet.models import Device, Package
from edgeship.fleet.settings import FleetSettings, settings_from_dict
from edgeship.fleet.tuf_repo import TufRepository
from edgeship.runtime.package.signing import public_key_pem
from tests.package_fixtures import Publisher

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=10"
FLEET_ID = "f1"


def _create_pg_database() -> str:
    import psycopg

    name = f"edgeship_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the machine's server; dropped after the test."""
    name = _create_pg_database()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        _drop_pg_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'fleet.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using it runs twice: on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'fleet.db'}"
        return
    name = _create_pg_database()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        _drop_pg_database(name)


@dataclass
class Clock:
    """A clock tests move by hand (``ctx.clock``)."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_public_key(publisher: Publisher, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(public_key_pem(publisher.key.public_key()))
    return path


def fleet_settings(tmp_path: Path, publisher: Publisher, database_url: str, **overrides: Any) -> FleetSettings:
    """Settings for a fleet under ``tmp_path/fleet`` trusting ``publisher``; ``overrides`` are fleet.yaml keys."""
    key = write_public_key(publisher, tmp_path / "fleet" / "keys" / "publisher.pub")
    data: dict[str, Any] = {
        "fleet_id": FLEET_ID,
        "data_dir": str(tmp_path / "fleet" / "data"),
        "database_url": database_url,
        "signing_keys": [str(key)],
        **overrides,
    }
    return settings_from_dict(data, base=tmp_path / "fleet")


def open_fleet(settings: FleetSettings, clock: Callable[[], float] = time.time) -> FleetContext:
    """A context over ``settings`` with the database migrated and the TUF repository created."""
    ctx = FleetContext.open(settings, clock=clock)
    migrate(ctx.db)
    TufRepository.create(settings.tuf_dir, keys_dir=settings.tuf_keys_dir, expiry=settings.tuf.expiry())
    return ctx


@dataclass
class FleetUnderTest:
    ctx: FleetContext
    clock: Clock
    admin_token: str
    read_token: str
    tmp: Path

    def add_device(self, device_id: str, target: str = "linux-x86_64", **fields: Any) -> None:
        """Insert a device row directly (enrollment has its own tests)."""
        with self.ctx.db.session() as session:
            session.add(Device(id=device_id, target=target, enrolled_at=self.clock.now, **fields))


@pytest.fixture
def fleet(tmp_path: Path, publisher: Publisher, sqlite_url: str) -> Iterator[FleetUnderTest]:
    """A fleet on SQLite with an admin and a read token."""
    yield from _fleet(tmp_path, publisher, sqlite_url)


@pytest.fixture
def any_fleet(tmp_path: Path, publisher: Publisher, db_url: str) -> Iterator[FleetUnderTest]:
    """A fleet on SQLite, then on PostgreSQL."""
    yield from _fleet(tmp_path, publisher, db_url)


def _fleet(tmp_path: Path, publisher: Publisher, url: str, **overrides: Any) -> Iterator[FleetUnderTest]:
    clock = Clock()
    ctx = open_fleet(fleet_settings(tmp_path, publisher, url, **overrides), clock)
    try:
        _row, admin = auth.create_token(ctx, "root", "admin", actor="test")
        _row, read = auth.create_token(ctx, "viewer", "read", actor="test")
        yield FleetUnderTest(ctx, clock, admin, read, tmp_path)
    finally:
        ctx.close()


def package_row(*, target: str = "t", version: int = 2, **overrides: Any) -> Package:
    """A ``packages`` row for model ``m`` as if pushed (no file behind it): for tests that seed the database."""
    path = f"m/{target}/fp32/v{version}.edgepkg"
    values: dict[str, Any] = {
        "id": version,
        "name": "m",
        "version": version,
        "target": target,
        "format": "onnx",
        "precision": "fp32",
        "manifest_sha256": "0" * 64,
        "size": 1,
        "target_path": path,
        "storage_key": "k",
        "pushed_at": 0.0,
        "pushed_by": "t",
    }
    return Package(**{**values, **overrides})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ApiServer:
    """The fleet API in a real uvicorn server on a free port, in a thread of this test process."""

    def __init__(self, ctx: FleetContext) -> None:
        import uvicorn

        from edgeship.fleet.api import create_app

        self.port = free_port()
        config = uvicorn.Config(create_app(ctx), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fleet-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def api_server(fleet: FleetUnderTest) -> Iterator[ApiServer]:
    server = ApiServer(fleet.ctx).start()
    try:
        yield server
    finally:
        server.stop()


__all__ = [
    "FLEET_ID",
    "ApiServer",
    "Clock",
    "FleetUnderTest",
    "api_server",
    "any_fleet",
    "db_url",
    "fleet",
    "fleet_settings",
    "open_fleet",
    "pg_url",
    "sqlite_url",
    "write_public_key",
]
