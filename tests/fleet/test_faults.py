"""Faults during rollouts, every part real (tests/fleet/e2e_harness.py): the fleet process killed mid-wave,
the broker restarted, PostgreSQL restarted (a server this test owns), an agent offline for a whole wave,
a package whose golden vectors fail on the device, and an operator's approval, pause, resume and abort.

What each test protects is what an operator relies on: the rollout ends where it should, no device is
ever commanded twice to different versions (the broker's log of commands, the agents' ``seen`` lists
and the fleet's ``rollout_devices`` agree on one deployment id per device), and nothing is lost.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeship.fleet.broker import free_port
from tests.fleet.e2e_harness import FleetRig, wait_for

pytestmark = pytest.mark.slow

ENDED = ("completed", "rolled_back", "aborted")


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgeship.runtime.package import load_private_key, write_keypair
    from tests.agent_models import PackageSpec, build_package

    root = tmp_path_factory.mktemp("fault-packages")
    key_path, pub = write_keypair(root, "publisher")
    key = load_private_key(key_path)
    return {
        "pub": pub,
        "v1": build_package(root / "v1.edgepkg", key, PackageSpec(version=1)),
        "v2": build_package(root / "v2.edgepkg", key, PackageSpec(version=2)),
        "v3_bad": build_package(root / "v3.edgepkg", key, PackageSpec(version=3, kind="bad_golden")),
    }


def new_rig(
    tmp_path: Path,
    packages: dict[str, Path],
    agents: int,
    *,
    start: int | None = None,
    database_url: str | None = None,
    processes: int = 1,
    front: bool = False,
) -> tuple[FleetRig, list[str]]:
    """A fleet with ``agents`` enrolled devices (tag site=lab), the first ``start`` of them running, v1-v3 pushed."""
    rig = FleetRig(tmp_path / "rig", packages["pub"], database_url=database_url, fleet_processes=processes, front=front)
    try:
        devices = [f"dev-{i}" for i in range(agents)]
        for device in devices:
            rig.enroll(device, tags={"site": "lab"})
        running = devices[: agents if start is None else start]
        rig.start_agents(running)
        rig.wait_online(running)
        for name in ("v1", "v2", "v3_bad"):
            rig.push(packages[name])
        rig.watch_commands()
    except BaseException:
        rig.close()
        raise
    return rig, devices


def spec(version: int, waves: list[Any] | None = None, *, window_s: float = 1.0, **extra: Any) -> dict[str, Any]:
    """A rollout of sensor-net ``version`` to site=lab; ``window_s`` is each device's health window (how long
    a device stays ``commanded``)."""
    return {
        "package": f"sensor-net:{version}@linux-x86_64",
        "waves": waves or ["100%"],
        "tags": {"site": "lab"},
        "deploy": {"health": {"window_s": window_s}},
        **extra,
    }


def poll(read: Callable[[], Any], what: str, timeout: float = 180.0, interval: float = 0.2) -> Any:
    """``wait_for`` that treats an unreachable API (a fleet or its database restarting) as not yet."""

    def attempt() -> Any:
        try:
            return read()
        except (urllib.error.URLError, OSError):
            return None

    return wait_for(attempt, what, timeout, interval)


def in_wave(rig: FleetRig, rollout_id: int, wave: int, state: str = "commanded") -> dict[str, Any]:
    """Wait until the rollout is in ``wave`` with a device in ``state`` there; returns the status then."""

    def there() -> dict[str, Any] | None:
        status = rig.status(rollout_id)
        if status["current_wave"] == wave and status["waves"][wave]["states"].get(state):
            return status
        return None

    return dict(poll(there, f"wave {wave + 1} of rollout {rollout_id} with a {state} device", interval=0.1))


def in_state(rig: FleetRig, rollout_id: int, state: str) -> dict[str, Any]:
    def there() -> dict[str, Any] | None:
        status = rig.status(rollout_id)
        return status if status["state"] == state else None

    return dict(poll(there, f"rollout {rollout_id} {state}"))


def ended(rig: FleetRig, rollout_id: int, timeout: float = 180.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = rig.status(rollout_id)
        return status if status["state"] in ENDED else None

    try:
        return dict(poll(done, f"rollout {rollout_id} ended", timeout, interval=0.5))
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {describe(rig, rollout_id)}") from None


def describe(rig: FleetRig, rollout_id: int) -> str:
    """The rollout as the fleet and the devices see it, for a failure message."""
    try:
        return _describe(rig, rollout_id)
    except Exception as exc:  # the database itself may be what failed
        return f"(no description: {type(exc).__name__}: {exc})"


def _describe(rig: FleetRig, rollout_id: int) -> str:
    lines = []
    for row in rig.query(
        "SELECT state, current_wave, lease_owner, lease_until FROM rollouts WHERE id = :r", r=rollout_id
    ):
        lines.append(f"rollout {row}")
    for device, row in sorted(rig.rollout_devices(rollout_id).items()):
        ota = rig.agent_state(device).get("ota") or {}
        fleet = rig.query("SELECT online, ota_state, ota_deployment, last_seq FROM devices WHERE id = :d", d=device)
        lines.append(
            f"{device}: wave {row['wave']} {row['state']} {row['deployment_id']} sent {row['sent_at']}; "
            f"agent {ota.get('deployment_id')} {ota.get('state')}; fleet sees {fleet}"
        )
    return "\n".join(lines)


def serving_everywhere(rig: FleetRig, devices: list[str], version: int, timeout: float = 60.0) -> None:
    wait_for(lambda: all(rig.serving(d) == version for d in devices), f"v{version} on {devices}", timeout)


def check_commanded_once(
    rig: FleetRig, rollout_id: int, version: int, *, observer_restarted: bool = False
) -> dict[str, dict[str, Any]]:
    """Every device of the rollout that was commanded got one deployment id, for one package, and installed it
    under that id; devices never commanded got no command. Returns the fleet's rows.

    ``observer_restarted``: the broker restarted under the command log too, which may miss a command
    published while its own session comes back; then what it saw must still be the fleet's one id, and
    the agent's own record (it accepted exactly that id) is the proof the device was commanded once."""
    assert rig.commands is not None
    prefix = f"r{rollout_id}-"
    rows = rig.rollout_devices(rollout_id)
    deploys = [c for c in rig.commands.deploys(prefix) if "-revert-" not in c.message["deployment_id"]]
    paths = {c.message["target_path"] for c in deploys}
    assert len(paths) <= 1 and all(p.endswith(f"/v{version}.edgepkg") for p in paths), paths
    for device, row in rows.items():
        sent = {c.message["deployment_id"] for c in deploys if c.device == device}
        seen = [d for d in rig.seen(device, prefix) if "-revert-" not in d]
        if row["deployment_id"] is None:
            assert not sent and not seen, (device, row, sent, seen)
            continue
        if observer_restarted and not sent:
            assert seen == [row["deployment_id"]], (device, row["deployment_id"], seen)
        else:
            assert sent == {row["deployment_id"]}, (device, row["deployment_id"], sent)
        # The agent accepted exactly one deployment of this rollout, the fleet's, whatever was re-sent.
        assert seen in ([], [row["deployment_id"]]), (device, seen)
        if row["state"] == "COMMITTED":
            state = rig.agent_state(device)
            active = state["slots"][state["active"]]
            assert active["version"] == version and active["deployment_id"] == row["deployment_id"], active
    return rows


