"""Fixtures of the fleet manager's tests (defined in ``tests/fleet/fleet_fixtures.py``)."""

from tests.fleet.fleet_fixtures import (  # noqa: F401
    any_fleet,
    api_server,
    db_url,
    fleet,
    pg_url,
    sqlite_url,
)
