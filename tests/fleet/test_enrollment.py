"""Enrollment: a one-time token becomes a device record and broker credentials that a real mosquitto accepts
without a restart; a used, expired or unknown token, a taken id, an unknown or disallowed target are refused
and change nothing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from edgeship.errors import AuthError, ConfigError, ConflictError, UsageError
from edgeship.fleet import enrollment
from edgeship.fleet.broker import password_file_users
from edgeship.fleet.enrollment import create_enrollment_token, enroll, list_enrollment_tokens
from edgeship.fleet.models import Audit, Device, EnrollmentToken
from tests.brokers import SecureBroker
from tests.fleet.fleet_fixtures import FleetUnderTest, _fleet
from tests.package_fixtures import Publisher


@pytest.fixture
def enrolling(
    tmp_path: Path, publisher: Publisher, secure_broker: SecureBroker, sqlite_url: str
) -> Iterator[FleetUnderTest]:
    """A fleet whose enrollment writes the running broker's password file and SIGHUPs it."""
    broker = secure_broker.broker
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{broker.pid}\n")
    overrides = {
        "fleet_id": secure_broker.fleet,
        "broker": {
            "url": f"mqtt://127.0.0.1:{broker.port}",
            "public_url": f"mqtts://127.0.0.1:{broker.tls_port}",
            "device_ca": str(secure_broker.ca),
            "accounts_file": str(secure_broker.files.password_file),
            "pid_file": str(pid_file),
        },
    }
    yield from _fleet(tmp_path, publisher, sqlite_url, **overrides)


def reloads(broker: SecureBroker) -> int:
    return broker.broker.log_text().count("Reloading config")


def test_enrolled_device_connects_to_the_running_broker(enrolling: FleetUnderTest, secure_broker: SecureBroker):
    ctx = enrolling.ctx
    _row, token = create_enrollment_token(ctx, actor="token:root", tags={"site": "plant-1"}, target="linux-x86_64")
    pid = secure_broker.broker.pid
    before = reloads(secure_broker)
    bundle = enroll(ctx, token, "cam-7", "linux-x86_64", {"hw": "r2"})
    assert bundle.device_id == "cam-7" and bundle.fleet_id == "f1" and bundle.target == "linux-x86_64"
    assert bundle.tags == {"site": "plant-1", "hw": "r2"}
    assert bundle.broker["url"] == f"mqtts://127.0.0.1:{secure_broker.broker.tls_port}"
    assert bundle.broker["username"] == "cam-7"
    assert bundle.broker["ca_pem"] == secure_broker.ca.read_text()
    assert bundle.updates["metadata_url"] == "http://127.0.0.1:8480/tuf/metadata/"
    assert bundle.updates["targets_url"] == "http://127.0.0.1:8480/tuf/targets/"
    assert bundle.updates["root_json"].encode() == ctx.tuf.root_bytes()
    assert json.loads(bundle.updates["root_json"])["signed"]["_type"] == "root"
    assert bundle.updates["signing_keys_pem"] == [ctx.settings.signing_keys[0].read_text()]
    # The broker re-read its accounts (SIGHUP): same process, the new device gets in over TLS.
    deadline = time.monotonic() + 20
    while reloads(secure_broker) == before:
        assert time.monotonic() < deadline, "mosquitto did not reload"
        time.sleep(0.02)
    assert secure_broker.broker.pid == pid
    assert "cam-7" in password_file_users(secure_broker.files.password_file)
    with secure_broker.probe("cam-7", password=bundle.broker["password"]) as probe:
        assert not probe.connect().is_failure
    with secure_broker.probe("cam-7", password="wrong") as probe:
        assert probe.connect().is_failure
    with ctx.db.session(readonly=True) as session:
        device = session.get(Device, "cam-7")
        assert device is not None and device.tags == {"site": "plant-1", "hw": "r2"} and device.target == "linux-x86_64"
        used = session.scalars(select(EnrollmentToken)).one()
        assert used.used_by == "cam-7" and used.used_at is not None
        entry = session.scalars(select(Audit).where(Audit.action == "device.enroll")).one()
        assert entry.subject == "device:cam-7" and entry.actor == f"enrollment:{used.id}"
    assert list_enrollment_tokens(ctx) == []