def audit(rig: FleetRig, action: str) -> list[dict[str, Any]]:
    items = rig.api("GET", f"/api/v1/audit?limit=500&action={action}")["items"]
    return [dict(a) for a in items]


# ----------------------------------------------------------------------------- the fleet process killed


def installing(rig: FleetRig, rollout_id: int, wave: int) -> list[str]:
    """Wait until every device of ``wave`` has its package downloaded and one of them is still in its
    health window (mid-wave); returns the wave's devices."""

    def there() -> list[str] | None:
        rows = [r for r in rig.rollout_devices(rollout_id).values() if r["wave"] == wave]
        states = []
        for row in rows:
            ota = rig.agent_state(row["device_id"]).get("ota") or {}
            if row["deployment_id"] is None or ota.get("deployment_id") != row["deployment_id"]:
                return None
            states.append(ota["state"])
        if rows and set(states) <= {"ACTIVATING", "HEALTH_CHECK", "COMMITTED"} and "HEALTH_CHECK" in states:
            return [r["device_id"] for r in rows]
        return None

    return list(poll(there, f"wave {wave + 1} of rollout {rollout_id} in its health window", interval=0.1))


def test_fleet_killed_mid_wave_resumes_the_rollout_and_commands_each_device_once(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    """SIGKILL while wave 2's devices are in their health window; they finish while no fleet process runs,
    so their outcomes reach the fleet only through its MQTT session kept by the broker. (The kill comes
    after their downloads: this one process is also their package server; the next test covers a
    device that is commanded while it is down.)"""
    rig, devices = new_rig(tmp_path, packages, 6)
    try:
        rollout = rig.rollout(spec(1, [1, 3, "100%"], soak_s=3.0, window_s=3.0))
        second = installing(rig, rollout, 1)
        rig.processes[0].kill()
        wait_for(
            lambda: all((rig.agent_state(d).get("ota") or {}).get("state") == "COMMITTED" for d in second),
            "wave 2 committed on the devices while the fleet is down",
        )
        rig.restart_fleet(0)
        status = ended(rig, rollout)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        assert status["totals"] == {"COMMITTED": len(devices)}, status
        assert [w["devices"] for w in status["waves"]] == [1, 2, 3], status["waves"]
        serving_everywhere(rig, devices, 1)
        check_commanded_once(rig, rollout, 1)
        # Waves were judged exactly once each, across the kill.
        mine = f"rollout/{rollout}"
        judged = [a["details"]["wave"] for a in audit(rig, "rollout.wave_judged") if a["subject"] == mine]
        assert sorted(judged) == [0, 1, 2], judged
    finally:
        rig.close()


def test_device_commanded_while_the_fleet_restarts_waits_for_its_package_server(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    rig, devices = new_rig(tmp_path, packages, 3)
    late = devices[-1]
    try:
        rig.agents[late].stop()  # its persistent session keeps the command for it
        rollout = rig.rollout(spec(1))
        assert rig.commands is not None
        wait_for(lambda: [c for c in rig.commands.deploys(f"r{rollout}-") if c.device == late], "the command")
        wait_for(
            lambda: all(r["state"] == "COMMITTED" for d, r in rig.rollout_devices(rollout).items() if d != late),
            "the running devices committing",
        )
        rig.processes[0].kill()
        rig.start_agents([late])  # it gets the command while the fleet (its package server) is down
        wait_for(lambda: rig.seen(late, f"r{rollout}-"), f"{late} accepting the deployment", 60)
        time.sleep(1.0)
        rig.restart_fleet(0)
        status = ended(rig, rollout)
        assert status["state"] == "completed" and status["totals"] == {"COMMITTED": len(devices)}, (
            status["halt_reason"],
            status["waves"],
            rig.rollout_devices(rollout)[late]["message"],
        )
    finally:
        rig.close()


def test_fleet_killed_between_commit_and_publish_resends_the_same_deployment(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    """The scheduler commits a wave's commands, then publishes them: a process killed in between leaves
    devices ``commanded`` that never heard of it. With the broker down the commands cannot leave the
    process, so a SIGKILL then loses them for sure; the restarted fleet must send them again, under the
    same deployment ids."""
    rig, devices = new_rig(tmp_path, packages, 5)
    try:
        rollout = rig.rollout(spec(1, [1, "100%"], soak_s=4.0))
        in_wave(rig, rollout, 0, state="COMMITTED")
        rig.broker.stop()
        status = in_wave(rig, rollout, 1)  # committed in the database, stuck in the dead broker connection
        second = [d for d, row in rig.rollout_devices(rollout).items() if row["wave"] == 1]
        assert status["waves"][1]["states"] == {"commanded": len(second)}, status["waves"]
        rig.processes[0].kill()
        killed_at = time.time()
        rig.restart_broker()
        rig.restart_fleet(0, down_s=0.0)
        status = ended(rig, rollout)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        assert status["totals"] == {"COMMITTED": len(devices)}, status
        serving_everywhere(rig, devices, 1)
        rows = check_commanded_once(rig, rollout, 1)
        assert rig.commands is not None
        for device in second:
            # The only copies that reached the broker were sent after the kill: the re-sent ones.
            sent = [c for c in rig.commands.deploys(f"r{rollout}-") if c.device == device]
            assert sent and all(c.message["issued_at"] > killed_at for c in sent), sent
            assert rows[device]["state"] == "COMMITTED"
    finally:
        rig.close()


def test_two_fleet_processes_on_postgresql_the_survivor_takes_over_the_lease(
    tmp_path: Path, packages: dict[str, Path], pg_url: str
) -> None:
    # Devices reach the package server through a front (a load balancer), as with several processes in production.
    rig, devices = new_rig(tmp_path, packages, 6, database_url=pg_url, processes=2, front=True)
    try:
        rollout = rig.rollout(spec(1, [1, 3, "100%"], soak_s=3.0, window_s=3.0))
        in_wave(rig, rollout, 1)
        lease = "SELECT lease_owner, lease_until, revision FROM rollouts WHERE id = :r"
        holder = next(p for p in rig.processes if p.owner == rig.query(lease, r=rollout)[0]["lease_owner"])
        survivor = next(p for p in rig.processes if p is not holder)
        holder.kill()
        killed_at = time.time()
        dead = rig.query(lease, r=rollout)[0]
        # The survivor takes the rollout over once the dead process's lease has run out, and works on it:
        # it renews its lease tick after tick, and each tick bumps the rollout's revision.
        taken = wait_for(
            lambda: [r for r in rig.query(lease, r=rollout) if r["lease_owner"] == survivor.owner],
            "the lease taken over",
        )[0]
        assert taken["lease_until"] - rig.scheduler["lease_s"] >= dead["lease_until"], (taken, dead)
        wait_for(
            lambda: [
                r
                for r in rig.query(lease, r=rollout)
                if r["lease_owner"] == survivor.owner
                and r["lease_until"] > taken["lease_until"]
                and r["revision"] > taken["revision"]
            ],
            "the survivor working on the rollout",
        )
        # Restarted (as systemd would), the dead process gets the device messages its MQTT session kept
        # meanwhile (until then the survivor may not hear from some devices: a SIGKILL keeps the session).
        rig.restart_fleet(rig.processes.index(holder))
        status = ended(rig, rollout)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        assert status["totals"] == {"COMMITTED": len(devices)}, status
        serving_everywhere(rig, devices, 1)
        check_commanded_once(rig, rollout, 1)
        judged = [a for a in audit(rig, "rollout.wave_judged") if a["subject"] == f"rollout/{rollout}"]
        assert sorted(a["details"]["wave"] for a in judged) == [0, 1, 2], judged
        # The survivor kept the lease (renewed every tick) after the other came back: it judged what was left.
        after = [a for a in judged if a["at"] > killed_at]
        assert after and {a["actor"] for a in after} == {f"scheduler:{survivor.owner}"}, after
    finally:
        rig.close()


def test_a_fleet_process_stopped_for_good_leaves_no_share_of_device_messages_behind(
    tmp_path: Path, packages: dict[str, Path], pg_url: str
) -> None:
    from edgeship.fleet.db import Database
    from edgeship.fleet.ingest import count_gaps

    rig, devices = new_rig(tmp_path, packages, 2, database_url=pg_url, processes=2)
    try:
        rig.processes[1].stop()  # a clean stop: it wrote everything it had taken
        stopped_at = time.time()
        time.sleep(8.0)  # eight telemetry intervals
        db = Database(pg_url)
        try:
            with db.session(readonly=True) as session:
                gaps = {d: count_gaps(session, d) for d in devices}
        finally:
            db.dispose()
        fresh = rig.query(
            "SELECT device_id, count(*) AS n FROM telemetry WHERE ts > :t GROUP BY device_id", t=stopped_at
        )
        # Every device's telemetry since the stop reached the process left, with no hole in the sequence.
        assert {r["device_id"] for r in fresh} == set(devices) and all(r["n"] >= 4 for r in fresh), fresh
        assert gaps == dict.fromkeys(devices, 0), gaps
    finally:
        rig.close()


# ----------------------------------------------------------------------------- the broker restarted


def test_broker_restarted_mid_rollout_everyone_reconnects_and_the_rollout_completes(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    rig, devices = new_rig(tmp_path, packages, 5)
    try:
        rollout = rig.rollout(spec(1, [1, 3, "100%"], soak_s=2.0, window_s=3.0))
        in_wave(rig, rollout, 1)
        restarted_at = time.time()
        rig.restart_broker()
        status = ended(rig, rollout)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        assert status["totals"] == {"COMMITTED": len(devices)}, status
        serving_everywhere(rig, devices, 1)
        check_commanded_once(rig, rollout, 1, observer_restarted=True)
        # Agents reconnected (online again, telemetry flowing) and so did the fleet's ingest (it stored it).
        rig.wait_online(devices)

        def fresh_telemetry() -> bool:
            rows = rig.query(
                "SELECT device_id, max(ts) AS ts FROM telemetry GROUP BY device_id HAVING max(ts) > :t", t=restarted_at
            )
            return {r["device_id"] for r in rows} == set(devices)

        wait_for(fresh_telemetry, "telemetry from every device after the broker restart", 60)
        # The fleet's commander reconnected too: the last wave was commanded after the restart.
        assert rig.commands is not None
        last = [d for d, row in rig.rollout_devices(rollout).items() if row["wave"] == 2]
        late = [c for c in rig.commands.deploys(f"r{rollout}-") if c.device in last]
        assert late and all(c.message["issued_at"] > restarted_at for c in late), late
    finally:
        rig.close()


# ----------------------------------------------------------------------------- PostgreSQL restarted

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class OwnPostgres:
    """A PostgreSQL server this test starts, restarts and removes (never the machine's own server).

    ``initdb`` refuses to run as root, so the cluster belongs to the ``postgres`` account and lives in a
    directory it owns; the server listens on 127.0.0.1 at a free port, trust authentication.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgeship-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._as_postgres(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def _as_postgres(self, *args: Any) -> str:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, args)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} failed: {result.stdout[-1000:]}{result.stderr[-1000:]}")
        return result.stdout

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-o", options, "-l", self.dir / "log", "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def log(self) -> str:
        try:
            return (self.dir / "log").read_text(errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except AssertionError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists() or shutil.which("runuser") is None:
        pytest.skip(f"PostgreSQL server binaries are not installed ({PG_BIN}/initdb, pg_ctl) or runuser is missing")
    server = OwnPostgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restarted_mid_rollout_nothing_is_lost(
    tmp_path: Path, packages: dict[str, Path], own_postgres: OwnPostgres, mode: str
) -> None:
    from edgeship.fleet.db import Database
    from edgeship.fleet.ingest import count_gaps

    url = own_postgres.create_database("fleet")
    rig, devices = new_rig(tmp_path, packages, 5, database_url=url)
    try:
        rollout = rig.rollout(spec(1, [1, 3, "100%"], soak_s=2.0, window_s=3.0))
        in_wave(rig, rollout, 1)
        own_postgres.stop(mode)  # "immediate" is a crash: no checkpoint, recovery from the WAL on start
        time.sleep(4.0)  # telemetry and the wave's outcomes keep arriving meanwhile
        own_postgres.start()
        back_at = time.time()
        status = ended(rig, rollout)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        assert status["totals"] == {"COMMITTED": len(devices)}, status
        serving_everywhere(rig, devices, 1)
        check_commanded_once(rig, rollout, 1)
        log = rig.processes[0].tail(10_000)
        assert "database write failed" in log, "ingest never had to retry: the outage missed it"

        def caught_up() -> bool:
            rows = rig.query(
                "SELECT device_id, max(ts) AS ts FROM telemetry GROUP BY device_id HAVING max(ts) > :t", t=back_at
            )
            return {r["device_id"] for r in rows} == set(devices)

        wait_for(caught_up, "telemetry stored after the restart from every device", 60)
        # Nothing lost, nothing twice: every device's messages are stored with no gap in their
        # sequence numbers across the outage, one row per (device, seq).
        db = Database(url)
        try:
            with db.session(readonly=True) as session:
                gaps = {d: count_gaps(session, d) for d in devices}
        finally:
            db.dispose()
        assert gaps == dict.fromkeys(devices, 0), gaps
        twice = rig.query(
            "SELECT device_id, seq FROM telemetry GROUP BY device_id, seq HAVING count(*) > 1 "
            "UNION ALL SELECT device_id, seq FROM events GROUP BY device_id, seq HAVING count(*) > 1"
        )
        assert twice == []
        # Every OTA transition the wave reported was stored: each device's deployment is in its events.
        for device, row in rig.rollout_devices(rollout).items():
            states = {
                r["state"]
                for r in rig.query(
                    "SELECT state FROM events WHERE device_id = :d AND deployment_id = :dep",
                    d=device,
                    dep=row["deployment_id"],
                )
            }
            assert "COMMITTED" in states, (device, states)
    finally:
        rig.close()


# ----------------------------------------------------------------------------- an agent offline


def test_agent_offline_for_the_whole_wave_times_out_without_blocking_and_is_consistent_when_back(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    # dev-4 is enrolled and never started; dev-3 gets v1, then stops before the v2 rollout.
    rig, devices = new_rig(tmp_path, packages, 5, start=4)
    never, stopped = "dev-4", "dev-3"
    try:
        first = rig.rollout(spec(1, [2, "100%"], device_timeout_s=20.0))
        status = ended(rig, first)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        assert status["totals"] == {"COMMITTED": 4, "timed_out": 1}, status
        serving_everywhere(rig, devices[:4], 1)
        detail = rig.api("GET", f"/api/v1/devices/{never}")
        assert detail["rollouts"][0]["device_state"] == "timed_out" and detail["rollouts"][0]["code"] == "timeout"

        rig.agents[stopped].stop()
        wait_for(lambda: not rig.api("GET", f"/api/v1/devices/{stopped}")["online"], f"{stopped} reported offline", 60)
        second = rig.rollout(spec(2, [2, "100%"], device_timeout_s=15.0))
        status = ended(rig, second)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        assert status["totals"] == {"COMMITTED": 3, "timed_out": 2}, status
        online = [d for d in devices if d not in (never, stopped)]
        serving_everywhere(rig, online, 2)
        rows = check_commanded_once(rig, second, 2)
        assert rows[stopped]["state"] == rows[never]["state"] == "timed_out", rows

        # Both come back after the rollout ended. The stopped one's MQTT session kept the command (re-sent
        # while it was away, each copy valid for max(device_timeout_s, 60) s): it carries it out late, and
        # the fleet records the outcome instead of the timeout. The never-started one had no session, so
        # nothing was kept for it: it stays as it was.
        rig.start_agents([stopped, never])
        rig.wait_online([stopped, never])
        wait_for(lambda: rig.rollout_devices(second)[stopped]["state"] == "COMMITTED", f"{stopped} late outcome", 90)
        assert rig.seen(stopped, f"r{second}-") == [rows[stopped]["deployment_id"]]
        assert rig.seen(never) == [] and rig.rollout_devices(second)[never]["state"] == "timed_out"
        # Neither is left half-updated: no deployment in progress, it serves what its active slot holds,
        # and the fleet reports that version.
        for device, version in ((stopped, 2), (never, None)):
            state = rig.agent_state(device)
            assert state.get("ota") is None or state["ota"]["state"] in ("COMMITTED", "FAILED", "ROLLED_BACK"), state
            active = state["slots"][state["active"]] if state.get("active") else None
            assert rig.serving(device) == version == (active["version"] if active else None), (device, state)
            wait_for(
                lambda device=device, version=version: (
                    (rig.api("GET", f"/api/v1/devices/{device}")["model"] or {}).get("version") == version
                ),
                f"the fleet reporting what {device} serves",
                60,
            )
    finally:
        rig.close()


# ----------------------------------------------------------------------------- a worse v2: golden vectors


def test_package_failing_its_golden_vectors_halts_in_the_first_wave_and_nothing_is_reverted(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    rig, devices = new_rig(tmp_path, packages, 5)
    try:
        first = rig.rollout(spec(1))
        assert ended(rig, first)["state"] == "completed"
        serving_everywhere(rig, devices, 1)

        bad = rig.rollout(spec(3, ["20%", "60%", "100%"]))
        status = ended(rig, bad)
        assert status["state"] == "rolled_back", status
        assert "install_failure_rate" in (status["halt_reason"] or ""), status
        assert status["halt_reason"].startswith("wave 1:"), status["halt_reason"]
        waves = status["waves"]
        assert waves[0]["states"] == {"FAILED": waves[0]["devices"]} and waves[0]["devices"] >= 1, waves
        assert all(set(w["states"]) == {"skipped"} for w in waves[1:]), waves
        rows = rig.rollout_devices(bad)
        first_wave = [d for d, r in rows.items() if r["wave"] == 0]
        assert all(rows[d]["code"] == "golden_failed" for d in first_wave), rows
        assert all(r["revert_deployment_id"] is None for r in rows.values()), rows
        # Nothing needed reverting: no revert command was sent, no agent saw one, later waves got nothing.
        assert rig.commands is not None
        assert rig.commands.deploys(f"r{bad}-revert-") == []
        assert all(rig.seen(d, f"r{bad}-revert-") == [] for d in devices)
        check_commanded_once(rig, bad, 3)
        serving_everywhere(rig, devices, 1)
        for device in devices:
            state = rig.agent_state(device)
            assert state["slots"][state["active"]]["version"] == 1, state
            if device in first_wave:
                assert state["ota"]["state"] == "FAILED" and state["ota"]["code"] == "golden_failed", state["ota"]
    finally:
        rig.close()


# ----------------------------------------------------------------------------- by hand


def test_approval_holds_each_wave_until_approved(tmp_path: Path, packages: dict[str, Path]) -> None:
    rig, devices = new_rig(tmp_path, packages, 5)
    try:
        rollout = rig.rollout(spec(1, [1, 3, "100%"], require_approval=True))
        for wave in (0, 1):
            status = in_state(rig, rollout, "waiting_approval")
            assert status["current_wave"] == wave, status
            assert set(status["waves"][wave]["states"]) == {"COMMITTED"}, status["waves"]
            later = [d for d, r in rig.rollout_devices(rollout).items() if r["wave"] > wave]
            time.sleep(2.0)  # a few scheduler ticks: nothing moves without the approval
            assert rig.status(rollout)["state"] == "waiting_approval"
            rows = rig.rollout_devices(rollout)
            assert all(rows[d]["state"] == "pending" for d in later), rows
            assert rig.commands is not None
            assert not [c for c in rig.commands.deploys(f"r{rollout}-") if c.device in later]
            rig.api("POST", f"/api/v1/rollouts/{rollout}/approve")
        status = ended(rig, rollout)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        serving_everywhere(rig, devices, 1)
        check_commanded_once(rig, rollout, 1)
        approvals = [a for a in audit(rig, "rollout.approve") if a["subject"] == f"rollout:{rollout}"]
        assert len(approvals) == 2 and all(a["actor"].startswith("token:") for a in approvals), approvals
        # Approving a rollout that is not waiting is refused.
        with pytest.raises(urllib.error.HTTPError) as refused:
            rig.api("POST", f"/api/v1/rollouts/{rollout}/approve")
        assert refused.value.code == 409
    finally:
        rig.close()


def test_pause_resume_by_hand_and_abort_stops_commanding(tmp_path: Path, packages: dict[str, Path]) -> None:
    rig, devices = new_rig(tmp_path, packages, 5)
    assert rig.commands is not None
    try:
        rollout = rig.rollout(spec(1, [1, 3, "100%"], soak_s=1.0, window_s=2.0))
        in_wave(rig, rollout, 1)
        rig.api("POST", f"/api/v1/rollouts/{rollout}/pause")
        # Devices already commanded finish; the rollout does not go on to wave 3.
        second = [d for d, r in rig.rollout_devices(rollout).items() if r["wave"] == 1]
        third = [d for d, r in rig.rollout_devices(rollout).items() if r["wave"] == 2]
        wait_for(
            lambda: all(rig.rollout_devices(rollout)[d]["state"] == "COMMITTED" for d in second),
            "wave 2 finished while paused",
        )
        time.sleep(3.0)  # well past the soak: a running rollout would have commanded wave 3 by now
        status = rig.status(rollout)
        assert status["state"] == "paused" and status["current_wave"] == 1, status
        assert not [c for c in rig.commands.deploys(f"r{rollout}-") if c.device in third]
        assert all(rig.rollout_devices(rollout)[d]["state"] == "pending" for d in third)
        rig.api("POST", f"/api/v1/rollouts/{rollout}/resume")
        status = ended(rig, rollout)
        assert status["state"] == "completed", (status["halt_reason"], status["waves"])
        serving_everywhere(rig, devices, 1)
        check_commanded_once(rig, rollout, 1)

        # Abort while the first wave installs: it finishes (devices keep what they run), the rest is never commanded.
        aborted = rig.rollout(spec(2, [1, "100%"], window_s=3.0))
        in_wave(rig, aborted, 0)
        rig.api("POST", f"/api/v1/rollouts/{aborted}/abort", {"reason": "enough"})
        status = rig.status(aborted)
        assert status["state"] == "aborted" and "enough" in status["halt_reason"], status
        rows = rig.rollout_devices(aborted)
        first = [d for d, r in rows.items() if r["wave"] == 0]
        rest = [d for d, r in rows.items() if r["wave"] == 1]
        wait_for(lambda: rig.rollout_devices(aborted)[first[0]]["state"] == "COMMITTED", "the first wave finishing")
        time.sleep(3.0)  # a running rollout would have commanded the rest by now (no soak)
        assert rig.status(aborted)["state"] == "aborted"
        assert all(rig.rollout_devices(aborted)[d]["state"] == "pending" for d in rest)
        assert not [c for c in rig.commands.deploys(f"r{aborted}-") if c.device in rest]
        serving_everywhere(rig, first, 2)
        serving_everywhere(rig, rest, 1)
        with pytest.raises(urllib.error.HTTPError) as refused:
            rig.api("POST", f"/api/v1/rollouts/{aborted}/resume")
        assert refused.value.code == 409
    finally:
        rig.close()
