"""Real mosquitto brokers for tests (pytest plugin), and a small real MQTT 5 client to talk to them.

* ``mosquitto``: an anonymous plain broker on a free port in the test's temp directory, with
  unlimited queues and persistence (edgeship's settings); stopped at teardown.
* ``secure_broker``: fleet ``f1`` with devices ``dev-1`` and ``dev-2``, passwords, ACL, a plain
  listener and a TLS listener with a development CA.
* ``Probe``: a paho-mqtt 2.x client (MQTT 5, callback API 2) that records what it receives and
  waits for CONNACK, SUBACK and PUBACK, so a test reads like the protocol.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeship.fleet.broker import BrokerFiles, Mosquitto, write_broker_config

WAIT = 20.0
"""Upper bound for anything a broker on this host should do; never a measurement."""
WAIT_PER_MESSAGE = 0.01
"""Added to ``WAIT`` per message when waiting for many: 5,000 QoS 1 PUBACKs took over 20 s on 2
loaded cores (the Python 3.10 suite beside a training job), 7-13 s alone."""


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Probe:
    """One real MQTT 5 client on a background network thread.

    ``connect()`` returns the CONNACK reason code (a refused TLS handshake raises ``ssl.SSLError``
    as in paho, a connection closed before CONNACK ``ConnectionError``), ``subscribe()`` the SUBACK
    reason codes, ``publish()`` the PUBACK reason code (QoS 1), ``wait_for(n)`` the first ``n``
    messages received. paho does not reconnect by itself here. Use it as a context manager.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        name: str = "probe",
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.client_id = client_id or f"{name}-{uuid.uuid4().hex[:8]}"
        self.clean_start, self.session_expiry = clean_start, session_expiry
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(
                ca_certs=str(ca),
                certfile=None if certfile is None else str(certfile),
                keyfile=None if keyfile is None else str(keyfile),
            )
        self._cond = threading.Condition()
        self.messages: list[Received] = []
        self._connack: ReasonCode | None = None
        self.session_present: bool | None = None
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self.disconnects: list[ReasonCode] = []
        # No silent automatic reconnect inside a test: reconnecting is a step the test takes.
        self.client.reconnect_delay_set(min_delay=120, max_delay=120)
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    # paho callbacks (network thread)
    def _on_connect(self, client: Client, userdata: Any, flags: ConnectFlags, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self._connack, self.session_present = rc, flags.session_present
            self._cond.notify_all()

    def _on_disconnect(self, client: Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.disconnects.append(rc)
            self._cond.notify_all()

    def _on_message(self, client: Client, userdata: Any, msg: MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, msg.retain))
            self._cond.notify_all()

    def _on_publish(self, client: Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self._pubacks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, client: Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        with self._cond:
            self._subacks[mid] = list(rcs)
            self._cond.notify_all()

    def _wait(self, predicate: Any, what: str, timeout: float = WAIT) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"{self.client_id}: no {what} within {timeout:g} s ({len(self.messages)} messages received)"
                )

    # the protocol, synchronously
    def connect(self, timeout: float = WAIT) -> ReasonCode:
        properties = Properties(PacketTypes.CONNECT)
        if self.session_expiry:
            properties.SessionExpiryInterval = self.session_expiry
        with self._cond:
            self._connack = None
            closed_before = len(self.disconnects)
        self.client.connect(self.host, self.port, keepalive=30, clean_start=self.clean_start, properties=properties)
        self.client.loop_start()
        self._wait(lambda: self._connack is not None or len(self.disconnects) > closed_before, "CONNACK", timeout)
        if self._connack is None:
            self.close()
            raise ConnectionError(f"{self.client_id}: the broker closed the connection before CONNACK")
        if self._connack.is_failure:
            self.close()  # paho's network thread would otherwise retry the refused connect
        return self._connack

    def subscribe(self, topic: str, qos: int = 1) -> list[ReasonCode]:
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == 0 and mid is not None, f"subscribe({topic!r}) failed locally: {rc}"
        self._wait(lambda: mid in self._subacks, f"SUBACK for {topic}")
        return self._subacks[mid]

    def publish(self, topic: str, payload: bytes | str) -> ReasonCode:
        """Publish at QoS 1 and wait for the PUBACK; returns its reason code."""
        info = self.client.publish(topic, payload, qos=1)
        self._wait(lambda: info.mid in self._pubacks, f"PUBACK for {topic}")
        return self._pubacks[info.mid]

    def publish_many(self, topic: str, payloads: list[bytes]) -> list[ReasonCode]:
        """Publish every payload in order at QoS 1, wait for all PUBACKs; returns their reason codes in order."""
        mids = [self.client.publish(topic, payload, qos=1).mid for payload in payloads]

        # PUBACKs come back in order: look at the last one before scanning them all.
        def done() -> bool:
            return not mids or (mids[-1] in self._pubacks and all(mid in self._pubacks for mid in mids))

        self._wait(done, f"{len(mids)} PUBACKs on {topic}", WAIT + WAIT_PER_MESSAGE * len(mids))
        return [self._pubacks[mid] for mid in mids]

    def wait_disconnected(self, timeout: float = WAIT) -> ReasonCode:
        """Wait until the broker has closed the connection; returns paho's disconnect reason."""
        self._wait(lambda: bool(self.disconnects), "disconnect", timeout)
        return self.disconnects[-1]

    def wait_for(self, count: int, timeout: float | None = None) -> list[Received]:
        timeout = WAIT + WAIT_PER_MESSAGE * count if timeout is None else timeout
        self._wait(lambda: len(self.messages) >= count, f"{count} messages", timeout)
        with self._cond:
            return list(self.messages[:count])

    def received(self) -> list[Received]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def settle(probe: Probe, seconds: float = 1.0) -> list[Received]:
    """What ``probe`` received after ``seconds`` more: for negative checks, after a positive sync point."""
    time.sleep(seconds)
    return probe.received()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous mosquitto on a free 127.0.0.1 port with unlimited queues and persistence; stopped after the test."""
    broker = Mosquitto.start(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class SecureBroker:
    """A running broker for fleet ``f1`` with password accounts, ACL, a plain and a TLS listener."""

    broker: Mosquitto
    files: BrokerFiles
    passwords: dict[str, str]
    """username -> password, the fleet account included."""

    @property
    def fleet(self) -> str:
        return self.files.fleet

    @property
    def fleet_username(self) -> str:
        return self.files.fleet_username

    @property
    def ca(self) -> Path:
        assert self.files.tls is not None
        return self.files.tls.ca_cert

    def probe(
        self, username: str, *, tls: bool = True, password: str | None = None, ca: Path | None = None, **kwargs: Any
    ) -> Probe:
        """A (not yet connected) client logged in as ``username``, over TLS (trusting ``ca``, default the
        broker's CA) unless ``tls=False``."""
        port = self.broker.tls_port if tls else self.broker.port
        assert port is not None
        return Probe(
            self.broker.host,
            port,
            name=username,
            username=username,
            password=self.passwords.get(username) if password is None else password,
            ca=(ca or self.ca) if tls else None,
            **kwargs,
        )


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    """Fleet ``f1``, devices ``dev-1``/``dev-2`` with passwords, ACL, a plain and a TLS listener (development CA)."""
    devices = {"dev-1": "pw-dev-1-" + uuid.uuid4().hex, "dev-2": "pw-dev-2-" + uuid.uuid4().hex}
    fleet_password = "pw-fleet-" + uuid.uuid4().hex
    files = write_broker_config(tmp_path / "broker", "f1", devices, fleet_password, tls=True)
    broker = Mosquitto.start(files.directory, files)
    try:
        yield SecureBroker(broker, files, {files.fleet_username: fleet_password, **devices})
    finally:
        broker.stop()
