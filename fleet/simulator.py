"""Simulated devices: thousands of edgeship agents in one process, on one asyncio event loop.

For tests, benchmarks and ``hil/``: each ``SimDevice`` is one MQTT 5 connection (``aiomqtt``, paho
underneath, driven by the event loop rather than a thread per client; about 15 KB per connection)
that speaks the agent's own protocol: topics from ``device_agent.topics``, every message built
with ``device_agent.protocol``'s builders and (with ``strict``) checked by its schemas before it is
sent, so a field renamed in the protocol is renamed here too. What a simulated device does:

* connects with ``clean_start = false`` and a session expiry (commands queued while it is away
  arrive when it returns), a retained ``offline`` status as its last will, and a retained
  ``online`` birth message once its ``cmd`` subscription is acknowledged;
* sends telemetry every ``telemetry_s`` (latency p50/p99, requests, errors, drift PSI, system
  numbers, OTA state) numbered with one per-device ``seq`` shared with its events;
* executes ``deploy`` commands idempotently by deployment id, answering with the event sequence
  the real agent publishes (``device_agent.updater``): ``ota.transition`` DOWNLOADING, VERIFYING,
  STAGED, VALIDATING, [SHADOW], ACTIVATING, HEALTH_CHECK, COMMITTED; or ``ota.error`` + FAILED
  (before activation, the model untouched) or ``ota.error`` + ROLLING_BACK, ROLLED_BACK (after it,
  the version quarantined); ``duplicate``, ``busy`` and ``expired`` answers as the agent gives them;
* behaves as told (``Behaviour``, fleet-wide or per device, per model version): install time,
  failure and roll-back rates, reported latency, errors and drift, going offline.

Package identity comes from the fleet's TUF metadata (``TufCatalog`` reads ``timestamp.json`` ->
snapshot -> targets without checking signatures: the simulator exercises the fleet, not TUF), or
from the target path (``<name>/<target>/<precision>/v<version>.edgepkg``) when there is no fleet.
Nothing is downloaded; ``install_s`` stands for the download and the checks.

Limits: about 20,000 sockets per process here (file descriptors); run several processes beyond.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import re
import signal
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeship.device_agent import protocol
from edgeship.device_agent.topics import device_topic
from edgeship.errors import ConfigError, EdgeshipError

log = logging.getLogger("edgeship.fleet.simulator")

AGENT_VERSION = "sim-0.1"
SESSION_EXPIRY_S = 14 * 86400
TERMINAL = ("IDLE", "COMMITTED", "FAILED", "ROLLED_BACK")
INSTALL_STATES = ("DOWNLOADING", "VERIFYING", "STAGED", "VALIDATING")
_PATH = re.compile(r"(?P<name>[^/]+)/(?P<target>[^/]+)/(?P<precision>[^/]+)/v(?P<version>\d+)\.edgepkg")


# --------------------------------------------------------------------------- behaviour


@dataclass(frozen=True)
class ModelBehaviour:
    """How a device behaves with one model version: what installing it does and what it reports running it.

    ``failure_rate``: fraction of deployments that end FAILED in VALIDATING (``failure_code``), the
    model untouched; ``unhealthy_rate``: fraction that activate, fail their health check and roll
    back; ``p50_ms``/``p99_ms``/``error_rate``/``drift_psi``: what telemetry reports while it serves.
    """

    failure_rate: float = 0.0
    failure_code: str = "validation_failed"
    unhealthy_rate: float = 0.0
    p50_ms: float = 2.0
    p99_ms: float = 6.0
    error_rate: float = 0.0
    drift_psi: float = 0.02

    def __post_init__(self) -> None:
        for name in ("failure_rate", "unhealthy_rate", "error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if self.p50_ms < 0 or self.p99_ms < self.p50_ms or self.drift_psi < 0:
            raise ConfigError("latency must satisfy 0 <= p50_ms <= p99_ms and drift_psi >= 0")


@dataclass(frozen=True)
class Behaviour:
    """A device's behaviour: timing, connectivity, and a ``ModelBehaviour`` per model version.

    ``install_s`` is the time from the deploy command to the outcome (spread over the states);
    ``offline_rate`` the chance per telemetry interval of losing the connection (the broker sends
    the last will) for ``offline_s`` seconds; ``versions`` overrides ``model`` for given versions
    (a "bad" v3: ``versions={3: ModelBehaviour(p99_ms=40)}``).
    """

    telemetry_s: float = 10.0
    install_s: float = 1.0
    requests_per_s: float = 20.0
    offline_rate: float = 0.0
    offline_s: float = 10.0
    keepalive_s: int = 30
    model: ModelBehaviour = field(default_factory=ModelBehaviour)
    versions: Mapping[int, ModelBehaviour] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.telemetry_s <= 0 or self.install_s < 0 or self.offline_s < 0 or self.requests_per_s < 0:
            raise ConfigError("telemetry_s must be > 0; install_s, offline_s and requests_per_s >= 0")
        if not 0.0 <= self.offline_rate <= 1.0:
            raise ConfigError(f"offline_rate must be in [0, 1], not {self.offline_rate}")

    def for_version(self, version: int | None) -> ModelBehaviour:
        return self.versions.get(version, self.model) if version is not None else self.model


# --------------------------------------------------------------------------- package identity


@dataclass(frozen=True)
class PackageInfo:
    """What the fleet's metadata says a target path holds."""

    name: str
    version: int
    target: str
    precision: str
    format: str
    digest: str
    downgrade_from: tuple[int, ...] = ()

    def model_ref(self, slot: str) -> dict[str, Any]:
        """The protocol's ``model`` object for this package in ``slot``."""
        return protocol.model_ref(self, slot)


