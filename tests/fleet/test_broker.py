"""edgeship's mosquitto configuration against a real mosquitto 2.0 and real paho MQTT 5 clients.

Isolation between devices is the point: a device must not publish into, or receive from, another
device's topics. Everything here runs a real broker on free ports with the generated files.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from edgeship.device_agent import topics
from edgeship.errors import BrokerError, ConfigError
from edgeship.fleet import broker as broker_module
from edgeship.fleet.broker import (
    BrokerSettings,
    Mosquitto,
    add_device,
    check_password,
    free_port,
    hash_password,
    password_file_users,
    render_acl,
    render_mosquitto_conf,
    write_broker_config,
)
from edgeship.fleet.dev_tls import create_dev_tls
from tests.brokers import Probe, SecureBroker, settle

pytestmark = pytest.mark.py310

NOT_AUTHORIZED = 0x87
"""MQTT 5 reason code 135: what mosquitto 2.0.11 answers to a refused PUBLISH and to a bad login."""

F1 = "f1"


def telemetry(device: str) -> str:
    return topics.device_topic(F1, device, "telemetry")


def cmd(device: str) -> str:
    return topics.device_topic(F1, device, "cmd")


def connected(probe: Probe) -> Probe:
    rc = probe.connect()
    assert not rc.is_failure, f"{probe.client_id} refused: {rc}"
    return probe


def wait_quiet(probe: Probe, quiet: float = 1.0) -> int:
    """Wait until ``probe`` has received nothing new for ``quiet`` seconds; returns the count."""
    count = -1
    while count != len(probe.received()):
        count = len(probe.received())
        time.sleep(quiet)
    return count


# --- files ---------------------------------------------------------------------------------


def test_password_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.touch()
    tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/sbin")
    assert tool is not None, "mosquitto_passwd is not installed (it comes with the mosquitto package)"
    subprocess.run([tool, "-b", str(passwd), "alice", "s3cret pw"], check=True)
    written = passwd.read_text().strip().split(":", 1)[1]
    _, seven, iterations, salt_b64, _ = written.split("$")
    assert (seven, iterations) == ("7", "101")
    assert hash_password("s3cret pw", salt=base64.b64decode(salt_b64)) == written
    assert check_password(written, "s3cret pw")
    assert not check_password(written, "s3cret pw ")


def test_acl_is_the_protocol_patterns_plus_the_fleet_account() -> None:
    text = render_acl(F1)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == [*topics.acl_patterns(F1), "user fleet-f1", "topic readwrite edgeship/v1/f1/#"]


def test_write_broker_config_files_and_modes(tmp_path: Path) -> None:
    files = write_broker_config(tmp_path, F1, {"dev-1": "a", "dev-2": "b"}, "f", mutual_tls=True)
    assert password_file_users(files.password_file) == ["fleet-f1", "dev-1", "dev-2"]
    assert files.password_file.stat().st_mode & 0o777 == 0o600
    assert files.tls is not None
    private = [files.tls.ca_key, files.tls.server_key, *(files.tls.client(n).key for n in ("fleet-f1", "dev-1"))]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in private)
    conf = files.conf.read_text()
    for line in (
        "per_listener_settings false",
        "allow_anonymous false",
        "max_queued_messages 0",
        "max_inflight_messages 0",
        "autosave_on_changes true",
        "autosave_interval 1",
        "persistent_client_expiration 14d",
        "require_certificate true",
        "use_identity_as_username true",
    ):
        assert line in conf.splitlines()
    assert not [line for line in conf.splitlines() if line.startswith("pid_file")]


def test_settings_refuse_contradictions(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no listener"):
        BrokerSettings(port=None)
    with pytest.raises(ConfigError, match="cafile"):
        BrokerSettings(tls_port=8883)
    with pytest.raises(ConfigError, match="mutual_tls"):
        BrokerSettings(mutual_tls=True)
    with pytest.raises(ConfigError, match="persistent_client_expiration"):
        BrokerSettings(persistent_client_expiration="14 days")
    with pytest.raises(ConfigError, match="port is 0"):
        render_mosquitto_conf(BrokerSettings(port=0))
    with pytest.raises(ConfigError, match="fleet's own account"):
        write_broker_config(tmp_path, F1, {"fleet-f1": "x"}, "y")
    with pytest.raises(ConfigError, match="device id"):
        write_broker_config(tmp_path, F1, {"dev/1": "x"}, "y")
    with pytest.raises(ConfigError, match="empty"):
        write_broker_config(tmp_path, F1, {"dev-1": ""}, "y")


# --- authentication ------------------------------------------------------------------------


def test_generated_passwords_are_accepted_and_a_wrong_one_refused(secure_broker: SecureBroker) -> None:
    """mosquitto 2.0.11 answers a bad password, an unknown user and an anonymous client alike with
    CONNACK 0x87 "Not authorized" (not 0x86 "Bad user name or password")."""
    with connected(secure_broker.probe("dev-1")), connected(secure_broker.probe("fleet-f1")):
        pass
    assert secure_broker.probe("dev-1", password="wrong").connect().value == NOT_AUTHORIZED
    assert secure_broker.probe("dev-9", password="anything").connect().value == NOT_AUTHORIZED
    anonymous = Probe(secure_broker.broker.host, secure_broker.broker.tls_port or 0, ca=secure_broker.ca)
    assert anonymous.connect().value == NOT_AUTHORIZED


def test_client_trusting_another_ca_fails_the_tls_handshake(secure_broker: SecureBroker, tmp_path: Path) -> None:
    other = create_dev_tls(tmp_path / "other-ca")
    stranger = secure_broker.probe("dev-1", ca=other.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        stranger.connect()


# --- ACL: publish -------------------------------------------------------------------------


def test_publish_to_another_devices_telemetry_gets_0x87_and_is_not_delivered(secure_broker: SecureBroker) -> None:
    """A refused PUBLISH gets PUBACK 0x87, and then this mosquitto build (Debian 2.0.11-1.2+deb12u2)
    closes the connection (logged as "Bad socket read/write ... Unknown error"); the fleet's
    subscriber sees only dev-1's own telemetry."""
    with connected(secure_broker.probe("fleet-f1")) as fleet:
        assert not fleet.subscribe(topics.fleet_filter(F1, "telemetry"))[0].is_failure
        dev1 = connected(secure_broker.probe("dev-1"))
        assert dev1.publish(telemetry("dev-2"), b"forged").value == NOT_AUTHORIZED
        dev1.wait_disconnected()
        dev1.close()
        with connected(secure_broker.probe("dev-1")) as dev1_again:
            assert not dev1_again.publish(telemetry("dev-1"), b"own").is_failure
        assert fleet.wait_for(1)[0].payload == b"own"
        assert [(m.topic, m.payload) for m in settle(fleet)] == [(telemetry("dev-1"), b"own")]


