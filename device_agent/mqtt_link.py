"""The agent's MQTT connection (paho-mqtt 2.x, MQTT 5): birth and will, commands in, the outbox out.

* Persistent session (``clean_start`` false, session expiry from the config): QoS 1 commands
  sent while the device was offline are delivered when it returns.
* Retained ``online`` status on every connect; retained ``offline`` last will, so the fleet
  knows within the keepalive when the device disappears.
* The publisher thread sends outbox rows in sequence order, at most ``window`` in flight,
  and deletes a row only on its PUBACK. Rows in flight when the connection drops are sent
  again by paho on reconnect (same session), so they are not published twice by us.
* A command's MQTT 5 message expiry is passed on with it; paho calls back on its own thread,
  and commands go to the agent through a callback that must not block.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeship.device_agent.config import BrokerConfig
from edgeship.device_agent.outbox import Outbox

log = logging.getLogger("edgeship.device_agent.mqtt")

Ack = Callable[[], None]
CommandHandler = Callable[[bytes, "float | None", Ack], None]
"""Called with a command payload, its remaining MQTT 5 message expiry in seconds (None if unset), and
the function that acknowledges it to the broker. The agent acknowledges a command only once it is
journaled (or answered with a rejection): a command whose agent dies before that is delivered
again when it reconnects (manual acknowledgement, persistent session)."""


class MqttLink:
    """One broker connection for one device. ``start()`` returns at once; paho reconnects by itself."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        status_topic: str,
        cmd_topic: str,
        outbox: Outbox,
        on_command: CommandHandler,
        birth: Callable[[], bytes],
        will: bytes,
        window: int = 64,
    ) -> None:
        self.broker = broker
        self.status_topic = status_topic
        self.cmd_topic = cmd_topic
        self.outbox = outbox
        self.on_command = on_command
        self.birth = birth
        self.window = window
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.rejected = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Outbox rows handed to paho and not acknowledged yet. Completion is read from paho's
        # MQTTMessageInfo rather than matched by mid in on_publish: paho runs on_publish under its
        # own message lock, and matching there would race the bookkeeping of publish().
        self._inflight: list[tuple[mqtt.MQTTMessageInfo, int]] = []
        self._lock = threading.Lock()
        self._publisher: threading.Thread | None = None
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.secret())
        if broker.tls:
            client.tls_set(
                ca_certs=str(broker.ca_file) if broker.ca_file else None,
                certfile=str(broker.cert_file) if broker.cert_file else None,
                keyfile=str(broker.key_file) if broker.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.will_set(status_topic, will, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.client = client
        outbox.on_put(self._wake.set)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.broker.session_expiry_s
        self.client.connect_async(
            self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s, clean_start=False, properties=props
        )
        self.client.loop_start()
        self._publisher = threading.Thread(target=self._publish_loop, name="edgeship-outbox", daemon=True)
        self._publisher.start()

    def stop(self, offline: bytes | None = None, timeout: float = 5.0) -> None:
        """Publish ``offline`` as the retained status (a clean stop sends no will), then disconnect."""
        self._stop.set()
        self._wake.set()
        if offline is not None and self.connected.is_set():
            info = self.client.publish(self.status_topic, offline, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        if self._publisher is not None:
            self._publisher.join(timeout)

    def publish_now(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 0 outside the outbox (a refreshed retained status). Dropped when not connected."""
        if self.connected.is_set():
            self.client.publish(topic, payload, qos=0, retain=retain)

    # ----------------------------------------------------------------- paho callbacks (paho's thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.warning("%s (check broker.username / password / certificates)", self.last_error)
            return
        self.last_error = None
        # The birth message goes out once the broker acknowledged the command subscription
        # (_on_subscribe): "online" then means "commands sent now will arrive".
        client.subscribe(self.cmd_topic, qos=1)
        self.connected.set()
        self._wake.set()
        log.info("connected to %s:%s (session present: %s)", self.broker.host, self.broker.port, flags.session_present)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.info("disconnected from the broker (%s); reconnecting", reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.warning("subscription to %s refused: %s", self.cmd_topic, reason)
        client.publish(self.status_topic, self.birth(), qos=1, retain=True)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        expiry = getattr(message.properties, "MessageExpiryInterval", None) if message.properties else None
        mid, qos = message.mid, message.qos

        def ack() -> None:
            if qos > 0:
                client.ack(mid, qos)

        try:
            self.on_command(bytes(message.payload), float(expiry) if expiry is not None else None, ack)
        except Exception:  # a bug in a handler must not kill paho's network thread
            log.exception("command handler failed")
            ack()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if reason is not None and getattr(reason, "is_failure", False):
            # The broker refused a message (e.g. 0x87 not authorized): sending it again cannot help,
            # so it is acknowledged like the others and counted.
            self.rejected += 1
            log.warning("broker refused a message: %s", reason)
        self._wake.set()

    # ----------------------------------------------------------------- the publisher thread

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self._collect_acks()
            if not self.connected.is_set():
                continue
            with self._lock:
                busy = {seq for _, seq in self._inflight}
            room = self.window - len(busy)
            if room <= 0:
                continue
            for row in self.outbox.peek(room, exclude=busy):
                if not self.connected.is_set() or self._stop.is_set():
                    break
                info = self.client.publish(row.topic, row.payload, qos=1)
                if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    # NO_CONN: paho keeps the message and sends it on reconnect (same session).
                    with self._lock:
                        self._inflight.append((info, row.seq))
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            self._collect_acks()

    def _collect_acks(self) -> None:
        done: list[int] = []
        with self._lock:
            pending = []
            for info, seq in self._inflight:
                if info.is_published():
                    done.append(seq)
                else:
                    pending.append((info, seq))
            self._inflight = pending
        for seq in done:
            self.outbox.ack(seq)

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)
