"""A whole fleet on this machine, every part real: mosquitto with per-device accounts and the ACL,
``edgeship fleet serve`` processes (SQLite or PostgreSQL), agents enrolled with ``edgeship agent
enroll`` and run with ``edgeship agent run``, packages pushed and rollouts driven through the CLI
and the API. Used by tests/fleet/test_e2e.py (and the fault tests); nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from edgeship.device_agent.topics import fleet_filter, parse_topic
from edgeship.fleet.broker import Mosquitto, default_fleet_username, free_port, write_broker_config
from tests.agent_models import sample_inputs
from tests.device_agent.crash_harness import AgentProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
FLEET = "f1"
WAIT = 180.0


def run(
    *args: Any, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "edgeship", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        cwd=REPO_ROOT,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"edgeship {' '.join(map(str, args))} exited {result.returncode}: {result.stderr[-2000:]}")
    return result


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"no {what} within {timeout:g} s")


@dataclass
class FleetProcess:
    config: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()
    """More arguments of ``fleet serve`` (e.g. ``--no-ingest``)."""

    def start(self) -> FleetProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgeship", "fleet", "serve", "--config", str(self.config), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                cwd=REPO_ROOT,
            )
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def owner(self) -> str:
        """The name this process leases rollouts under (``FleetService.instance``)."""
        return f"{socket.gethostname()}-{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class FleetRig:
    """Broker + fleet processes + enrolled agents; ``close()`` stops everything."""

    def __init__(
        self,
        root: Path,
        publisher_pub: Path,
        *,
        database_url: str | None = None,
        fleet_processes: int = 1,
        scheduler: dict[str, Any] | None = None,
        front: bool = False,
        serve_args: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        # With ``front``, devices reach the TUF repository through one address in front of every fleet
        # process (a load balancer in production), so any one process may die without cutting them off.
        self.front = Front(lambda: [p.port for p in self.processes if p.alive]) if front else None
        self.database_url = database_url or f"sqlite:///{root / 'fleet-data' / 'fleet.db'}"
        self.scheduler = {"tick_s": 0.3, "lease_s": 5, "resend_after_s": 10, **(scheduler or {})}
        self.commands: CommandLog | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.fleet_password = uuid.uuid4().hex
        self.broker_files = write_broker_config(root / "broker", FLEET, {}, self.fleet_password)
        self.broker = Mosquitto.start(self.broker_files.directory, self.broker_files)
        self.pid_file = root / "broker" / "mosquitto.pid"
        self._write_pid()
        (root / "fleet-password").write_text(self.fleet_password)
        self.processes: list[FleetProcess] = []
        configs = []
        for i in range(fleet_processes):
            port = free_port()
            configs.append((self._settings(f"fleet{i}.yaml", publisher_pub, database_url, port), port))
        init = run("fleet", "init", "--config", configs[0][0])
        self.admin_token = init.stdout.strip().splitlines()[-1].strip()
        for i, (config, port) in enumerate(configs):
            self.processes.append(FleetProcess(config, port, root / f"fleet{i}.log", args=serve_args).start())
        self.agents: dict[str, AgentProcess] = {}
        self.agent_data: dict[str, Path] = {}
        for process in self.processes:
            wait_for(lambda p=process: self._answers(p.url), f"fleet API on {process.url}", 60)

    def _write_pid(self) -> None:
        self.pid_file.write_text(str(self.broker.pid))

    def _settings(self, name: str, pub: Path, database_url: str | None, port: int) -> Path:
        data: dict[str, Any] = {
            "fleet_id": FLEET,
            "data_dir": str(self.root / "fleet-data"),
            "signing_keys": [str(pub)],
            "http": {"host": "127.0.0.1", "port": port}
            | ({"public_url": f"http://127.0.0.1:{self.front.port}"} if self.front else {}),
            "broker": {
                "url": f"mqtt://127.0.0.1:{self.broker.port}",
                "password_file": str(self.root / "fleet-password"),
                "accounts_file": str(self.broker_files.password_file),
                "pid_file": str(self.pid_file),
                "keepalive_s": 5,
            },
            "scheduler": dict(self.scheduler),
        }
        if database_url:
            data["database_url"] = database_url
        path = self.root / name
        path.write_text(yaml.safe_dump(data))
        return path

    @property
    def url(self) -> str:
        """The first fleet process that is running (the API is the same on each)."""
        return next((p.url for p in self.processes if p.alive), self.processes[0].url)

    def _answers(self, url: str) -> bool:
        try:
            self.api("GET", "/api/v1/devices", base=url)
            return True
        except (urllib.error.URLError, OSError):
            return False

    # ----------------------------------------------------------------- API and CLI

    def api(
        self, method: str, path: str, body: Any = None, *, base: str | None = None, token: str | None = None
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{base or self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {token or self.admin_token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def cli(self, *args: Any, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*args, env={"EDGESHIP_FLEET_URL": self.url, "EDGESHIP_FLEET_TOKEN": self.admin_token}, check=check)

    def push(self, package: Path) -> None:
        self.cli("fleet", "push", package)

    def rollout(self, spec: dict[str, Any]) -> int:
        return int(self.api("POST", "/api/v1/rollouts", spec)["id"])

    def status(self, rollout_id: int) -> dict[str, Any]:
        return dict(self.api("GET", f"/api/v1/rollouts/{rollout_id}"))

    def wait_rollout(self, rollout_id: int, states: tuple[str, ...], timeout: float = WAIT) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            status = self.status(rollout_id)
            return status if status["state"] in states else None

        return wait_for(ended, f"rollout {rollout_id} in {states}", timeout, interval=0.5)

    # ----------------------------------------------------------------- devices

    def enroll(self, device: str, *, tags: dict[str, str] | None = None, target: str = "linux-x86_64") -> Path:
        token = (
            self.cli("fleet", "enroll-token", "create", "--target", target, "--expires", "1h")
            .stdout.strip()
            .splitlines()[-1]
        )
        config = self.root / "devices" / device / "agent.yaml"
        data_dir = self.root / "devices" / device / "data"
        args = ["agent", "enroll", "--fleet", self.url, "--token", token, "--device-id", device, "--target", target]
        for key, value in (tags or {}).items():
            args += ["--tag", f"{key}={value}"]
        run(*args, "--data-dir", data_dir, "--out", config)
        cfg = yaml.safe_load(config.read_text())
        port = free_port()
        cfg["serve"] = {"port": port, "threads": 1}
        cfg["telemetry"] = {"interval_s": 1.0}
        cfg["ota"] = {"health_window_s": 1.0, "validation_runs": 3}
        cfg["broker"]["keepalive_s"] = 5
        config.write_text(yaml.safe_dump(cfg))
        self.agent_data[device] = data_dir
        self.agents[device] = AgentProcess(config, f"http://127.0.0.1:{port}", config.parent / "agent.log")
        return config

    def start_agent(self, device: str) -> AgentProcess:
        agent = self.agents[device].start()
        agent.wait_ready()
        return agent

    def serving(self, device: str) -> int | None:
        answer = self.agents[device].health()
        if answer is None or answer[0] != 200:
            return None
        return int(answer[1]["model"]["version"])

    def start_agents(self, devices: list[str], attempts: int = 3) -> None:
        """Start the agents of ``devices`` and wait until each answers /v1/health.

        An agent whose HTTP port was taken meanwhile (a port picked at enrollment can be handed to
        some outgoing connection before the agent binds it) gets a new port and is started again.
        """
        for device in devices:
            self.agents[device].start()
        for device in devices:
            for attempt in range(attempts):
                try:
                    self.agents[device].wait_ready()
                    break
                except AssertionError:
                    agent = self.agents[device]
                    if "Address already in use" not in agent.tail() or attempt == attempts - 1:
                        raise
                    self._new_agent_port(device).start()

    def _new_agent_port(self, device: str) -> AgentProcess:
        old = self.agents[device]
        cfg = yaml.safe_load(old.config.read_text())
        port = free_port()
        cfg["serve"]["port"] = port
        old.config.write_text(yaml.safe_dump(cfg))
        self.agents[device] = AgentProcess(old.config, f"http://127.0.0.1:{port}", old.log)
        return self.agents[device]

    def wait_online(self, devices: list[str], timeout: float = 120) -> None:
        def online() -> bool:
            items = self.api("GET", "/api/v1/devices?limit=500")["items"]
            return {d["id"] for d in items if d["online"]} >= set(devices)

        wait_for(online, f"devices {devices} online", timeout)

    # ----------------------------------------------------------------- faults

    def restart_fleet(self, index: int = 0, *, down_s: float = 0.0, kill: bool = True) -> FleetProcess:
        """SIGKILL (or SIGTERM with ``kill=False``) fleet process ``index``, wait ``down_s``, start it
        again on the same port and configuration, and wait until its API answers."""
        process = self.processes[index]
        if kill:
            process.kill()
        else:
            process.stop()
        time.sleep(down_s)
        process.start()
        wait_for(lambda: self._answers(process.url), f"fleet API on {process.url} after the restart", 60)
        return process

    def restart_broker(self) -> None:
        """Stop mosquitto gracefully and start it again (same ports, accounts and database); enrollment
        signals the pid in the pid file, so it is rewritten."""
        self.broker.restart()
        self._write_pid()

    # ----------------------------------------------------------------- what happened

    def watch_commands(self) -> CommandLog:
        """Record every command the broker delivers on any device's cmd topic (stopped by ``close``)."""
        if self.commands is None:
            assert self.broker.port is not None
            self.commands = CommandLog(self.broker.port, default_fleet_username(FLEET), self.fleet_password)
        return self.commands

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Rows of a read-only SQL query on the fleet's database, as dicts."""
        engine = create_engine(
            self.database_url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool
        )
        try:
            with engine.connect() as connection:
                return [dict(row._mapping) for row in connection.execute(text(sql), params)]
        finally:
            engine.dispose()

    def rollout_devices(self, rollout_id: int) -> dict[str, dict[str, Any]]:
        """The fleet's ``rollout_devices`` rows of one rollout, by device id."""
        rows = self.query("SELECT * FROM rollout_devices WHERE rollout_id = :r", r=rollout_id)
        return {row["device_id"]: row for row in rows}

    def agent_state(self, device: str) -> dict[str, Any]:
        """The agent's ``state.json`` (slots, ``seen`` deployment ids, the ``ota`` journal); {} before it has one."""
        path = self.agent_data[device] / "state.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def seen(self, device: str, prefix: str = "") -> list[str]:
        """Deployment ids the agent accepted (at most once each), those starting with ``prefix``."""
        return [d for d in self.agent_state(device).get("seen") or [] if d.startswith(prefix)]

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for process in self.processes:
            process.stop()
        if self.commands is not None:
            self.commands.close()
        if self.front is not None:
            self.front.close()
        self.broker.stop()