# --- ACL: subscribe / delivery -------------------------------------------------------------


def test_subscribing_to_another_devices_cmd_is_granted_but_nothing_is_delivered(secure_broker: SecureBroker) -> None:
    """mosquitto's ACL file never refuses a SUBSCRIBE: the SUBACK grants QoS 1 for dev-2's cmd topic.
    Isolation comes from delivery: the fleet's command reaches dev-2 and never dev-1."""
    with (
        connected(secure_broker.probe("dev-1")) as dev1,
        connected(secure_broker.probe("dev-2")) as dev2,
        connected(secure_broker.probe("fleet-f1")) as fleet,
    ):
        granted = dev1.subscribe(cmd("dev-2"))
        assert [rc.value for rc in granted] == [1]  # "Granted QoS 1"
        assert dev1.subscribe(topics.fleet_filter(F1, "cmd"))[0].value == 1
        assert dev2.subscribe(cmd("dev-2"))[0].value == 1
        assert not fleet.publish(cmd("dev-2"), b'{"op": "ping"}').is_failure
        assert dev2.wait_for(1)[0].payload == b'{"op": "ping"}'
        assert settle(dev1) == []


def test_device_cannot_receive_other_devices_telemetry_but_reads_its_own_cmd(secure_broker: SecureBroker) -> None:
    with (
        connected(secure_broker.probe("dev-1")) as dev1,
        connected(secure_broker.probe("dev-2")) as dev2,
        connected(secure_broker.probe("fleet-f1")) as fleet,
    ):
        dev1.subscribe(telemetry("dev-2"))
        dev1.subscribe(topics.fleet_filter(F1, "telemetry"))
        dev1.subscribe(cmd("dev-1"))
        fleet.subscribe(telemetry("dev-2"))
        assert not dev2.publish(telemetry("dev-2"), b"t2").is_failure
        assert fleet.wait_for(1)[0].payload == b"t2"  # delivered to those allowed to read it
        assert not fleet.publish(cmd("dev-1"), b"c1").is_failure
        received = dev1.wait_for(1)
        assert [(m.topic, m.payload) for m in received] == [(cmd("dev-1"), b"c1")]
        assert [m.payload for m in settle(dev1)] == [b"c1"]