def test_enrollment_signals_the_broker_again_after_its_last_account(
    enrolling: FleetUnderTest, secure_broker: SecureBroker, monkeypatch: pytest.MonkeyPatch
):
    """mosquitto loses a SIGHUP that lands mid-reload (tests/fleet/test_broker.py shows it), and that
    reload may have read the accounts file before the newest line: enrollment signals once more,
    RELOAD_FOLLOW_UP_S after the last account it wrote, and only once for a burst of enrollments."""
    ctx = enrolling.ctx
    signals: list[tuple[float, str]] = []
    real = enrollment._signal_broker

    ours = ctx.settings.broker.pid_file
    assert ours is not None

    def recorded(pid_file: Path) -> bool:
        if pid_file == ours:
            kind = "follow-up" if threading.current_thread().name.startswith("edgeship-broker-reload") else "enroll"
            signals.append((time.monotonic(), kind))
        return real(pid_file)

    monkeypatch.setattr(enrollment, "_signal_broker", recorded)
    tokens = [create_enrollment_token(ctx, actor="token:root", target="linux-x86_64")[1] for _ in range(3)]
    bundles = [enroll(ctx, token, f"cam-{i}", "linux-x86_64", {}) for i, token in enumerate(tokens)]
    last_enrolled = time.monotonic()
    pending = enrollment._follow_ups[ours]
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.name == pending.name]
    assert [t for t in timers if not t.finished.is_set()] == [pending], "a burst of enrollments leaves one follow-up"
    pending.join(timeout=10)
    assert [kind for _, kind in signals] == ["enroll"] * 3 + ["follow-up"]
    assert signals[-1][0] - last_enrolled >= enrollment.RELOAD_FOLLOW_UP_S * 0.9
    reloaded = time.monotonic() + 10
    for bundle in bundles:
        with secure_broker.probe(bundle.device_id, password=bundle.broker["password"]) as probe:
            while probe.connect().is_failure:
                assert time.monotonic() < reloaded, f"{bundle.device_id} cannot log in after the reloads"
                time.sleep(0.05)


def test_a_token_works_once(enrolling: FleetUnderTest):
    _row, token = create_enrollment_token(enrolling.ctx, actor="t")
    enroll(enrolling.ctx, token, "dev-a", "linux-x86_64")
    with pytest.raises(AuthError, match=r"was used already \(by dev-a\)"):
        enroll(enrolling.ctx, token, "dev-b", "linux-x86_64")
    with enrolling.ctx.db.session(readonly=True) as session:
        assert session.get(Device, "dev-b") is None


def test_expired_and_unknown_tokens_are_refused(enrolling: FleetUnderTest):
    _row, token = create_enrollment_token(enrolling.ctx, actor="t", expires_s=60)
    enrolling.clock.advance(61)
    with pytest.raises(AuthError, match="has expired"):
        enroll(enrolling.ctx, token, "dev-a", "linux-x86_64")
    with pytest.raises(AuthError, match="not valid"):
        enroll(enrolling.ctx, "ese_made-up", "dev-a", "linux-x86_64")


def test_refusals_leave_the_token_usable(enrolling: FleetUnderTest, secure_broker: SecureBroker):
    ctx = enrolling.ctx
    _row, taken = create_enrollment_token(ctx, actor="t")
    enroll(ctx, taken, "dev-a", "linux-x86_64")
    accounts_before = password_file_users(secure_broker.files.password_file)
    _row, token = create_enrollment_token(ctx, actor="t", target="jetson-orin-nano", tags={"site": "s1"})
    with pytest.raises(ConflictError, match="device 'dev-a' is enrolled already"):
        enroll(ctx, token, "dev-a", "jetson-orin-nano")
    with pytest.raises(UsageError, match="unknown target 'jetson-orin'; did you mean jetson-orin-nano"):
        enroll(ctx, token, "dev-b", "jetson-orin")
    with pytest.raises(UsageError, match="this enrollment token is for target jetson-orin-nano, not android-arm64"):
        enroll(ctx, token, "dev-b", "android-arm64")
    with pytest.raises(UsageError, match="tag site=s2 contradicts the token's site=s1"):
        enroll(ctx, token, "dev-b", "jetson-orin-nano", {"site": "s2"})
    with pytest.raises(UsageError, match="not a valid id"):
        enroll(ctx, token, "dev/b", "jetson-orin-nano")
    with pytest.raises(UsageError, match="fleet's own broker account"):
        enroll(ctx, token, "fleet-f1", "jetson-orin-nano")
    assert password_file_users(secure_broker.files.password_file) == accounts_before
    bundle = enroll(ctx, token, "dev-b", "jetson-orin-nano")
    assert bundle.tags == {"site": "s1"}


def test_enrollment_token_checks(fleet: FleetUnderTest):
    with pytest.raises(UsageError, match="between 1 s and 365 days"):
        create_enrollment_token(fleet.ctx, actor="t", expires_s=0)
    with pytest.raises(UsageError, match="tag key"):
        create_enrollment_token(fleet.ctx, actor="t", tags={"bad key": "x"})
    with pytest.raises(UsageError, match="unknown target"):
        create_enrollment_token(fleet.ctx, actor="t", target="nokia-3310")


def test_without_a_broker_accounts_file_enrollment_says_so(fleet: FleetUnderTest):
    _row, token = create_enrollment_token(fleet.ctx, actor="t")
    with pytest.raises(ConfigError, match=r"broker\.accounts_file is not set"):
        enroll(fleet.ctx, token, "dev-a", "linux-x86_64")
    with fleet.ctx.db.session(readonly=True) as session:
        assert session.scalars(select(EnrollmentToken.used_at)).one() is None