def package_from_path(target_path: str, fmt: str = "onnx") -> PackageInfo:
    """A package identity read from its TUF path (``<name>/<target>/<precision>/v<version>.edgepkg``), with
    a digest derived from the path; raises ``ConfigError`` for another shape."""
    match = _PATH.fullmatch(target_path)
    if match is None:
        raise ConfigError(f"target path {target_path!r} is not <name>/<target>/<precision>/v<version>.edgepkg")
    return PackageInfo(
        match["name"],
        int(match["version"]),
        match["target"],
        match["precision"],
        fmt,
        hashlib.sha256(target_path.encode()).hexdigest(),
    )


class TufCatalog:
    """Resolves target paths through a fleet's TUF metadata (``<metadata_url>/timestamp.json`` -> snapshot ->
    targets), read once and again only when a path is not listed. Signatures are not checked."""

    def __init__(self, metadata_url: str, timeout: float = 10.0) -> None:
        self.base = metadata_url.rstrip("/") + "/"
        self.timeout = timeout
        self.targets: dict[str, PackageInfo] = {}
        self._lock = asyncio.Lock()
        self._loaded_at = -1.0

    def _get(self, name: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + name, timeout=self.timeout) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    def _load(self) -> dict[str, PackageInfo]:
        timestamp = self._get("timestamp.json")["signed"]
        snapshot_version = timestamp["meta"]["snapshot.json"]["version"]
        try:
            snapshot = self._get(f"{snapshot_version}.snapshot.json")["signed"]
        except OSError:
            snapshot = self._get("snapshot.json")["signed"]
        targets_version = snapshot["meta"]["targets.json"]["version"]
        try:
            targets = self._get(f"{targets_version}.targets.json")["signed"]["targets"]
        except OSError:
            targets = self._get("targets.json")["signed"]["targets"]
        out = {}
        for path, entry in targets.items():
            meta = (entry.get("custom") or {}).get("edgeship") or {}
            requirements = meta.get("requirements") or {}
            try:
                out[path] = PackageInfo(
                    str(meta["name"]),
                    int(meta["version"]),
                    str(meta["target"]),
                    str(meta.get("precision", "fp32")),
                    str(meta.get("format") or requirements.get("format") or "onnx"),
                    str(meta["manifest_sha256"]),
                    tuple(int(v) for v in meta.get("downgrade_from", [])),
                )
            except (KeyError, TypeError, ValueError):
                continue
        return out

    async def resolve(self, target_path: str, *, refresh: bool = False) -> PackageInfo | None:
        """The package at ``target_path``; None if the fleet does not list it. ``refresh`` re-reads the metadata
        (a roll-back re-signs the previous package with new ``downgrade_from``)."""
        if target_path in self.targets and not refresh:
            return self.targets[target_path]
        asked = time.monotonic()
        async with self._lock:
            # Thousands of devices asking at once: one read serves every request made before it started.
            if self._loaded_at < asked and (refresh or target_path not in self.targets):
                started = time.monotonic()
                self.targets = await asyncio.to_thread(self._load)
                self._loaded_at = started
        return self.targets.get(target_path)


