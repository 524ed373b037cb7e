"""A whole fleet on this machine, every part real: mosquitto with per-device accounts and the ACL,
``edgeship fleet serve`` processes (SQLite or PostgreSQL), agents enrolled with ``edgeship agent
enroll`` and run with ``edgeship agent run``, packages pushed and rollouts driven through the CLI
and the API. Used by tests/fleet/test_e2e.py (and the fault tests); nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
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

from edgeship.fleet.broker import Mosquitto, free_port, write_broker_config
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

    def start(self) -> FleetProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgeship", "fleet", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                cwd=REPO_ROOT,
            )
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        self, root: Path, publisher_pub: Path, *, database_url: str | None = None, fleet_processes: int = 1
    ) -> None:
        self.root = root
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
            self.processes.append(FleetProcess(config, port, root / f"fleet{i}.log").start())
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
            "http": {"host": "127.0.0.1", "port": port},
            "broker": {
                "url": f"mqtt://127.0.0.1:{self.broker.port}",
                "password_file": str(self.root / "fleet-password"),
                "accounts_file": str(self.broker_files.password_file),
                "pid_file": str(self.pid_file),
                "keepalive_s": 5,
            },
            "scheduler": {"tick_s": 0.3, "lease_s": 5, "resend_after_s": 10},
        }
        if database_url:
            data["database_url"] = database_url
        path = self.root / name
        path.write_text(yaml.safe_dump(data))
        return path

    @property
    def url(self) -> str:
        return self.processes[0].url

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

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for process in self.processes:
            process.stop()
        self.broker.stop()


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
