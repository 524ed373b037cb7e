"""A fleet of simulated devices against the real fleet service: mosquitto with one account per device (bulk
enrollment) and the ACL, ``FleetService`` (scheduler + ingest) on PostgreSQL, the fleet API serving TUF,
and ``edgeship.fleet.simulator`` speaking the agent's protocol. A rollout in waves 1/10/50/100% reaches
every device; a version whose latency breaches the gate is halted in its first wave and rolled back.

Size: ``EDGESHIP_SIM_DEVICES`` (default 1000, what the issue asks of CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from edgeship.device_agent import protocol
from edgeship.errors import ConflictError, UsageError
from edgeship.fleet import enrollment, rollouts
from edgeship.fleet.broker import Mosquitto, password_file_users, write_broker_config
from edgeship.fleet.enrollment import DeviceImport, enroll_many, read_device_csv
from edgeship.fleet.models import Audit, Device, Event, RolloutDevice, Telemetry
from edgeship.fleet.packages import push_package
from edgeship.fleet.service import FleetService
from edgeship.fleet.simulator import (
    Behaviour,
    DeviceSpec,
    ModelBehaviour,
    PackageInfo,
    Simulator,
    package_from_path,
    with_version,
)
from tests.brokers import Probe
from tests.fleet.fleet_fixtures import ApiServer, fleet_settings, open_fleet
from tests.package_fixtures import Publisher

pytestmark = pytest.mark.slow

DEVICES = int(os.environ.get("EDGESHIP_SIM_DEVICES", "1000"))
WAIT = 120.0
ENDED = ("completed", "rolled_back", "aborted")


@dataclass
class SimRig:
    broker: Mosquitto
    service: FleetService
    api: ApiServer
    packages: dict[int, Path]
    credentials: dict[str, str]

    @property
    def ctx(self) -> Any:
        return self.service.ctx

    def push(self, version: int) -> None:
        push_package(self.ctx, self.packages[version], "test")

    def simulator(self, behaviour: Behaviour, model: PackageInfo | None) -> Simulator:
        assert self.broker.port is not None
        specs = [DeviceSpec(d, p, model=model) for d, p in self.credentials.items()]
        return Simulator(
            "f1",
            "127.0.0.1",
            self.broker.port,
            specs,
            behaviour=behaviour,
            metadata_url=f"{self.api.url}/tuf/metadata/",
        )

    def query(self, statement: Any) -> Any:
        with self.ctx.db.session(readonly=True) as session:
            return session.execute(statement).all()


@pytest.fixture
def rig(tmp_path: Path, publisher: Publisher, pg_url: str, make_package: Callable[..., Path]) -> Iterator[SimRig]:
    fleet_password = uuid.uuid4().hex
    # Saved every 100,000 changes, not after each one: with autosave_interval 1 mosquitto rewrote its whole
    # database (1,000 sessions) for every retained status and queued command, and a clean stop of the
    # devices took minutes (docs/broker.md: what each setting costs).
    files = write_broker_config(tmp_path / "broker", "f1", {}, fleet_password, autosave_interval=100_000)
    broker = Mosquitto.start(files.directory, files)
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(str(broker.pid))
    (tmp_path / "fleet-password").write_text(fleet_password)
    settings = fleet_settings(
        tmp_path,
        publisher,
        pg_url,
        broker={
            "url": f"mqtt://127.0.0.1:{broker.port}",
            "password_file": str(tmp_path / "fleet-password"),
            "accounts_file": str(files.password_file),
            "pid_file": str(pid_file),
        },
        scheduler={"tick_s": 0.3, "lease_s": 10, "resend_after_s": 20},
    )
    open_fleet(settings).close()
    service = FleetService(settings, instance="sim-test")
    service.start()
    api = ApiServer(service.ctx).start()
    packages = {v: make_package(name="sensor-net", version=v) for v in (1, 2, 3)}
    rows = [DeviceImport(f"sim-{i:05d}", "linux-x86_64", {"site": "lab"}) for i in range(DEVICES)]
    started = time.monotonic()
    bundles = enroll_many(service.ctx, rows, actor="test")
    print(f"enrolled {len(bundles)} devices in {time.monotonic() - started:.2f} s")
    broker.reload()
    credentials = {b.device_id: b.broker["password"] for b in bundles}
    try:
        yield SimRig(broker, service, api, packages, credentials)
    finally:
        api.stop()
        service.stop()
        broker.stop()


def wait_rollout(rig: SimRig, rollout_id: int, timeout: float = WAIT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = rollouts.status(rig.ctx, rollout_id)
        if status["state"] in ENDED:
            return status
        time.sleep(0.5)
    raise AssertionError(
        f"rollout {rollout_id} did not end within {timeout:g} s: {rollouts.status(rig.ctx, rollout_id)}"
    )


async def run_with(sim: Simulator, work: Callable[[], Any]) -> Any:
    """Start the simulated devices, run the blocking ``work`` in a thread beside them, stop them."""
    await sim.start(timeout=WAIT)
    try:
        return await asyncio.to_thread(work)
    finally:
        await sim.stop()


def wait_ingested(rig: SimRig, sim: Simulator, timeout: float = 60.0) -> tuple[int, int]:
    """Wait until the database holds every telemetry and event message the devices sent; return the counts."""
    sent = sim.counts()
    deadline = time.monotonic() + timeout
    while True:
        ((telemetry,),) = rig.query(select(func.count()).select_from(Telemetry))
        ((events,),) = rig.query(select(func.count()).select_from(Event))
        if (telemetry, events) == (sent["telemetry"], sent["events"]) or time.monotonic() > deadline:
            return telemetry, events
        time.sleep(0.5)


def initial_model(rig: SimRig) -> PackageInfo:
    rig.push(1)
    path = "sensor-net/linux-x86_64/fp32/v1.edgepkg"
    info = asyncio.run(Simulator("f1", "x", 0, [], metadata_url=f"{rig.api.url}/tuf/metadata/").resolve(path))
    assert info is not None and info.version == 1 and info.digest != package_from_path(path).digest
    return info


def test_rollout_in_waves_reaches_every_simulated_device(rig: SimRig) -> None:
    v1 = initial_model(rig)
    rig.push(2)
    sim = rig.simulator(Behaviour(telemetry_s=5.0, install_s=1.0), v1)

    def roll_out() -> dict[str, Any]:
        # Devices report v1 (birth and telemetry) before the rollout: it records v1 as where they come from.
        deadline = time.monotonic() + WAIT
        while rig.query(select(func.count()).select_from(Device).where(Device.model_version == 1))[0][0] < DEVICES:
            assert time.monotonic() < deadline, "devices did not report v1"
            time.sleep(0.3)
        spec = {"package": "sensor-net:2@linux-x86_64", "waves": ["1%", "10%", "50%", "100%"], "soak_s": 0}
        rollout = rollouts.create_rollout(rig.ctx, spec, "test")
        started = time.monotonic()
        status = wait_rollout(rig, rollout.id)
        status["elapsed_s"] = time.monotonic() - started
        return status

    status = asyncio.run(run_with(sim, roll_out))
    print(f"{DEVICES} simulated devices: rollout completed in {status['elapsed_s']:.1f} s")
    assert status["state"] == "completed", status
    assert status["totals"] == {"COMMITTED": DEVICES}, status
    assert len(status["waves"]) == 4 and status["waves"][0]["devices"] == max(1, DEVICES // 100), status
    # Every device ran the deployment once (deploys are idempotent; a re-send is answered "duplicate").
    assert sim.outcomes("r") == {"COMMITTED": DEVICES}
    assert all(d.model is not None and d.model.version == 2 for d in sim.devices.values())
    rows = rig.query(select(RolloutDevice.deployment_id).where(RolloutDevice.rollout_id == status["id"]))
    assert len({r[0] for r in rows}) == DEVICES
    # Every message the devices sent is stored once; no sequence gaps.
    sent = sim.counts()
    assert wait_ingested(rig, sim) == (sent["telemetry"], sent["events"])
    ((gaps,),) = rig.query(
        text(
            "SELECT coalesce(sum(hi - lo + 1 - n), 0) FROM (SELECT device_id, min(seq) lo, max(seq) hi, count(*) n "
            "FROM (SELECT device_id, seq FROM telemetry UNION ALL SELECT device_id, seq FROM events) s "
            "GROUP BY device_id) g"
        )
    )
    assert gaps == 0
    # The clean stop's offline status reached the registry for every device.
    deadline = time.monotonic() + 60
    while rig.query(select(func.count()).select_from(Device).where(Device.online.is_(False)))[0][0] < DEVICES:
        assert time.monotonic() < deadline, "not every device is offline after the simulator stopped"
        time.sleep(0.3)


def test_slow_version_is_halted_in_the_first_wave_and_rolled_back(rig: SimRig) -> None:
    v1 = initial_model(rig)
    rig.push(2)
    rig.push(3)
    # v2 is ten times slower at p99 on every device: only the fleet's latency gate can tell.
    behaviour = with_version(Behaviour(telemetry_s=1.0, install_s=0.5), 2, ModelBehaviour(p50_ms=4.0, p99_ms=60.0))
    sim = rig.simulator(behaviour, v1)

    def roll_out() -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while rig.query(select(func.count()).select_from(Device).where(Device.model_version == 1))[0][0] < DEVICES:
            assert time.monotonic() < deadline, "devices did not report v1"
            time.sleep(0.3)
        spec = {
            "package": "sensor-net:2@linux-x86_64",
            "waves": ["1%", "10%", "50%", "100%"],
            "soak_s": 4.0,
            "gates": {"max_latency_p99_ratio": 2.0},
        }
        rollout = rollouts.create_rollout(rig.ctx, spec, "test")
        status = wait_rollout(rig, rollout.id)
        # Wait for the devices to report the version they went back to.
        while rig.query(select(func.count()).select_from(Device).where(Device.model_version == 1))[0][0] < DEVICES:
            assert time.monotonic() < deadline + WAIT, "devices did not report v1 again"
            time.sleep(0.3)
        return status

    status = asyncio.run(run_with(sim, roll_out))
    assert status["state"] == "rolled_back", status
    assert "latency_p99_ratio" in status["halt_reason"] and status["halt_reason"].startswith("wave 1"), status
    first, *later = status["waves"]
    assert first["states"] == {"reverted": max(1, DEVICES // 100)}, status
    assert all(set(w["states"]) == {"skipped"} for w in later), status
    # The first wave went to v2 and back to v1 (with the fleet's signed downgrade permission); no other device moved.
    assert all(d.model is not None and d.model.version == 1 for d in sim.devices.values())
    assert sim.outcomes(f"r{status['id']}-revert-") == {"COMMITTED": first["devices"]}
    assert sim.outcomes() == {"COMMITTED": 2 * first["devices"]}
    halted = rig.query(select(Audit.action).where(Audit.action == "rollout.halted"))
    assert len(halted) == 1


# --------------------------------------------------------------------------- bulk enrollment, small


def test_bulk_enrollment_gives_each_device_its_own_account_and_one_reload(
    tmp_path: Path, publisher: Publisher, sqlite_url: str
) -> None:
    files = write_broker_config(tmp_path / "broker", "f1", {}, "fleet-pw")
    broker = Mosquitto.start(files.directory, files)
    try:
        pid_file = tmp_path / "mosquitto.pid"
        pid_file.write_text(str(broker.pid))
        settings = fleet_settings(
            tmp_path,
            publisher,
            sqlite_url,
            broker={"accounts_file": str(files.password_file), "pid_file": str(pid_file)},
        )
        ctx = open_fleet(settings)
        try:
            csv_file = tmp_path / "devices.csv"
            csv_file.write_text("device_id,target,tags\ncam-1,linux-x86_64,site=a;hw=r2\ncam-2,linux-x86_64,\n")
            reloads = broker.log_text().count("Reloading config")
            bundles = enroll_many(ctx, read_device_csv(csv_file), actor="test")
            assert [b.device_id for b in bundles] == ["cam-1", "cam-2"]
            assert bundles[0].tags == {"site": "a", "hw": "r2"}
            assert password_file_users(files.password_file) == ["fleet-f1", "cam-1", "cam-2"]
            # One reload for the whole import, not one per device, plus enrollment's follow-up.
            follow_up = enrollment._follow_ups.get(pid_file)
            assert follow_up is not None
            follow_up.join(timeout=10)
            deadline = time.monotonic() + 10
            while broker.log_text().count("Reloading config") < reloads + 2:
                assert time.monotonic() < deadline, "the broker was not reloaded"
                time.sleep(0.05)
            assert broker.log_text().count("Reloading config") == reloads + 2
            # Each device logs in with its own password and reaches only its own topics.
            assert broker.port is not None
            pw = {b.device_id: b.broker["password"] for b in bundles}
            with Probe("127.0.0.1", broker.port, username="cam-1", password=pw["cam-1"]) as cam1:
                assert not cam1.connect().is_failure
                assert not cam1.publish("edgeship/v1/f1/cam-1/telemetry", b"{}").is_failure
            with Probe("127.0.0.1", broker.port, username="cam-2", password=pw["cam-1"]) as wrong:
                assert wrong.connect().is_failure
            with Probe("127.0.0.1", broker.port, username="cam-2", password=pw["cam-2"]) as cam2:
                assert not cam2.connect().is_failure
                assert cam2.publish("edgeship/v1/f1/cam-1/telemetry", b"{}").value == 0x87
            # A second import naming an enrolled device, or a bad row, changes nothing.
            before = files.password_file.read_bytes()
            with pytest.raises(ConflictError, match="cam-2"):
                enroll_many(
                    ctx,
                    [DeviceImport("cam-3", "linux-x86_64", {}), DeviceImport("cam-2", "linux-x86_64", {})],
                    actor="t",
                )
            with pytest.raises(UsageError, match="device 2"):
                enroll_many(
                    ctx,
                    [DeviceImport("cam-4", "linux-x86_64", {}), DeviceImport("cam 5", "linux-x86_64", {})],
                    actor="t",
                )
            with pytest.raises(UsageError, match="listed twice"):
                enroll_many(ctx, [DeviceImport("cam-6", "linux-x86_64", {})] * 2, actor="t")
            assert files.password_file.read_bytes() == before
            with ctx.db.session(readonly=True) as session:
                assert sorted(session.scalars(select(Device.id))) == ["cam-1", "cam-2"]
                assert (
                    session.scalar(select(func.count()).select_from(Audit).where(Audit.action == "device.enroll")) == 2
                )
        finally:
            ctx.close()
    finally:
        broker.stop()


# --------------------------------------------------------------------------- one device's protocol, small


def run_devices(broker: Mosquitto, behaviour: Behaviour, work: Callable[[Simulator], Any], n: int = 2) -> Any:
    assert broker.port is not None
    v1 = package_from_path("net/linux-x86_64/fp32/v1.edgepkg")
    sim = Simulator(
        "f1", "127.0.0.1", broker.port, [DeviceSpec(f"d{i}", model=v1) for i in range(n)], behaviour=behaviour
    )

    async def main() -> Any:
        await sim.start(timeout=30)
        try:
            return await asyncio.to_thread(work, sim)
        finally:
            await sim.stop()

    return asyncio.run(main())


def device_events(probe: Probe, device: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        events = [json.loads(m.payload) for m in probe.received() if m.topic.endswith(f"/{device}/events")]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_failed_validation_is_answered_with_the_agents_event_sequence(mosquitto: Mosquitto) -> None:
    bad = with_version(Behaviour(install_s=0.2), 2, ModelBehaviour(failure_rate=1.0, failure_code="golden_mismatch"))
    assert mosquitto.port is not None
    with Probe("127.0.0.1", mosquitto.port) as probe:
        probe.connect()
        probe.subscribe("edgeship/v1/f1/+/events")

        def deploy_twice(sim: Simulator) -> list[dict[str, Any]]:
            command = protocol.deploy_command("c1", "dep-1", "net/linux-x86_64/fp32/v2.edgepkg", time.time())
            probe.publish("edgeship/v1/f1/d0/cmd", protocol.encode(command))
            assert len(device_events(probe, "d0", 6)) == 6  # the deployment ended FAILED
            probe.publish("edgeship/v1/f1/d0/cmd", protocol.encode(command))  # the same deployment again
            return device_events(probe, "d0", 7)

        events = run_devices(mosquitto, bad, deploy_twice)
    for message in events:
        protocol.check(message)
    assert [(e["event"], e["state"], e.get("code")) for e in events] == [
        ("ota.transition", "DOWNLOADING", None),
        ("ota.transition", "VERIFYING", None),
        ("ota.transition", "STAGED", None),
        ("ota.transition", "VALIDATING", None),
        ("ota.error", "FAILED", "golden_mismatch"),
        ("ota.transition", "FAILED", "golden_mismatch"),
        ("ota.transition", "FAILED", "duplicate"),
    ]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert events[5]["previous_state"] == "VALIDATING" and events[5]["details"] == {"name": "net", "version": 2}


def test_a_device_going_offline_leaves_its_will_and_comes_back(mosquitto: Mosquitto) -> None:
    flaky = Behaviour(telemetry_s=0.3, offline_rate=1.0, offline_s=1.0)
    assert mosquitto.port is not None
    with Probe("127.0.0.1", mosquitto.port) as probe:
        probe.connect()
        probe.subscribe("edgeship/v1/f1/d0/status")

        def watch(sim: Simulator) -> list[str]:
            deadline = time.monotonic() + 20
            while True:
                states = [json.loads(m.payload)["state"] for m in probe.received() if m.payload]
                if states[-3:] == ["online", "offline", "online"] or time.monotonic() > deadline:
                    return states
                time.sleep(0.05)

        states = run_devices(mosquitto, flaky, watch, n=1)
    assert states[-3:] == ["online", "offline", "online"], states
