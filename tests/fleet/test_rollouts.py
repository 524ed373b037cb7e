"""Rollout creation and the by-hand operations (SQLite and PostgreSQL): selection by tags and target, waves,
quarantine, devices already current, overlap with an active rollout, a rollout reaching no compatible device
refused with one line; pause/resume/abort/approve only from states where they make sense; status."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from edgeship.errors import ConflictError, NotFoundError, UsageError
from edgeship.fleet import rollouts
from edgeship.fleet.models import Audit, DeviceQuarantine, Package, Rollout, RolloutDevice
from edgeship.fleet.packages import push_package
from edgeship.fleet.rollout_logic import Gates
from tests.fleet.fleet_fixtures import FleetUnderTest

MakePackage = Callable[..., Path]


@pytest.fixture
def pushed(any_fleet: FleetUnderTest, make_package: MakePackage) -> dict[int, Package]:
    """digits-cnn v1 and v2 for linux-x86_64/fp32, and v2 for jetson-orin-nano/fp16."""
    ctx = any_fleet.ctx
    out = {v: push_package(ctx, make_package(version=v), "t") for v in (1, 2)}
    out[20] = push_package(
        ctx, make_package(version=2, target="jetson-orin-nano", format="tensorrt-onnx", precision="fp16"), "t"
    )
    return out


def spec(**fields: Any) -> dict[str, Any]:
    return {"package": "digits-cnn:2@linux-x86_64/fp32", "waves": ["10%", "50%", "100%"], **fields}


def devices_of(fleet: FleetUnderTest, rollout_id: int) -> dict[str, RolloutDevice]:
    with fleet.ctx.db.session(readonly=True) as session:
        rows = session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all()
    return {r.device_id: r for r in rows}


def test_create_selects_by_tags_and_target_in_waves(any_fleet: FleetUnderTest, pushed: dict[int, Package]):
    for i in range(20):
        any_fleet.add_device(
            f"x{i:02}", tags={"site": "a" if i < 15 else "b"}, model_name="digits-cnn", model_version=1
        )
    for i in range(3):
        any_fleet.add_device(f"phone{i}", target="android-arm64", tags={"site": "a"})
    rollout = rollouts.create_rollout(
        any_fleet.ctx, spec(tags={"site": "a"}, soak_s=60, max_per_minute=5), "token:root"
    )
    assert rollout.state == "pending" and rollout.revision == 0 and rollout.package_id == pushed[2].id
    assert rollout.name == "digits-cnn v2 (linux-x86_64/fp32)"
    assert rollout.gates == Gates().to_json()
    rows = devices_of(any_fleet, rollout.id)
    assert sorted(rows) == [f"x{i:02}" for i in range(15)]
    assert Counter(r.wave for r in rows.values()) == {0: 2, 1: 6, 2: 7}  # ceil(15 * 10%) = 2, then up to 8, then 15
    assert all(r.state == "pending" and r.previous_package_id == pushed[1].id for r in rows.values())
    status = rollouts.status(any_fleet.ctx, rollout.id)
    assert [w["devices"] for w in status["waves"]] == [2, 6, 7]
    assert [w["reach"] for w in status["waves"]] == ["10%", "50%", "100%"]
    assert status["totals"] == {"pending": 15} and status["package"]["version"] == 2 and not status["ended"]
    with any_fleet.ctx.db.session(readonly=True) as session:
        entry = session.scalars(select(Audit).where(Audit.action == "rollout.create")).one()
    assert entry.actor == "token:root" and entry.details["per_wave"] == [2, 6, 7]


def test_wave_assignment_is_stable_for_a_rollout(any_fleet: FleetUnderTest, pushed: dict[int, Package]):
    from edgeship.fleet.rollout_logic import assign_waves, parse_waves

    for i in range(10):
        any_fleet.add_device(f"d{i}")
    rollout = rollouts.create_rollout(any_fleet.ctx, spec(), "t")
    expected = assign_waves([f"d{i}" for i in range(10)], parse_waves(["10%", "50%", "100%"]), f"rollout-{rollout.id}")
    assert {d: r.wave for d, r in devices_of(any_fleet, rollout.id).items()} == expected


def test_no_compatible_device_is_refused_with_one_line(any_fleet: FleetUnderTest, pushed: dict[int, Package]):
    for i in range(3):
        any_fleet.add_device(f"phone{i}", target="android-arm64", tags={"site": "a"})
    any_fleet.add_device("nano", target="jetson-orin-nano", tags={"site": "a"})
    with pytest.raises(UsageError) as info:
        rollouts.create_rollout(any_fleet.ctx, spec(tags={"site": "a"}), "t")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "rollout of digits-cnn:2@linux-x86_64/fp32 refused: 4 device(s) match the tags {'site': 'a'}"
    )
    assert "none is a linux-x86_64 device (they are android-arm64 x3, jetson-orin-nano x1)" in message
    with pytest.raises(UsageError, match=r"no enrolled device matches the tags \{'site': 'z'\} \(of 4 enrolled\)"):
        rollouts.create_rollout(any_fleet.ctx, spec(tags={"site": "z"}), "t")
    # A TensorRT package never goes to a phone: only the Jetson is selected.
    rollout = rollouts.create_rollout(any_fleet.ctx, spec(package="digits-cnn:2@jetson-orin-nano"), "t")
    assert list(devices_of(any_fleet, rollout.id)) == ["nano"]
    with any_fleet.ctx.db.session(readonly=True) as session:
        assert len(session.scalars(select(Rollout)).all()) == 1


def test_quarantined_and_current_devices(any_fleet: FleetUnderTest, pushed: dict[int, Package]):
    any_fleet.add_device("old", model_name="digits-cnn", model_version=1)
    any_fleet.add_device("new", model_name="digits-cnn", model_version=2)
    any_fleet.add_device("bad", model_name="digits-cnn", model_version=1)
    with any_fleet.ctx.db.session() as session:
        session.add(DeviceQuarantine(device_id="bad", package_id=pushed[2].id, at=0.0))
    rollout = rollouts.create_rollout(any_fleet.ctx, spec(waves=["100%"]), "t")
    rows = devices_of(any_fleet, rollout.id)
    assert sorted(rows) == ["new", "old"]
    assert rows["old"].state == "pending"
    assert (rows["new"].state, rows["new"].code) == ("skipped", "already_current")
    rollouts.abort(any_fleet.ctx, rollout.id, "t")
    any_fleet.add_device("new2", model_name="digits-cnn", model_version=3)
    with any_fleet.ctx.db.session() as session:
        session.add(DeviceQuarantine(device_id="old", package_id=pushed[2].id, at=0.0))
    with pytest.raises(
        UsageError,
        match=r"4 compatible device\(s\) match .* but 2 run digits-cnn v2 or newer already "
        r"and 2 have this package quarantined",
    ):
        rollouts.create_rollout(any_fleet.ctx, spec(), "t")


def test_overlap_with_an_active_rollout_is_refused_naming_it(any_fleet: FleetUnderTest, pushed: dict[int, Package]):
    for i in range(4):
        any_fleet.add_device(f"d{i}", tags={"site": "a" if i < 2 else "b"})
    first = rollouts.create_rollout(any_fleet.ctx, spec(tags={"site": "a"}, name="canary"), "t")
    with pytest.raises(
        ConflictError, match=rf"rollout {first.id} \(canary\) is pending on 2 of these devices \(e\.g\. d0\)"
    ):
        rollouts.create_rollout(any_fleet.ctx, spec(package="digits-cnn:1@linux-x86_64"), "t")
    second = rollouts.create_rollout(any_fleet.ctx, spec(tags={"site": "b"}), "t")
    assert sorted(devices_of(any_fleet, second.id)) == ["d2", "d3"]
    rollouts.abort(any_fleet.ctx, first.id, "t", reason="wrong site")
    rollouts.create_rollout(any_fleet.ctx, spec(tags={"site": "a"}), "t")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"package": "digits-cnn"}, r"write NAME:VERSION@TARGET"),
        (
            {"package": "digits-cnn:9@linux-x86_64"},
            r"package digits-cnn:9@linux-x86_64 is not pushed; pushed for linux-x86_64: v1/fp32, v2/fp32",
        ),
        ({"package": None}, r"a rollout names its package"),
        ({"waves": ["10%", "5%", "100%"]}, r"waves must grow"),
        ({"waves": ["10%", "50%"]}, r"end with 100%"),
        ({"waves": "100%"}, r"waves: give a list"),
        ({"gates": {"max_install_failure": 0.1}}, r"unknown gate 'max_install_failure'"),
        ({"gates": {"max_rollback_rate": 1.5}}, r"gate max_rollback_rate is a rate between 0 and 1"),
        ({"gates": {"max_latency_p99_ratio": -1}}, r"gate max_latency_p99_ratio must be a number >= 0"),
        ({"deploy": {"health": {"window_s": -5}}}, r"field 'deploy\.health\.window_s' must be a number in \[0"),
        ({"deploy": {"validation": {"runs": 0}}}, r"deploy\.validation\.runs"),
        ({"deploy": {"shadow": {"fraction": 0.5, "colour": "red"}}}, r"unknown field 'colour'"),
        ({"deploy": {"canary": {}}}, r"deploy\.canary: unknown"),
        ({"soak_s": -1}, r"soak_s must be a number of seconds from 0 to 365 days, not -1"),
        ({"max_per_minute": 0}, r"max_per_minute must be a whole number"),
        ({"tags": {"site": 3}}, r"tags\.site: a tag value is a string"),
        ({"colour": "red"}, r"rollout field 'colour' is unknown"),
    ],
)
def test_bad_specs_are_one_line(
    any_fleet: FleetUnderTest, pushed: dict[int, Package], fields: dict[str, Any], message: str
):
    any_fleet.add_device("d0")
    with pytest.raises((UsageError, NotFoundError), match=message) as info:
        rollouts.create_rollout(any_fleet.ctx, spec(**fields), "t")
    assert "\n" not in str(info.value)
    with any_fleet.ctx.db.session(readonly=True) as session:
        assert session.scalars(select(Rollout)).all() == []


def test_deploy_options_and_gates_are_kept(any_fleet: FleetUnderTest, pushed: dict[int, Package]):
    any_fleet.add_device("d0")
    deploy = {"validation": {"runs": 20}, "health": {"window_s": 30, "max_error_rate": 0.05}, "shadow": None}
    rollout = rollouts.create_rollout(
        any_fleet.ctx,
        spec(deploy=deploy, gates={"max_install_failure_rate": 0.1, "max_drift_psi": None}, require_approval=True),
        "t",
    )
    assert rollout.deploy == deploy and rollout.require_approval
    assert rollout.gates["max_install_failure_rate"] == 0.1 and rollout.gates["max_rollback_rate"] == 0.2


def test_by_hand_operations_only_from_states_where_they_make_sense(
    any_fleet: FleetUnderTest, pushed: dict[int, Package]
):
    ctx = any_fleet.ctx
    any_fleet.add_device("d0")
    rollout = rollouts.create_rollout(ctx, spec(), "t")
    rid = rollout.id
    with pytest.raises(ConflictError, match=rf"rollout {rid} is pending; resume applies to a rollout that is paused"):
        rollouts.resume(ctx, rid, "t")
    with pytest.raises(ConflictError, match="approve applies to a rollout that is waiting_approval"):
        rollouts.approve(ctx, rid, "t")
    assert rollouts.pause(ctx, rid, "token:ops").state == "paused"
    with pytest.raises(
        ConflictError, match="is paused; pause applies to a rollout that is pending, running, waiting_approval"
    ):
        rollouts.pause(ctx, rid, "t")
    assert rollouts.resume(ctx, rid, "token:ops").state == "running"
    # The scheduler stops after a finished wave when approval is required; approving starts the next one.
    with ctx.db.session() as session:
        row = session.get(Rollout, rid)
        assert row is not None
        row.state, row.wave_done_at = "waiting_approval", 123.0
    approved = rollouts.approve(ctx, rid, "token:ops")
    assert (approved.state, approved.current_wave, approved.wave_done_at) == ("running", 1, None)
    assert approved.wave_started_at == any_fleet.clock.now
    aborted = rollouts.abort(ctx, rid, "token:ops", reason="bad numbers")
    assert aborted.state == "aborted" and aborted.halt_reason == "aborted by token:ops: bad numbers"
    assert aborted.revision == 4
    for operation in ("pause", "resume", "abort", "approve"):
        with pytest.raises(ConflictError, match=f"rollout {rid} is aborted"):
            rollouts.transition(ctx, rid, operation, "t")
    with pytest.raises(NotFoundError, match="there is no rollout 999"):
        rollouts.pause(ctx, 999, "t")
    with ctx.db.session(readonly=True) as session:
        trail = session.scalars(select(Audit.action).where(Audit.subject == f"rollout:{rid}").order_by(Audit.id)).all()
    assert trail == ["rollout.create", "rollout.pause", "rollout.resume", "rollout.approve", "rollout.abort"]
    assert rollouts.status(ctx, rid)["ended"]


def test_parse_package_ref():
    assert rollouts.parse_package_ref("digits:3@jetson-orin-nano/int8-qdq") == (
        "digits",
        3,
        "jetson-orin-nano",
        "int8-qdq",
    )
    assert rollouts.parse_package_ref("digits:v3@linux-x86_64") == ("digits", 3, "linux-x86_64", None)
    for bad in ("digits@x", "digits:x@y", ":3@y", "digits:3"):
        with pytest.raises(UsageError):
            rollouts.parse_package_ref(bad)