def test_fleet_consumes_telemetry_through_a_shared_subscription(secure_broker: SecureBroker) -> None:
    """Two fleet instances in one ``$share`` group split the telemetry of every device between them."""
    group = topics.shared_filter("ingest", F1, "telemetry")
    with (
        connected(secure_broker.probe("fleet-f1")) as a,
        connected(secure_broker.probe("fleet-f1")) as b,
        connected(secure_broker.probe("dev-1")) as dev1,
        connected(secure_broker.probe("dev-2")) as dev2,
    ):
        assert not a.subscribe(group)[0].is_failure
        assert not b.subscribe(group)[0].is_failure
        sent = {f"{dev}-{i}".encode() for dev in ("dev-1", "dev-2") for i in range(10)}
        for i in range(10):
            dev1.publish(telemetry("dev-1"), f"dev-1-{i}".encode())
            dev2.publish(telemetry("dev-2"), f"dev-2-{i}".encode())
        deadline = time.monotonic() + 20
        while len(a.received()) + len(b.received()) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        got_a, got_b = [m.payload for m in a.received()], [m.payload for m in b.received()]
        assert sorted(got_a + got_b) == sorted(sent)  # each message once, to one member
        assert got_a and got_b


# --- mutual TLS ----------------------------------------------------------------------------


def test_mutual_tls_certificate_cn_is_the_username_and_gets_that_devices_acl(tmp_path: Path) -> None:
    files = write_broker_config(tmp_path / "b", F1, {"dev-1": "p1", "dev-2": "p2"}, "pf", mutual_tls=True, port=None)
    tls = files.tls
    assert tls is not None
    with Mosquitto.start(files.directory, files) as broker:
        tls_port = broker.tls_port
        assert tls_port is not None and broker.port is None

        def by_cert(name: str) -> Probe:
            client = tls.client(name)
            return Probe(broker.host, tls_port, name=name, ca=tls.ca_cert, certfile=client.cert, keyfile=client.key)

        with connected(by_cert("fleet-f1")) as fleet:
            fleet.subscribe(topics.fleet_filter(F1, "telemetry"))
            dev1 = connected(by_cert("dev-1"))
            assert dev1.publish(telemetry("dev-2"), b"forged").value == NOT_AUTHORIZED
            dev1.close()
            with connected(by_cert("dev-1")) as dev1_again:
                assert not dev1_again.publish(telemetry("dev-1"), b"own").is_failure
            assert [m.payload for m in fleet.wait_for(1)] == [b"own"]
            assert [m.topic for m in settle(fleet)] == [telemetry("dev-1")]
        assert "u'dev-1'" in broker.log_text()  # the CN became the username

        no_cert = Probe(broker.host, tls_port, ca=tls.ca_cert)
        with pytest.raises((ConnectionError, ssl.SSLError)):
            no_cert.connect()

        cert = add_device(files, "dev-3", "p3", broker=broker)
        assert cert is not None
        with connected(by_cert("dev-3")) as dev3:
            assert not dev3.publish(telemetry("dev-3"), b"hi").is_failure


