"""How long the dashboard's pages take to build with 10,000 devices in the database.

A fleet is created in a temporary directory (SQLite by default, ``--postgres`` for a fresh database on
the machine's PostgreSQL at 127.0.0.1:5432, dropped afterwards) and filled directly with SQLAlchemy bulk
inserts (``tests/fleet/dashboard_fixtures.py``): ``--devices`` devices (every seventh offline, two
model versions in two slots), ``--telemetry`` telemetry rows per device, a rollout over every device
halted in its first wave by the latency gate, and the alerts ``fleet.alerts.evaluate`` opens for that
(one per offline device plus the halted rollout). The fleet's app (API and dashboard) then runs in a
real uvicorn on a free port, and an admin session fetches each page ``--rounds`` times, interleaved.

Per page it prints the server time (the ``Server-Timing`` header the dashboard sets: from the handler's
start to the rendered HTML, session check and every query included) and the time the client saw
(connection reuse, HTTP on localhost), as median, p95 and max in milliseconds. Goal: the overview
under 500 ms of server time with 10,000 devices.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.dashboard [--devices 10000] [--telemetry 30] \
        [--rounds 20] [--postgres] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from benchmarks.machine import describe
from edgeship.fleet import alerts, auth
from edgeship.fleet.models import Alert, Device, RolloutDevice, Telemetry
from edgeship.runtime.package import TrustedKeys, generate_key
from tests.fleet.dashboard_fixtures import device_id, seed_devices, seed_halted_rollout
from tests.fleet.fleet_fixtures import ApiServer, _create_pg_database, _drop_pg_database, fleet_settings, open_fleet
from tests.package_fixtures import Publisher

GOAL_MS = 500.0


@contextmanager
def _database(tmp: Path, postgres: bool) -> Iterator[str]:
    if not postgres:
        yield f"sqlite:///{tmp / 'db' / 'fleet.db'}"
        return
    name = _create_pg_database()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        _drop_pg_database(name)


def _csrf(text: str) -> str:
    match = re.search(r'name="csrf" value="([^"]*)"', text)
    if match is None:
        raise RuntimeError("the login page has no CSRF field")
    return match.group(1)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(devices: int, telemetry: int, rounds: int, postgres: bool) -> dict[str, Any]:
    key = generate_key()
    publisher = Publisher(key, TrustedKeys.of([key.public_key()]))
    with tempfile.TemporaryDirectory(prefix="edgeship-dash-bench-") as name, _database(Path(name), postgres) as url:
        tmp = Path(name)
        ctx = open_fleet(fleet_settings(tmp, publisher, url))
        try:
            now = time.time()
            started = time.perf_counter()
            ids = seed_devices(ctx, devices, telemetry_per_device=telemetry, now=now)
            rollout_id = seed_halted_rollout(ctx, ids, now=now)
            opened = alerts.evaluate(ctx.db.session, ctx.settings.alerts, now)
            seed_s = time.perf_counter() - started
            with ctx.db.session(readonly=True) as session:
                rows = {
                    "devices": session.scalar(select(func.count()).select_from(Device)),
                    "telemetry": session.scalar(select(func.count()).select_from(Telemetry)),
                    "rollout_devices": session.scalar(select(func.count()).select_from(RolloutDevice)),
                    "open_alerts": session.scalar(select(func.count()).select_from(Alert)),
                }
            _row, token = auth.create_token(ctx, "bench", "admin", actor="benchmark")
            server = ApiServer(ctx).start()
            try:
                pages = {
                    "overview": "/dashboard/",
                    "overview, page 181 (after dev-09000)": f"/dashboard/?after={device_id(9000)}",
                    "overview, offline only": "/dashboard/?status=offline",
                    "device (charts, events)": f"/dashboard/devices/{device_id(1)}",
                    "rollouts": "/dashboard/rollouts",
                    f"rollout ({devices} devices)": f"/dashboard/rollouts/{rollout_id}",
                    "alerts": "/dashboard/alerts",
                }
                timings = _measure(server.url, token, pages, rounds)
            finally:
                server.stop()
        finally:
            ctx.close()
    return {
        "cpu": describe(),
        "database": "postgresql" if postgres else "sqlite",
        "rows": rows,
        "alerts_opened": len(opened),
        "seed_s": round(seed_s, 1),
        "rounds": rounds,
        "pages": timings,
        "goal_ms": GOAL_MS,
    }


def _measure(base: str, token: str, pages: dict[str, str], rounds: int) -> dict[str, dict[str, float]]:
    server: dict[str, list[float]] = {name: [] for name in pages}
    client: dict[str, list[float]] = {name: [] for name in pages}
    with httpx.Client(base_url=base, follow_redirects=False, timeout=60) as http:
        form = http.get("/dashboard/login")
        answer = http.post("/dashboard/login", data={"token": token, "csrf": _csrf(form.text)})
        if answer.status_code != 303:
            raise RuntimeError(f"login failed: {answer.status_code}")
        for path in pages.values():  # warm-up: caches, template compilation
            http.get(path).raise_for_status()
        names = list(pages)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                started = time.perf_counter()
                response = http.get(pages[name])
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                timing = response.headers["server-timing"]
                server[name].append(float(timing.split("dur=")[1]))
                client[name].append(elapsed)
    out = {}
    for name in pages:
        out[name] = {
            "server_median_ms": round(statistics.median(server[name]), 1),
            "server_p95_ms": round(_percentile(server[name], 0.95), 1),
            "server_max_ms": round(max(server[name]), 1),
            "client_median_ms": round(statistics.median(client[name]), 1),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--telemetry", type=int, default=30, help="telemetry rows per device")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--postgres", action="store_true", help="a fresh PostgreSQL database instead of SQLite")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    result = run(args.devices, args.telemetry, args.rounds, args.postgres)
    rows = result["rows"]
    print(f"CPU: {result['cpu']}; database: {result['database']}")
    print(
        f"{rows['devices']} devices, {rows['telemetry']} telemetry rows, {rows['rollout_devices']} rollout devices, "
        f"{rows['open_alerts']} open alerts (seeded in {result['seed_s']} s); {result['rounds']} rounds per page"
    )
    print(f"{'page':44s} {'server median':>14s} {'p95':>8s} {'max':>8s} {'client median':>14s}  (ms)")
    for name, t in result["pages"].items():
        print(
            f"{name:44s} {t['server_median_ms']:14.1f} {t['server_p95_ms']:8.1f} {t['server_max_ms']:8.1f} "
            f"{t['client_median_ms']:14.1f}"
        )
    overview = result["pages"]["overview"]["server_median_ms"]
    verdict = "meets" if overview < GOAL_MS else "MISSES"
    print(f"overview: {overview:.1f} ms server time (median) {verdict} the {GOAL_MS:.0f} ms goal")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if overview < GOAL_MS else 1


if __name__ == "__main__":
    sys.exit(main())