# --------------------------------------------------------------------------- one device


@dataclass
class Deployment:
    deployment_id: str
    target_path: str
    state: str = "IDLE"
    code: str | None = None
    message: str | None = None
    package: PackageInfo | None = None


class SimDevice:
    """One simulated device: an MQTT 5 session, telemetry, and the OTA answers of the real agent."""

    def __init__(
        self,
        sim: Simulator,
        device_id: str,
        password: str | None,
        behaviour: Behaviour,
        *,
        model: PackageInfo | None = None,
        seed: int | None = None,
        seq: int = 0,
    ) -> None:
        self.sim = sim
        self.id = device_id
        self.password = password
        self.behaviour = behaviour
        self.random = random.Random(seed if seed is not None else device_id)
        self.seq = seq
        """The next sequence number. The agent keeps it on disk; a simulator run that follows another one for
        the same devices must start above the last (``--seq-start``), or its messages are duplicates."""
        self.model = model
        self.slot = "A"
        self.quarantine: set[tuple[str, int]] = set()
        self.seen: set[str] = set()
        self.ota: Deployment | None = None
        self.duplicates = 0
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.boot_id = hashlib.sha256(f"{device_id}-{time.time()}".encode()).hexdigest()[:16]
        self.sent = {"telemetry": 0, "events": 0}
        self.commands = 0
        self.outcomes: dict[str, str] = {}
        """Deployment id -> final state, in the order they ended."""
        self._offline_until = 0.0
        self._work: asyncio.Task[None] | None = None
        self._topics = {ch: device_topic(sim.fleet, device_id, ch) for ch in ("status", "telemetry", "events", "cmd")}

    # ----------------------------------------------------------------- messages

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    def _model_ref(self) -> dict[str, Any] | None:
        return self.model.model_ref(self.slot) if self.model is not None else None

    def _status(self, state: str) -> bytes:
        message = protocol.status(
            self.sim.fleet,
            self.id,
            state,
            time.time(),
            agent_version=AGENT_VERSION,
            boot_id=self.boot_id,
            model=self._model_ref(),
        )
        return self._encode(message)

    def _encode(self, message: dict[str, Any]) -> bytes:
        if self.sim.strict:
            protocol.check(message)
        return protocol.encode(message)

    def telemetry(self) -> bytes:
        """The next telemetry message (what the real agent reports over one interval)."""
        b = self.behaviour
        m = b.for_version(self.model.version if self.model else None)
        r = self.random
        requests = int(b.requests_per_s * b.telemetry_s * r.uniform(0.8, 1.2))
        errors = min(requests, round(requests * m.error_rate * r.uniform(0.8, 1.2)))
        jitter = r.uniform(0.9, 1.1)
        message = {
            "schema": protocol.SCHEMA,
            "type": "telemetry",
            "fleet": self.sim.fleet,
            "device": self.id,
            "ts": time.time(),
            "seq": self._next_seq(),
            "interval_s": b.telemetry_s,
            "model": self._model_ref(),
            "requests": requests,
            "errors": errors,
            "latency": {
                "count": requests,
                "p50_ms": round(m.p50_ms * jitter, 3) if requests else None,
                "p99_ms": round(m.p99_ms * jitter, 3) if requests else None,
                "mean_ms": round((m.p50_ms * 0.8 + m.p99_ms * 0.2) * jitter, 3) if requests else None,
            },
            "drift": {"inputs": {"input": {"psi": round(m.drift_psi * jitter, 4), "ks": 0.05}}},
            "system": {
                "cpu_percent": round(r.uniform(2, 30), 1),
                "rss_mib": round(r.uniform(80, 120), 1),
                "temperature_c": round(r.uniform(40, 60), 1),
                "load1": round(r.uniform(0, 1), 2),
            },
            "queue": {"depth": 0, "dropped": 0},
            "ota": {
                "state": self.ota.state if self.ota else "IDLE",
                "deployment_id": self.ota.deployment_id if self.ota else None,
            },
            "duplicates": self.duplicates,
        }
        return self._encode(message)

    async def _publish(self, channel: str, payload: bytes, *, retain: bool = False) -> None:
        client = self.client
        if client is None:
            raise aiomqtt.MqttError(f"{self.id} is not connected")
        await client.publish(self._topics[channel], payload, qos=1, retain=retain)

    async def emit(self, name: str, **fields: Any) -> None:
        """Send one event (``protocol.event``) with the next sequence number."""
        message = protocol.event(self.sim.fleet, self.id, self._next_seq(), time.time(), name, **fields)
        payload = self._encode(message)
        # Counted once handed to the client (paho writes it before the PUBACK wait, which a stop may cancel).
        self.sent["events"] += 1
        await self._publish("events", payload)

    # ----------------------------------------------------------------- the session

    async def run(self) -> None:
        """Stay connected until the simulator stops: reconnect after a lost connection or a spell offline."""
        delay = 1.0
        while not self.sim.stopping.is_set():
            wait = self._offline_until - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self._session()
                delay = 1.0
            except aiomqtt.MqttError as exc:
                if self.sim.stopping.is_set():
                    return
                log.debug("%s: connection lost (%s); reconnecting in %.0f s", self.id, exc, delay)
                await asyncio.sleep(delay * self.random.uniform(0.5, 1.5))
                delay = min(delay * 2, 30.0)
            finally:
                self.client = None
                self.connected.clear()

    async def _session(self) -> None:
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = SESSION_EXPIRY_S
        will = aiomqtt.Will(self._topics["status"], self._status("offline"), qos=1, retain=True)
        async with self.sim.connect_slots:
            client = aiomqtt.Client(
                self.sim.host,
                self.sim.port,
                username=self.id if self.password is not None else None,
                password=self.password,
                identifier=f"{self.sim.fleet}-{self.id}",
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
                properties=connect,
                will=will,
                keepalive=self.behaviour.keepalive_s,
                max_queued_outgoing_messages=0,
                timeout=60,
            )
            await client.__aenter__()
        try:
            self.client = client
            await client.subscribe(self._topics["cmd"], qos=1)
            await self._publish("status", self._status("online"), retain=True)
            self.connected.set()
            telemetry = asyncio.create_task(self._telemetry_loop())
            try:
                async for message in client.messages:
                    await self._on_command(message)
            finally:
                telemetry.cancel()
        finally:
            if self.sim.stopping.is_set() or self._offline_until <= time.time():
                await _close(client, clean=self.sim.stopping.is_set())

    async def _telemetry_loop(self) -> None:
        b = self.behaviour
        # Telemetry starts once every device is connected (thousands connecting while the first ones already
        # stream at full rate took 8 times longer), spread over the interval: a steady stream, not bursts.
        await self.sim.running.wait()
        await asyncio.sleep(self.random.uniform(0, b.telemetry_s))
        next_at = time.monotonic()
        while not self.sim.stopping.is_set():  # nothing after the goodbye: it would mark the device online again
            payload = self.telemetry()
            self.sent["telemetry"] += 1
            await self._publish("telemetry", payload)
            if b.offline_rate and self.random.random() < b.offline_rate:
                await self.go_offline(b.offline_s)
                return
            next_at += b.telemetry_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def go_offline(self, seconds: float) -> None:
        """Drop the connection without a clean goodbye (the broker publishes the ``offline`` will) for ``seconds``."""
        self._offline_until = time.time() + seconds
        client = self.client
        if client is not None:
            await _close(client, clean=False)

    # ----------------------------------------------------------------- commands

    async def _on_command(self, message: aiomqtt.Message) -> None:
        self.commands += 1
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        try:
            command = protocol.parse(payload, expected=protocol.COMMAND_TYPES)
        except protocol.ProtocolError as exc:
            await self.emit("cmd.rejected", code="malformed", message=str(exc))
            return
        if command["type"] == "deploy":
            await self._deploy(command)
        elif command["type"] == "report":
            payload = self.telemetry()
            self.sent["telemetry"] += 1
            await self._publish("telemetry", payload)
        elif command["type"] == "clear_quarantine":
            if command.get("all"):
                self.quarantine.clear()
            for v in command.get("versions", []):
                self.quarantine.discard((v["name"], v["version"]))
            await self.emit(
                "ota.transition",
                state=self.ota.state if self.ota else "IDLE",
                code="quarantine_cleared",
                details={"remaining": len(self.quarantine)},
            )
        else:  # cancel: the simulated install is short; answered like an agent with nothing to cancel
            await self.emit(
                "cmd.rejected", code="not_running", message=f"deployment {command['deployment_id']} is not in progress"
            )

    async def _deploy(self, command: dict[str, Any]) -> None:
        dep_id = command["deployment_id"]
        current = self.ota
        if dep_id in self.seen:
            self.duplicates += 1
            if current is not None and current.deployment_id == dep_id:
                await self.emit("ota.transition", deployment_id=dep_id, state=current.state, code="duplicate")
            return
        expires_at = command.get("expires_at")
        if expires_at is not None and expires_at < time.time():
            await self.emit(
                "cmd.rejected",
                deployment_id=dep_id,
                code="expired",
                message=f"deploy command {command['id']} expired before it arrived",
            )
            return
        if current is not None and current.state not in TERMINAL:
            await self.emit(
                "cmd.rejected",
                deployment_id=dep_id,
                code="busy",
                message=f"deployment {current.deployment_id} is in {current.state}; send again when it ends",
            )
            return
        self.seen.add(dep_id)
        self.ota = Deployment(dep_id, command["target_path"], state=current.state if current else "IDLE")
        # The install runs beside the command stream, as the agent's OTA worker does.
        self._work = asyncio.create_task(self._install(self.ota, command))

    async def _transition(
        self, dep: Deployment, state: str, *, code: str | None = None, message: str | None = None
    ) -> None:
        previous = dep.state
        dep.state = state
        if code is not None:
            dep.code, dep.message = code, message
        fields: dict[str, Any] = {"deployment_id": dep.deployment_id, "state": state, "previous_state": previous}
        if dep.code is not None and state in ("FAILED", "ROLLING_BACK", "ROLLED_BACK"):
            fields.update(code=dep.code, message=dep.message)
        if dep.package is not None:
            fields["details"] = {"name": dep.package.name, "version": dep.package.version}
        if state == "FAILED" or (state == "ROLLING_BACK" and previous != "ROLLING_BACK"):
            await self.emit(
                "ota.error", deployment_id=dep.deployment_id, state=state, code=dep.code, message=dep.message
            )
        await self.emit("ota.transition", **fields)
        if state in TERMINAL:
            self.outcomes[dep.deployment_id] = state

    async def _install(self, dep: Deployment, command: dict[str, Any]) -> None:
        try:
            await self._install_steps(dep, command)
        except aiomqtt.MqttError as exc:
            # Lost the connection mid-install: the agent would resume from its journal; the fleet re-sends
            # the command and gets "duplicate" with the state reached. Finish the install offline.
            log.debug("%s: connection lost during %s (%s)", self.id, dep.deployment_id, exc)

    async def _install_steps(self, dep: Deployment, command: dict[str, Any]) -> None:
        step_s = self.behaviour.install_s / 8
        await self._transition(dep, "DOWNLOADING")
        package = await self.sim.resolve(dep.target_path)
        if package is None:
            await self._transition(
                dep, "FAILED", code="target_not_listed", message=f"{dep.target_path} is not in the fleet's metadata"
            )
            return
        dep.package = package
        if self.model is not None and (self.model.name, self.model.version, self.model.digest) == (
            package.name,
            package.version,
            package.digest,
        ):
            dep.code, dep.message = (
                "already_installed",
                f"{package.name} v{package.version} is already the active model",
            )
            await self._transition(dep, "COMMITTED")
            return
        refusal = self._refusal(package)
        if refusal is not None and refusal[0] == "version_not_newer":
            # A roll-back target: the fleet re-signs it with downgrade_from just before it commands the revert.
            package = await self.sim.resolve(dep.target_path, refresh=True) or package
            dep.package = package
            refusal = self._refusal(package)
        if refusal is not None:
            await asyncio.sleep(step_s)
            await self._transition(dep, "FAILED", code=refusal[0], message=refusal[1])
            return
        m = self.behaviour.for_version(package.version)
        for state in ("VERIFYING", "STAGED", "VALIDATING"):
            await asyncio.sleep(step_s)
            await self._transition(dep, state)
        await asyncio.sleep(step_s)
        if self.random.random() < m.failure_rate:
            await self._transition(
                dep,
                "FAILED",
                code=m.failure_code,
                message=f"simulated: {package.name} v{package.version} failed validation",
            )
            return
        if command.get("shadow"):
            await self._transition(dep, "SHADOW")
            await asyncio.sleep(step_s)
        await self._transition(dep, "ACTIVATING")
        previous, previous_slot = self.model, self.slot
        self.model, self.slot = package, ("B" if self.slot == "A" else "A")
        await asyncio.sleep(step_s)
        await self._transition(dep, "HEALTH_CHECK")
        await asyncio.sleep(step_s * 2)
        if self.random.random() < m.unhealthy_rate:
            await self._transition(
                dep, "ROLLING_BACK", code="unhealthy", message=f"simulated: {package.name} v{package.version} unhealthy"
            )
            self.quarantine.add((package.name, package.version))
            self.model, self.slot = previous, previous_slot
            await asyncio.sleep(step_s)
            await self._transition(dep, "ROLLED_BACK")
            return
        await self._transition(dep, "COMMITTED")

    def _refusal(self, package: PackageInfo) -> tuple[str, str] | None:
        """Why the agent's pre-checks would refuse ``package`` (target, quarantine, version floor); None if not."""
        current = self.model
        if (package.name, package.version) in self.quarantine:
            return "quarantined", f"{package.name} v{package.version} was rolled back on this device"
        older = current is not None and package.name == current.name and package.version < current.version
        if older and current is not None and current.version not in package.downgrade_from:
            return "version_not_newer", f"{package.name} v{package.version} is older than v{current.version}"
        return None