# --- adding devices ------------------------------------------------------------------------


def test_device_added_and_reloaded_connects_without_restart(secure_broker: SecureBroker) -> None:
    broker, files = secure_broker.broker, secure_broker.files
    pid = broker.pid
    with connected(secure_broker.probe("dev-1")) as dev1:
        add_device(files, "dev-3", "pw-3")
        # The file alone changes nothing: mosquitto reads it at start and on SIGHUP.
        assert secure_broker.probe("dev-3", password="pw-3").connect().value == NOT_AUTHORIZED
        broker.reload()
        with connected(secure_broker.probe("dev-3", password="pw-3")) as dev3:
            assert not dev3.publish(telemetry("dev-3"), b"new").is_failure
            assert dev3.publish(telemetry("dev-1"), b"forged").value == NOT_AUTHORIZED
        assert dev1.disconnects == []  # the reload dropped no one
    assert broker.pid == pid
    with pytest.raises(ConfigError, match="already has an account"):
        add_device(files, "dev-3", "again")


# --- queues and persistence ----------------------------------------------------------------

N_QUEUED = 5000


def _queue_for_offline_subscriber(broker: Mosquitto, client_id: str) -> Probe:
    """Subscribe a persistent session, go offline, publish N_QUEUED QoS 1 messages; returns the subscriber (offline)."""
    port = broker.port
    assert port is not None
    sub = connected(Probe(broker.host, port, client_id=client_id, clean_start=False, session_expiry=3600))
    sub.subscribe(cmd("dev-1"))
    sub.close()
    with connected(Probe(broker.host, port, name="publisher")) as pub:
        codes = pub.publish_many(cmd("dev-1"), [str(i).encode() for i in range(N_QUEUED)])
    assert not any(rc.is_failure for rc in codes)
    return Probe(broker.host, port, client_id=client_id, clean_start=False, session_expiry=3600)


def test_offline_persistent_subscriber_gets_every_queued_qos1_message_in_order(mosquitto: Mosquitto) -> None:
    client_id = f"dev-1-{uuid.uuid4().hex[:6]}"
    with _queue_for_offline_subscriber(mosquitto, client_id) as sub:
        connected(sub)
        assert sub.session_present
        payloads = [m.payload for m in sub.wait_for(N_QUEUED, timeout=120)]
        assert payloads == [str(i).encode() for i in range(N_QUEUED)]
    assert "being dropped" not in mosquitto.log_text()


def test_mosquitto_default_queue_limits_drop_queued_qos1_messages(tmp_path: Path) -> None:
    """The same as above with mosquitto's defaults (max_queued_messages 1000, max_inflight_messages 20):
    only the first 1,000 of 5,000 arrive (measured here), which is why edgeship sets them to 0."""
    defaults = BrokerSettings(max_queued_messages=None, max_queued_bytes=None, max_inflight_messages=None)
    with Mosquitto.start(tmp_path / "broker", defaults) as broker:
        client_id = f"dev-1-{uuid.uuid4().hex[:6]}"
        with _queue_for_offline_subscriber(broker, client_id) as sub:
            connected(sub)
            sub.wait_for(1)
            count = wait_quiet(sub)
            payloads = [m.payload for m in sub.received()]
        assert count < N_QUEUED
        assert payloads == [str(i).encode() for i in range(count)]  # the tail was dropped
        assert "Outgoing messages are being dropped" in broker.log_text()


def _queue_one_command(broker: Mosquitto, client_id: str, payload: bytes) -> None:
    port = broker.port
    assert port is not None
    sub = connected(Probe(broker.host, port, client_id=client_id, clean_start=False, session_expiry=3600))
    sub.subscribe(cmd("dev-1"))
    sub.close()
    with connected(Probe(broker.host, port, name="fleet")) as fleet:
        assert fleet.publish(cmd("dev-1"), payload).value == 0  # "Success": one (offline) subscriber