@dataclass(frozen=True)
class SeenCommand:
    device: str
    message: dict[str, Any]


class CommandLog:
    """Every command the broker delivers on ``edgeship/v1/<fleet>/+/cmd``, seen through the fleet's own account.

    A persistent MQTT 5 session, so commands published while the broker restarts are delivered
    afterwards too; paho reconnects by itself.
    """

    def __init__(self, port: int, username: str, password: str) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.items: list[SeenCommand] = []
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{FLEET}-cmdlog-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(fleet_filter(FLEET, "cmd"), 1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, keepalive=5, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(20):
            raise AssertionError("the command log did not subscribe within 20 s")

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        parts = parse_topic(message.topic)
        if parts is None:
            return
        with self._lock:
            self.items.append(SeenCommand(parts.device, json.loads(message.payload)))

    def deploys(self, prefix: str = "") -> list[SeenCommand]:
        """Deploy commands whose deployment id starts with ``prefix`` (``r<rollout>-``), in arrival order."""
        with self._lock:
            return [
                c
                for c in self.items
                if c.message.get("type") == "deploy" and str(c.message.get("deployment_id", "")).startswith(prefix)
            ]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Traffic:
    """A steady, light load on many agents: ``rate`` requests per second in all, round-robin."""

    def __init__(self, agents: list[AgentProcess], rate: float = 60.0) -> None:
        self.agents, self.rate = agents, rate
        self.ok = 0
        self.failed = 0
        self._stop = threading.Event()
        self._body = json.dumps({"inputs": sample_inputs(1, seed=7).tolist()}).encode()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(1.0 / self.rate):
            agent = self.agents[i % len(self.agents)]
            i += 1
            request = urllib.request.Request(
                f"{agent.url}/v1/infer", data=self._body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
                    self.ok += 1
            except (urllib.error.URLError, OSError):
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Front:
    """A TCP front for several fleet processes, as a load balancer is in production: each connection
    goes to the first of ``backends()`` (ports on 127.0.0.1) that accepts it."""

    def __init__(self, backends: Callable[[], list[int]]) -> None:
        self.backends = backends
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="fleet-front", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        for port in self.backends():
            try:
                backend = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                continue
            backend.settimeout(None)
            threading.Thread(target=self._pump, args=(backend, client), daemon=True).start()
            self._pump(client, backend)
            return
        client.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._server.close()