async def _close(client: aiomqtt.Client, *, clean: bool) -> None:
    """End a connection: cleanly (DISCONNECT 0, no will), or as a device that died (DISCONNECT 0x04, the
    broker publishes the will as it would for a dropped connection; the session is kept)."""
    if not clean:
        paho = client._client
        paho.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))  # type: ignore[no-untyped-call]
    try:
        await asyncio.wait_for(client.__aexit__(None, None, None), 30)
    except (aiomqtt.MqttError, RuntimeError, OSError, TimeoutError):
        pass


# --------------------------------------------------------------------------- the fleet of them


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: its id, broker password (None on an anonymous broker), behaviour and starting model."""

    device_id: str
    password: str | None = None
    behaviour: Behaviour | None = None
    model: PackageInfo | None = None


class Simulator:
    """Many ``SimDevice``s on one event loop. ``start()`` connects them (at most ``connect_concurrency`` at a
    time, so the broker is not hit by thousands of CONNECTs at once), ``stop()`` disconnects them cleanly."""

    def __init__(
        self,
        fleet: str,
        host: str,
        port: int,
        devices: Sequence[DeviceSpec],
        *,
        behaviour: Behaviour | None = None,
        metadata_url: str | None = None,
        strict: bool = True,
        connect_concurrency: int = 200,
    ) -> None:
        self.fleet, self.host, self.port = fleet, host, port
        self.strict = strict
        self.behaviour = behaviour or Behaviour()
        self.catalog = TufCatalog(metadata_url) if metadata_url else None
        self.stopping = asyncio.Event()
        self.running = asyncio.Event()
        """Set once every device has connected (``start``); telemetry waits for it."""
        self.connect_slots = asyncio.Semaphore(connect_concurrency)
        self.devices = {
            spec.device_id: SimDevice(
                self, spec.device_id, spec.password, spec.behaviour or self.behaviour, model=spec.model
            )
            for spec in devices
        }
        self._tasks: list[asyncio.Task[None]] = []

    async def resolve(self, target_path: str, *, refresh: bool = False) -> PackageInfo | None:
        """The package at ``target_path`` (the fleet's metadata, or the path itself without a fleet)."""
        if self.catalog is None:
            return package_from_path(target_path)
        return await self.catalog.resolve(target_path, refresh=refresh)

    async def start(self, timeout: float = 300.0) -> None:
        """Start every device and wait until each has sent its birth message; raises ``TimeoutError``."""
        self._tasks = [asyncio.create_task(d.run(), name=f"sim-{d.id}") for d in self.devices.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*(d.connected.wait() for d in self.devices.values())), timeout)
        finally:
            self.running.set()

    async def stop(self, timeout: float = 60.0) -> None:
        """Say goodbye (retained ``offline``) and disconnect every device cleanly; raises ``TimeoutError``."""
        self.stopping.set()
        # A clean stop says goodbye with a retained offline status, as the agent does.
        goodbyes = [d._publish("status", d._status("offline"), retain=True) for d in self.devices.values() if d.client]
        await asyncio.wait_for(asyncio.gather(*goodbyes, return_exceptions=True), timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for device in self.devices.values():
            if device.client is not None:
                await _close(device.client, clean=True)

    def counts(self) -> dict[str, int]:
        """Messages sent and commands received, over every device."""
        out = {"devices": len(self.devices), "connected": 0, "telemetry": 0, "events": 0, "commands": 0}
        for d in self.devices.values():
            out["connected"] += d.connected.is_set()
            out["telemetry"] += d.sent["telemetry"]
            out["events"] += d.sent["events"]
            out["commands"] += d.commands
        return out

    def outcomes(self, prefix: str = "") -> dict[str, int]:
        """How many deployments whose id starts with ``prefix`` ended in each terminal state."""
        out: dict[str, int] = {}
        for d in self.devices.values():
            for dep, state in d.outcomes.items():
                if dep.startswith(prefix):
                    out[state] = out.get(state, 0) + 1
        return out


def with_version(behaviour: Behaviour, version: int, model: ModelBehaviour) -> Behaviour:
    """``behaviour`` with ``model`` for one version (a bad release for a test)."""
    return replace(behaviour, versions={**behaviour.versions, version: model})


# --------------------------------------------------------------------------- command line


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """The options naming the devices and their broker (``device_passwords`` reads them); shared with
    ``fleet.telemetry_load``."""
    p.add_argument("--fleet", required=True, help="fleet id (the topics' <fleet>)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the MQTT broker")
    p.add_argument("--credentials", help="JSON lines with device_id and password (edgeship fleet import-devices --out)")
    p.add_argument("--devices", type=int, default=100, help="without --credentials: this many anonymous devices")
    p.add_argument("--prefix", default="sim-", help="device id prefix for --devices")


def device_passwords(args: argparse.Namespace) -> dict[str, str | None]:
    """Device id -> broker password: the lines of ``--credentials`` (``edgeship fleet import-devices --out``
    agent bundles, or ``{"device_id", "password"}``), else ``--devices`` anonymous devices.
    Raises ``ConfigError`` naming the file and line that is not such a line."""
    if not args.credentials:
        return {f"{args.prefix}{i:05d}": None for i in range(args.devices)}
    devices: dict[str, str | None] = {}
    try:
        with open(args.credentials) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    devices[str(row["device_id"])] = row.get("password") or (row.get("broker") or {}).get("password")
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ConfigError(
                        f"{args.credentials}, line {number}: not a device's credentials (a JSON object with "
                        "device_id, as 'edgeship fleet import-devices --out' writes them)"
                    ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read --credentials {args.credentials}: {exc.strerror or exc}") from None
    return devices


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edgeship.fleet.simulator",
        description="Run simulated edgeship devices against a broker (and a fleet's TUF metadata).",
    )
    add_device_arguments(p)
    p.add_argument("--metadata-url", help="the fleet's TUF metadata URL (package identities); else read from the path")
    p.add_argument("--initial", help="target path of the package every device starts with")
    p.add_argument("--telemetry-s", type=float, default=10.0)
    p.add_argument("--install-s", type=float, default=1.0)
    p.add_argument("--failure-rate", type=float, default=0.0, help="fraction of deployments failing validation")
    p.add_argument("--p99-ms", type=float, default=6.0)
    p.add_argument("--bad-version", type=int, help="this version fails/slows down as --bad-* says")
    p.add_argument("--bad-failure-rate", type=float, default=0.0)
    p.add_argument("--bad-p99-ms", type=float, default=60.0)
    p.add_argument("--offline-rate", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: until interrupted)")
    p.add_argument("--no-strict", action="store_true", help="do not check each message against the schema")
    p.add_argument("--seq-start", type=int, default=0, help="first sequence number (above an earlier run's)")
    p.add_argument("--stats-s", type=float, default=10.0, help="print counts every N seconds")
    return p


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.broker.rpartition(":")
    specs = [DeviceSpec(device, password) for device, password in device_passwords(args).items()]
    behaviour = Behaviour(
        telemetry_s=args.telemetry_s,
        install_s=args.install_s,
        offline_rate=args.offline_rate,
        model=ModelBehaviour(failure_rate=args.failure_rate, p99_ms=args.p99_ms, p50_ms=min(2.0, args.p99_ms)),
    )
    if args.bad_version is not None:
        bad = ModelBehaviour(
            failure_rate=args.bad_failure_rate, p99_ms=args.bad_p99_ms, p50_ms=min(2.0, args.bad_p99_ms)
        )
        behaviour = with_version(behaviour, args.bad_version, bad)
    sim = Simulator(
        args.fleet,
        host or "127.0.0.1",
        int(port),
        [],
        behaviour=behaviour,
        metadata_url=args.metadata_url,
        strict=not args.no_strict,
    )
    initial = None
    if args.initial:
        initial = await sim.resolve(args.initial)
        if initial is None:
            raise SystemExit(f"error: {args.initial} is not listed in the fleet's metadata; push it first")
    sim.devices = {
        s.device_id: SimDevice(sim, s.device_id, s.password, behaviour, model=initial, seq=args.seq_start)
        for s in specs
    }
    done = asyncio.Event()
    # SIGTERM (a benchmark or service manager stopping us) ends the run cleanly: offline statuses, counts.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    started = time.monotonic()
    await sim.start()
    print(
        json.dumps({"event": "started", "devices": len(specs), "connect_s": round(time.monotonic() - started, 2)}),
        flush=True,
    )
    try:
        running = time.monotonic()  # --duration counts from when every device is connected
        while not done.is_set() and (not args.duration or time.monotonic() - running < args.duration):
            try:
                await asyncio.wait_for(done.wait(), args.stats_s)
            except TimeoutError:
                pass
            print(json.dumps({"event": "stats", **sim.counts(), "outcomes": sim.outcomes()}), flush=True)
    finally:
        await sim.stop()
        print(json.dumps({"event": "stopped", **sim.counts(), "outcomes": sim.outcomes()}), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        pass
    except EdgeshipError as exc:  # a bad --credentials file or option: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