def test_queued_command_survives_broker_kill_9_with_autosave_on_changes(mosquitto: Mosquitto) -> None:
    client_id, payload = "dev-1-persistent", f"install-{uuid.uuid4().hex}".encode()
    _queue_one_command(mosquitto, client_id, payload)
    db = mosquitto.persistence_file
    assert db is not None
    # autosave_on_changes saves right after the change, on the broker's next loop turn.
    deadline = time.monotonic() + 10
    while not (db.exists() and payload in db.read_bytes()):
        assert time.monotonic() < deadline, "the queued command never reached the database file"
        time.sleep(0.02)
    ports = (mosquitto.port, mosquitto.tls_port)
    mosquitto.kill()
    mosquitto.restart()
    assert (mosquitto.port, mosquitto.tls_port) == ports
    port = mosquitto.port
    assert port is not None
    with connected(Probe(mosquitto.host, port, client_id=client_id, clean_start=False, session_expiry=3600)) as dev1:
        assert dev1.session_present
        assert [m.payload for m in dev1.wait_for(1)] == [payload]


def test_without_autosave_kill_9_loses_the_queued_command(tmp_path: Path) -> None:
    """mosquitto's default (save every 1800 s) keeps the session and command only in memory."""
    settings = BrokerSettings(autosave_interval=None, autosave_on_changes=False)
    with Mosquitto.start(tmp_path / "broker", settings) as broker:
        client_id, payload = "dev-1-persistent", b"install-v2"
        _queue_one_command(broker, client_id, payload)
        broker.kill()
        broker.restart()
        port = broker.port
        assert port is not None
        with connected(Probe(broker.host, port, client_id=client_id, clean_start=False, session_expiry=3600)) as dev1:
            assert not dev1.session_present
            assert settle(dev1) == []


# --- process control -----------------------------------------------------------------------


def test_reload_asked_while_the_broker_reloads_for_someone_else_is_not_lost(tmp_path: Path) -> None:
    """mosquitto clears its reload flag when a reload ends: a SIGHUP that lands mid-reload is lost.

    20,000 accounts make a reload last tens of ms here; reload() is asked right after another
    SIGHUP's reload began (the fleet's enrollment does that), and must still see its own reload.
    """
    files = write_broker_config(tmp_path / "broker", F1, {}, "fleet-pw")
    stored = hash_password("pw")
    with files.password_file.open("a") as accounts:
        accounts.write("".join(f"dev-{i}:{stored}\n" for i in range(20_000)))
    with Mosquitto.start(files.directory, files) as broker:
        assert broker.log_file is not None
        before = broker.log_file.stat().st_size
        os.kill(broker.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "Reloading config" not in broker_module._read_from(broker.log_file, before):
            assert time.monotonic() < deadline, "mosquitto did not reload on SIGHUP"
            time.sleep(0.001)
        reloads = broker.log_text().count("Reloading config")
        broker.reload()
        assert broker.log_text().count("Reloading config") > reloads


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(BrokerError, match="no_such_option"):
        Mosquitto.start(tmp_path, f"listener {port} 127.0.0.1\nno_such_option true\n", port=port)


def test_taken_port_given_explicitly_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerError, match="Address already in use"):
            Mosquitto.start(tmp_path, BrokerSettings(port=port))


def test_free_port_race_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process takes the picked port before mosquitto binds, start picks again."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])
        real = broker_module.free_port
        monkeypatch.setattr(broker_module, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
        with Mosquitto.start(tmp_path) as broker:
            assert broker.port not in (None, busy)
            assert "Address already in use" in broker.log_text()


def test_stop_and_context_manager_end_the_process(tmp_path: Path) -> None:
    with Mosquitto.start(tmp_path) as broker:
        pid = broker.pid
        assert broker.running
    assert not broker.running
    with pytest.raises(BrokerError, match="not running"):
        _ = broker.pid
    assert "terminating" in broker.log_text() and pid > 0
