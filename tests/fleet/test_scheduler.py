"""The scheduler on a real database (SQLite file; the PostgreSQL run is in the end-to-end tests):
waves advance exactly once across competing processes, stuck devices time out, a breached gate
halts the rollout and sends the wave back to the version it had, with the fleet's signed permission.

Device outcomes reach the database the way they do in production: as protocol event messages
through the ingest writer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from edgeship.device_agent import protocol
from edgeship.fleet.ingest import Counters, Incoming, Writer
from edgeship.fleet.models import Base, Device, DeviceQuarantine, Package, Rollout, RolloutDevice, Telemetry
from edgeship.fleet.rollout_logic import assign_waves, parse_waves
from edgeship.fleet.scheduler import Command, Scheduler, deploy_message
from edgeship.fleet.tuf_repo import TufRepository

FLEET = "f1"


class Fleet:
    def __init__(self, tmp: Path, devices: int = 10) -> None:
        self.engine = create_engine(f"sqlite:///{tmp / 'fleet.db'}")
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine)
        self.repo = TufRepository.create(tmp / "repo", keys_dir=tmp / "keys")
        self.sent: list[Command] = []
        self.writer = Writer(self.engine, self.sessions, FLEET, Counters())
        self.seq: dict[str, int] = {}
        blob = tmp / "blob"
        blob.write_bytes(b"x" * 100)
        with self.sessions() as s:
            for version in (1, 2):
                path = f"m/linux-x86_64/fp32/v{version}.edgepkg"
                self.repo.add_target(path, blob, {"edgeship": {"name": "m", "version": version, "downgrade_from": []}})
                s.add(
                    Package(
                        id=version,
                        name="m",
                        version=version,
                        target="linux-x86_64",
                        format="onnx",
                        precision="fp32",
                        manifest_sha256="0" * 64,
                        size=100,
                        target_path=path,
                        storage_key=path,
                        pushed_at=0,
                        pushed_by="t",
                    )
                )
            for i in range(devices):
                s.add(
                    Device(
                        id=f"d{i:02}",
                        target="linux-x86_64",
                        tags={"site": "a"},
                        enrolled_at=0,
                        model_name="m",
                        model_version=1,
                    )
                )
            s.commit()

    def scheduler(self, owner: str, **kw: Any) -> Scheduler:
        return Scheduler(self.sessions, self.sent.extend, repo=self.repo, owner=owner, **kw)

    def rollout(self, waves=("10%", "50%", "100%"), gates=None, soak_s=0.0, timeout_s=60.0) -> int:
        with self.sessions() as s:
            r = Rollout(
                name="r",
                package_id=2,
                selector={},
                waves=list(waves),
                soak_s=soak_s,
                device_timeout_s=timeout_s,
                gates=gates or {},
                created_at=0,
                created_by="t",
                updated_at=0,
            )
            s.add(r)
            s.flush()
            ids = s.scalars(select(Device.id)).all()
            for device, wave in assign_waves(ids, parse_waves(list(waves)), f"rollout-{r.id}").items():
                s.add(RolloutDevice(rollout_id=r.id, device_id=device, wave=wave, previous_package_id=1))
            s.commit()
            return r.id

    def report(self, command: Command, state: str, code: str | None = None) -> None:
        """The device answers a command with its OTA outcome, over the real protocol path."""
        seq = self.seq.get(command.device_id, 0)
        self.seq[command.device_id] = seq + 1
        event = protocol.event(
            FLEET,
            command.device_id,
            seq,
            time.time(),
            "ota.transition",
            deployment_id=command.deployment_id,
            state=state,
            code=code,
        )
        self.writer.write(
            [Incoming(f"edgeship/v1/{FLEET}/{command.device_id}/events", protocol.encode(event), time.time())]
        )

    def rows(self, rollout_id: int) -> dict[str, RolloutDevice]:
        with self.sessions() as s:
            return {
                r.device_id: r for r in s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))
            }

    def get(self, rollout_id: int) -> Rollout:
        with Session(self.engine) as s:
            r = s.get(Rollout, rollout_id)
            assert r is not None
            s.expunge(r)
            return r


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def drive(
    fleet: Fleet, schedulers: list[Scheduler], rollout_id: int, outcome: Any = "COMMITTED", rounds: int = 20
) -> None:
    """Tick the schedulers in turn; every device answers each new command with ``outcome(device)``."""
    answered: set[str] = set()
    for i in range(rounds):
        schedulers[i % len(schedulers)].tick()
        for command in list(fleet.sent):
            if command.deployment_id in answered:
                continue
            answered.add(command.deployment_id)
            state = outcome(command) if callable(outcome) else outcome
            if state is not None:
                fleet.report(command, state)
        if fleet.get(rollout_id).state in ("completed", "rolled_back", "aborted"):
            return


def test_waves_run_in_order_to_completion(fleet: Fleet):
    rid = fleet.rollout()
    drive(fleet, [fleet.scheduler("a")], rid)
    rollout = fleet.get(rid)
    assert rollout.state == "completed"
    assert all(r.state == "COMMITTED" for r in fleet.rows(rid).values())
    waves = [fleet.rows(rid)[c.device_id].wave for c in fleet.sent]
    assert waves == sorted(waves)  # no device of wave k+1 before every device of wave k


def test_two_processes_command_every_device_exactly_once(fleet: Fleet):
    rid = fleet.rollout()
    drive(fleet, [fleet.scheduler("a", lease_s=0.0), fleet.scheduler("b", lease_s=0.0)], rid)
    assert fleet.get(rid).state == "completed"
    deployments = [c.deployment_id for c in fleet.sent]
    assert len(deployments) == len(set(deployments)) == 10


def test_a_lease_keeps_other_processes_out_until_it_expires(fleet: Fleet):
    fleet.rollout()
    a, b = fleet.scheduler("a", lease_s=3600), fleet.scheduler("b", lease_s=3600)
    assert a.tick() == 1 and b.tick() == 0  # b cannot touch a's rollout
    a.release()  # a stops cleanly (or its lease runs out)
    assert b.tick() == 1


def test_a_device_that_never_answers_times_out_without_blocking_the_wave(fleet: Fleet):
    rid = fleet.rollout(waves=["100%"], timeout_s=0.0)
    silent = "d03"
    scheduler = fleet.scheduler("a")
    drive(fleet, [scheduler], rid, outcome=lambda c: None if c.device_id == silent else "COMMITTED", rounds=3)
    time.sleep(0.01)
    scheduler.tick()
    rows = fleet.rows(rid)
    assert rows[silent].state == "timed_out" and fleet.get(rid).state == "completed"


def test_a_wave_that_breaches_a_gate_is_halted_and_sent_back(fleet: Fleet):
    rid = fleet.rollout(waves=["30%", "100%"], gates={"max_install_failure_rate": 0.2})
    first_wave = {d for d, r in fleet.rows(rid).items() if r.wave == 0}
    failing = sorted(first_wave)[:2]  # 2 of 3 fail validation on the device; 1 commits
    drive(
        fleet,
        [fleet.scheduler("a")],
        rid,
        outcome=lambda c: "FAILED" if c.device_id in failing else "COMMITTED",
        rounds=6,
    )
    rollout = fleet.get(rid)
    assert rollout.state == "rolled_back", rollout.state
    assert "install_failure_rate" in (rollout.halt_reason or "")
    rows = fleet.rows(rid)
    committed = [d for d in first_wave if d not in failing]
    # The device that committed v2 was sent back to v1 with a revert deployment, and reverted.
    reverts = [c for c in fleet.sent if "revert" in c.deployment_id]
    assert [c.device_id for c in reverts] == committed and reverts[0].target_path.endswith("v1.edgepkg")
    assert rows[committed[0]].state == "reverted"
    # Later waves were never commanded; the wave's devices may never get v2 again.
    assert all(rows[d].state == "skipped" for d in rows if d not in first_wave)
    with fleet.sessions() as s:
        assert {q.device_id for q in s.scalars(select(DeviceQuarantine))} == first_wave
    # The fleet signed the way down: v1's TUF entry now allows devices on v2 to install it.
    assert fleet.repo.list_targets()["m/linux-x86_64/fp32/v1.edgepkg"].custom["edgeship"]["downgrade_from"] == [2]


def test_unanswered_commands_are_sent_again_with_the_same_deployment_id(fleet: Fleet):
    fleet.rollout(waves=["100%"])
    scheduler = fleet.scheduler("a", resend_after_s=0.0)
    scheduler.tick()
    first = {c.device_id: c.deployment_id for c in fleet.sent}
    time.sleep(0.01)
    scheduler.tick()
    again = [c for c in fleet.sent[len(first) :]]
    assert again and all(first[c.device_id] == c.deployment_id for c in again)


def test_a_device_that_enrolls_during_the_rollout_gets_its_version(fleet: Fleet):
    rid = fleet.rollout(waves=["100%"])
    scheduler = fleet.scheduler("a")
    scheduler.tick()
    with fleet.sessions() as s:
        s.add(Device(id="late", target="linux-x86_64", tags={}, enrolled_at=1))
        s.add(Device(id="phone", target="android-arm64", tags={}, enrolled_at=1))  # not compatible
        s.commit()
    drive(fleet, [scheduler], rid)
    rows = fleet.rows(rid)
    assert rows["late"].state == "COMMITTED" and "phone" not in rows


def test_deploy_messages_follow_the_protocol():
    command = Command("d1", "r1-d1", "m/t/p/v2.edgepkg", {"health": {"window_s": 5}}, 600)
    parsed = protocol.parse(deploy_message(command, time.time()), expected=protocol.COMMAND_TYPES)
    assert parsed["deployment_id"] == "r1-d1" and parsed["expires_at"] > parsed["issued_at"]


def test_a_wave_whose_failures_already_breach_its_gate_halts_before_the_rest_answer(fleet: Fleet):
    rid = fleet.rollout(waves=["50%", "100%"], gates={"max_install_failure_rate": 0.2})
    first_wave = sorted(d for d, r in fleet.rows(rid).items() if r.wave == 0)
    failing = first_wave[:2]  # 2 of 5 fail at once: 2/5 > 0.2 whatever the other three do
    scheduler = fleet.scheduler("a", early_check_s=0.0)
    drive(fleet, [scheduler], rid, outcome=lambda c: "FAILED" if c.device_id in failing else None, rounds=3)
    rollout = fleet.get(rid)
    assert rollout.state == "rolling_back" and "early" in (rollout.halt_reason or "")
    rows = fleet.rows(rid)
    assert {rows[d].state for d in first_wave[2:]} == {"commanded"}  # still installing: waited for, then sent back
    assert all(rows[d].state == "skipped" for d in rows if d not in first_wave)


def test_a_soaking_wave_with_measured_slow_latency_halts_before_the_soak_ends(fleet: Fleet):
    rid = fleet.rollout(waves=["30%", "100%"], soak_s=3600.0, gates={"max_latency_p99_ratio": 2.0})
    rows = fleet.rows(rid)
    first_wave = sorted(d for d, r in rows.items() if r.wave == 0)
    control = sorted(d for d, r in rows.items() if r.wave == 1)
    scheduler = fleet.scheduler("a", early_check_s=0.0)
    drive(fleet, [scheduler], rid, rounds=3)
    assert fleet.get(rid).state == "running"  # soaking: nothing measured yet
    now = time.time()
    with fleet.sessions() as s:
        for i, device in enumerate(first_wave[: len(first_wave) // 2]):  # not yet half of the wave
            s.add(Telemetry(device_id=device, seq=100 + i, ts=now, requests=10, errors=0, p99_ms=30.0, model_version=2))
        for i, device in enumerate(control):
            s.add(Telemetry(device_id=device, seq=100 + i, ts=now, requests=10, errors=0, p99_ms=6.0, model_version=1))
        s.commit()
    scheduler.tick()
    assert fleet.get(rid).state == "running"
    with fleet.sessions() as s:
        for device in first_wave[len(first_wave) // 2 :]:
            s.add(Telemetry(device_id=device, seq=200, ts=now, requests=10, errors=0, p99_ms=30.0, model_version=2))
        s.commit()
    scheduler.tick()
    rollout = fleet.get(rid)
    assert rollout.state in ("rolling_back", "rolled_back"), rollout.state
    assert "latency_p99_ratio 5 breaches 2" in (rollout.halt_reason or "")
    assert rollout.gate_values["0"]["latency_p99_ratio"] == pytest.approx(5.0)
