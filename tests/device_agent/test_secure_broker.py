"""The agent on a production-shaped broker: TLS, a password account, and the per-device ACL."""

from __future__ import annotations

import time

import pytest

from edgeship.device_agent import protocol
from edgeship.device_agent.config import load_config
from edgeship.device_agent.daemon import Agent
from edgeship.device_agent.topics import device_topic
from tests.brokers import settle

pytestmark = pytest.mark.py310


def test_agent_over_tls_reports_and_obeys_only_its_own_commands(secure_broker, agent_config, packages, tmp_path):
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(secure_broker.passwords["dev-1"])
    cfg = load_config(
        agent_config(
            broker={
                "url": f"mqtts://127.0.0.1:{secure_broker.broker.tls_port}",
                "username": "dev-1",
                "password_file": str(password_file),
                "ca_file": str(secure_broker.ca),
            }
        )
    )
    assert Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=1))["state"] == "COMMITTED"
    with secure_broker.probe(secure_broker.fleet_username) as fleet:
        fleet.connect()
        fleet.subscribe("edgeship/v1/f1/+/#")
        agent = Agent(cfg, serve_http=False)
        agent.start()
        try:
            # Birth and telemetry arrive through the ACL ...
            fleet.wait_for(1)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(m.topic.endswith("/telemetry") for m in fleet.received()):
                time.sleep(0.05)
            topics = {m.topic for m in fleet.received()}
            assert (
                device_topic("f1", "dev-1", "status") in topics and device_topic("f1", "dev-1", "telemetry") in topics
            )
            # ... a command for dev-1 is executed (answered), one for dev-2 never reaches dev-1.
            report = protocol.encode({"schema": 1, "type": "selfdestruct", "id": "x", "issued_at": time.time()})
            assert fleet.publish(device_topic("f1", "dev-2", "cmd"), report).value == 0
            assert fleet.publish(device_topic("f1", "dev-1", "cmd"), report).value == 0
            deadline = time.monotonic() + 20
            rejected = []
            while time.monotonic() < deadline and not rejected:
                rejected = [
                    m for m in fleet.received() if m.topic.endswith("dev-1/events") and b"cmd.rejected" in m.payload
                ]
                time.sleep(0.05)
            assert len(rejected) == 1
            later = [m for m in settle(fleet, 1.0) if m.topic.endswith("dev-1/events") and b"cmd.rejected" in m.payload]
            assert len(later) == 1  # dev-2's command was never delivered to dev-1
            assert agent.link is not None and agent.link.rejected == 0  # it never published outside its own topics
        finally:
            agent.stop()
