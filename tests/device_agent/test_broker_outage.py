"""The broker goes away while the agent serves: inference goes on, telemetry waits on disk and arrives in order.

CI stops mosquitto for ``EDGESHIP_OUTAGE_S`` seconds (8 by default); the issue's 60 s run is
``EDGESHIP_OUTAGE_S=60 pytest tests/device_agent/test_broker_outage.py``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeship.device_agent import protocol
from edgeship.device_agent.config import load_config
from edgeship.device_agent.daemon import Agent
from tests.agent_models import sample_inputs

pytestmark = [pytest.mark.py310, pytest.mark.slow]

OUTAGE_S = float(os.environ.get("EDGESHIP_OUTAGE_S", "8"))


class FleetSubscriber:
    """A persistent-session MQTT 5 subscriber that reconnects by itself, as the fleet's ingest does."""

    def __init__(self, host: str, port: int) -> None:
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"fleet-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [("edgeship/v1/f1/+/telemetry", 1), ("edgeship/v1/f1/+/events", 1)]
        )
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        parsed = protocol.parse(bytes(message.payload), expected=protocol.DEVICE_TYPES)
        with self.lock:
            self.received.append(parsed)

    def seqs(self) -> list[int]:
        with self.lock:
            return [m["seq"] for m in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def serve_while(agent: Agent, stop: threading.Event, counts: dict[str, int]) -> None:
    x = {"x": sample_inputs(1, seed=2)}
    while not stop.is_set():
        try:
            agent.infer(x)
            counts["ok"] += 1
        except Exception:  # any failure counts
            counts["failed"] += 1
        time.sleep(0.002)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout:g} s")


def run_outage(
    agent_config: Any, packages: Any, mosquitto: Any, queue_max: int
) -> tuple[Agent, FleetSubscriber, dict[str, int], int]:
    cfg = load_config(
        agent_config(
            broker={"url": f"mqtt://{mosquitto.host}:{mosquitto.port}", "keepalive_s": 5},
            telemetry={"interval_s": 0.1, "queue_max_messages": queue_max},
        )
    )
    assert Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=1))["state"] == "COMMITTED"
    fleet = FleetSubscriber(mosquitto.host, mosquitto.port)
    agent = Agent(cfg, serve_http=False)
    agent.start()
    stop, counts = threading.Event(), {"ok": 0, "failed": 0}
    worker = threading.Thread(target=serve_while, args=(agent, stop, counts))
    worker.start()
    try:
        wait_until(lambda: len(fleet.seqs()) >= 5, 30, "telemetry before the outage")
        mosquitto.stop()
        time.sleep(OUTAGE_S)
        assert agent.outbox is not None
        last_queued = agent.outbox.next_seq - 1
        served_during = counts["ok"]
        mosquitto.restart()
        wait_until(
            lambda: max(fleet.seqs(), default=-1) >= last_queued,
            60 + OUTAGE_S,
            f"message {last_queued} after the outage",
        )
    finally:
        stop.set()
        worker.join()
    assert counts["ok"] > served_during > 0  # it served during and after the outage
    return agent, fleet, counts, last_queued


def test_telemetry_queued_during_an_outage_arrives_in_order_exactly_once(agent_config, packages, mosquitto):
    agent, fleet, counts, last = run_outage(agent_config, packages, mosquitto, queue_max=10_000)
    try:
        assert counts["failed"] == 0
        seqs = fleet.seqs()
        first_seen: list[int] = []
        for s in seqs:
            if s not in first_seen:
                first_seen.append(s)
        assert first_seen == sorted(first_seen), "out of order"
        start = first_seen[0]
        assert first_seen[: last - start + 1] == list(range(start, last + 1)), "lost messages"
        outage_messages = int(OUTAGE_S / 0.1 * 0.8)
        assert last - start >= outage_messages  # the outage's telemetry was queued, not skipped
        assert agent.outbox is not None and agent.outbox.dropped == 0
    finally:
        agent.stop()
        fleet.close()


def test_over_its_budget_the_queue_drops_the_oldest_and_says_how_many(agent_config, packages, mosquitto):
    agent, fleet, counts, last = run_outage(agent_config, packages, mosquitto, queue_max=20)
    try:
        assert counts["failed"] == 0
        assert agent.outbox is not None
        dropped = agent.outbox.dropped
        assert dropped > 0
        received = set(fleet.seqs())
        missing = set(range(max(received) + 1)) - received
        # Each dropped row is a gap the fleet sees, except rows already handed to paho before the
        # outage was noticed: paho still delivers those (at most one publish window).
        assert 0 < len(missing) <= dropped <= len(missing) + 64, (len(missing), dropped)

        # The fleet is told, not left to guess from the gap: telemetry sent after the outage carries the count.
        def after_outage() -> list[dict[str, Any]]:
            with fleet.lock:
                return [m for m in fleet.received if m["type"] == "telemetry" and m["seq"] > last]

        # The count a message carries is the one when it was built; rows may still be dropped while the queue
        # drains after the reconnect, so the newest message catches up with the queue's own count.
        def told() -> bool:
            sent = after_outage()
            return bool(sent) and sent[-1]["queue"]["dropped"] == agent.outbox.dropped

        wait_until(told, 30, "telemetry after the outage carrying the queue's dropped count")
        assert agent.outbox.dropped >= dropped
    finally:
        agent.stop()
        fleet.close()
