"""Fixtures of the fleet manager's tests (defined in ``tests/fleet/fleet_fixtures.py``).

The device-side venv (Python 3.10, ``make test310``) has no fleet service (no FastAPI): there only the
modules with tests marked ``py310`` are collected, the broker and TUF tooling the device tests use.
"""

import importlib.util
from pathlib import Path

if importlib.util.find_spec("fastapi") is None:
    _DEVICE_SIDE = {"test_broker.py", "test_dev_tls.py", "test_static_server.py", "test_tuf_repo.py"}
    collect_ignore_glob = [
        p.name for p in Path(__file__).parent.glob("*.py") if p.name not in _DEVICE_SIDE and p.name != "conftest.py"
    ]
else:
    from tests.fleet.fleet_fixtures import (  # noqa: F401
        any_fleet,
        api_server,
        db_url,
        fleet,
        pg_url,
        sqlite_url,
    )
