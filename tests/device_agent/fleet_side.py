"""The fleet's side of the agent tests: a real TUF repository served over HTTP and a real MQTT client.

It does what the fleet manager will do (publish packages with TUF metadata, send deploy
commands, read events and telemetry), with the same protocol module, so the agent is
tested against the contract and not against itself.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeship.device_agent import protocol
from edgeship.device_agent.topics import device_topic, parse_topic
from edgeship.fleet.broker import Mosquitto
from edgeship.fleet.static_server import StaticServer
from edgeship.fleet.tuf_repo import TufRepository, package_custom
from edgeship.runtime.package import TrustedKeys, read_manifest
from tests.brokers import Probe

WAIT = 60.0


class FleetSide:
    def __init__(
        self, broker: Mosquitto, repo: TufRepository, server: StaticServer, trusted: TrustedKeys, fleet: str = "f1"
    ) -> None:
        self.broker, self.repo, self.server, self.trusted, self.fleet = broker, repo, server, trusted, fleet
        self.probe = Probe(broker.host, broker.port, name="fleet")
        self.probe.connect()
        for channel in ("events", "telemetry", "status"):
            self.probe.subscribe(f"edgeship/v1/{fleet}/+/{channel}")

    # ----------------------------------------------------------------- packages and commands

    @property
    def metadata_url(self) -> str:
        return self.server.url + "metadata/"

    @property
    def targets_url(self) -> str:
        return self.server.url + "targets/"

    def publish(self, package: Path, *, downgrade_from: tuple[int, ...] = (), path: str | None = None) -> str:
        """List a package in the TUF repository (under its conventional path, or ``path``); returns the target path."""
        if path is None:
            info = self.repo.add_package(package, trusted_keys=self.trusted, downgrade_from=downgrade_from)
            return str(info.path)
        verified = read_manifest(package, trusted_keys=self.trusted)
        self.repo.add_target(path, package, package_custom(verified, downgrade_from=downgrade_from))
        return path

    def send(self, device: str, message: dict[str, Any] | bytes, *, expiry_s: int | None = None) -> None:
        payload = message if isinstance(message, bytes) else protocol.encode(message)
        props = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        info = self.probe.client.publish(device_topic(self.fleet, device, "cmd"), payload, qos=1, properties=props)
        info.wait_for_publish(WAIT)

    def deploy(self, target_path: str, *, device: str = "dev-1", expiry_s: int | None = 3600, **fields: Any) -> str:
        deployment_id = fields.pop("deployment_id", None) or f"dep-{uuid.uuid4().hex[:10]}"
        command = protocol.deploy_command(
            f"cmd-{uuid.uuid4().hex[:8]}", deployment_id, target_path, time.time(), **fields
        )
        self.send(device, command, expiry_s=expiry_s)
        return deployment_id

    # ----------------------------------------------------------------- what devices said

    def messages(self, channel: str, device: str = "dev-1") -> list[dict[str, Any]]:
        out = []
        for m in self.probe.received():
            parts = parse_topic(m.topic)
            if parts is None or parts.device != device or parts.channel != channel or not m.payload:
                continue
            out.append(protocol.parse(m.payload, expected=protocol.DEVICE_TYPES))
        return out

    def wait_online(self, device: str = "dev-1", since: float = 0.0, timeout: float = WAIT) -> dict[str, Any]:
        """The device's ``online`` status sent after ``since``: its command subscription is in place."""

        def online() -> dict[str, Any] | None:
            for m in reversed(self.messages("status", device)):
                if m["state"] == "online" and m["ts"] >= since:
                    return m
            return None

        return self.wait(online, f"online status of {device}", timeout)

    def events(self, device: str = "dev-1", deployment_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.messages("events", device)
            if deployment_id is None or e.get("deployment_id") == deployment_id
        ]

    def states(self, deployment_id: str, device: str = "dev-1") -> list[str]:
        return [e["state"] for e in self.events(device, deployment_id) if e["event"] == "ota.transition"]

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout:g} s; events: {[self._short(e) for e in self.events()]}")

    def wait_end(self, deployment_id: str, device: str = "dev-1", timeout: float = WAIT) -> dict[str, Any]:
        """The event that ended a deployment (COMMITTED, ROLLED_BACK or FAILED)."""

        def ended() -> dict[str, Any] | None:
            for e in self.events(device, deployment_id):
                if e["event"] == "ota.transition" and e["state"] in ("COMMITTED", "ROLLED_BACK", "FAILED"):
                    return e
            return None

        return self.wait(ended, f"end of deployment {deployment_id}", timeout)

    def wait_event(self, name: str, device: str = "dev-1", timeout: float = WAIT, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in self.events(device):
                if e["event"] == name and all(e.get(k) == v for k, v in match.items()):
                    return e
            return None

        return self.wait(found, f"{name} event matching {match}", timeout)

    @staticmethod
    def _short(e: dict[str, Any]) -> str:
        return f"{e['event']}:{e.get('state') or ''}:{e.get('code') or ''}"

    def close(self) -> None:
        self.probe.close()
