"""Kill the agent (SIGKILL) in the middle of OTA updates and check that it always comes back serving.

Used by tests/device_agent/test_crash_safety.py (bounded, in CI) and benchmarks/ota_crash.py
(1,000 kills). Everything is real: agent processes (``python -m edgeship agent run``), a
mosquitto broker, a TUF repository behind an HTTP server, signed packages.

Two kinds of kill:

* at a transition: ``EDGESHIP_AGENT_KILL_AT=before:<STATE>`` or ``after:<STATE>`` makes the agent
  kill itself just before / just after the journal write that enters the state;
* at random times: the harness kills the process from outside after a random delay, during a
  throttled download or while it verifies and unpacks a large package.

After every kill the agent is restarted and must (1) answer ``/v1/health`` with 200 and a
model as soon as it answers at all, and (2) end the deployment in the state the package calls
for (COMMITTED for a good one, ROLLED_BACK for one the health window rejects, FAILED for one
whose golden vectors fail), (3) serving the right version from a slot that verifies in full.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgeship.device_agent.config import load_config
from edgeship.device_agent.daemon import Agent
from edgeship.device_agent.faults import ENV as KILL_ENV
from edgeship.device_agent.ota import MAX_ATTEMPTS, NEVER_GIVE_UP, State
from edgeship.fleet.broker import Mosquitto, free_port
from edgeship.fleet.static_server import serve_directory
from edgeship.fleet.tuf_repo import TufRepository
from edgeship.runtime.package import TrustedKeys, load_private_key, load_public_key, verify_directory
from tests.agent_models import PackageSpec, build_package, sample_inputs
from tests.device_agent.fleet_side import FleetSide

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"COMMITTED", "ROLLED_BACK", "FAILED"}
EXPECTED = {"good": ("COMMITTED", 2), "slow": ("ROLLED_BACK", 1), "bad_golden": ("FAILED", 1)}

TRANSITION_POINTS: dict[str, list[str]] = {
    "good": [
        f"{when}:{state}"
        for state in ("DOWNLOADING", "VERIFYING", "STAGED", "VALIDATING", "ACTIVATING", "HEALTH_CHECK", "COMMITTED")
        for when in ("before", "after")
    ],
    "slow": [
        f"{when}:{state}" for state in ("HEALTH_CHECK", "ROLLING_BACK", "ROLLED_BACK") for when in ("before", "after")
    ],
    "bad_golden": [f"{when}:{state}" for state in ("VALIDATING", "FAILED") for when in ("before", "after")],
}


class AgentProcess:
    """``python -m edgeship agent run`` as a child process."""

    def __init__(
        self, config: Path, url: str, log: Path, env: dict[str, str] | None = None, python: str = sys.executable
    ) -> None:
        self.config, self.url, self.log, self.python = config, url, log, python
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.monotonic() when the process was started

    def start(self) -> AgentProcess:
        self.started_at = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "edgeship", "agent", "run", "--config", str(self.config), "--log-level", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO_ROOT,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/health", timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
        """The first answer of /v1/health (the agent recovered and serves, or says it has nothing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.health()
            if answer is not None:
                return answer
            if not self.alive:
                raise AssertionError(
                    f"agent exited with {self.process.returncode if self.process else '?'}: {self.tail()}"
                )
            time.sleep(0.02)
        raise AssertionError(f"agent did not answer /v1/health within {timeout:g} s: {self.tail()}")

    def kill(self) -> None:
        if self.alive and self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.alive and self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class CrashResult:
    name: str
    kind: str
    kills: int = 0
    killed_in: list[str] = field(default_factory=list)
    final_state: str | None = None
    final_code: str | None = None
    served_version: int | None = None
    problems: list[str] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)
    """Per restart: seconds from starting the process to its first /v1/health answer."""

    @property
    def bricked(self) -> bool:
        return any(p.startswith("no model") for p in self.problems)


class Rig:
    """The fleet side of crash runs, built once: broker, TUF repository, packages, a device data dir with v1."""

    def __init__(self, root: Path, publisher_key: Path, publisher_pub: Path, *, padding_mib: int = 24) -> None:
        self.root = root
        self.pub = publisher_pub
        key = load_private_key(publisher_key)
        self.broker = Mosquitto.start(root / "broker")
        self.repo = TufRepository.create(root / "repo", keys_dir=root / "repo-keys")
        self.server = serve_directory(root / "repo")
        self.fleet = FleetSide(self.broker, self.repo, self.server, TrustedKeys.of([load_public_key(publisher_pub)]))
        (root / "root.json").write_bytes(self.repo.root_bytes())
        pkgs = root / "packages"
        pkgs.mkdir()
        specs = {
            "v1": PackageSpec(version=1),
            "good": PackageSpec(version=2, padding_mib=padding_mib),
            "slow": PackageSpec(version=2, kind="slow", slow_layers=24),
            "bad_golden": PackageSpec(version=2, kind="bad_golden"),
        }
        self.targets: dict[str, str] = {}
        for label, spec in specs.items():
            path = build_package(pkgs / f"{label}.edgepkg", key, spec)
            if label != "v1":
                # Distinct target paths: the three v2 packages differ (a fleet would refuse that; see issue 9).
                self.targets[label] = self.fleet.publish(path, path=f"crash/{label}.edgepkg")
        self.base = root / "base-data"
        base_cfg = self.write_config("base", data_dir=self.base)
        outcome = Agent(load_config(base_cfg), serve_http=False, connect=False).install_standalone(pkgs / "v1.edgepkg")
        assert outcome["state"] == "COMMITTED", outcome
        self._count = 0

    def write_config(
        self,
        device: str,
        *,
        data_dir: Path,
        port: int = 0,
        bandwidth_kib_s: float | None = None,
        health_window_s: float = 1.5,
    ) -> Path:
        data = {
            "device_id": device,
            "fleet_id": "f1",
            "target": "linux-x86_64",
            "data_dir": str(data_dir),
            "broker": {"url": f"mqtt://{self.broker.host}:{self.broker.port}", "keepalive_s": 5},
            "updates": {
                "metadata_url": self.fleet.metadata_url,
                "targets_url": self.fleet.targets_url,
                "root": str(self.root / "root.json"),
                "signing_keys": [str(self.pub)],
                "bandwidth_kib_s": bandwidth_kib_s,
            },
            "telemetry": {"interval_s": 1.0},
            "serve": {"port": port, "threads": 1},
            "ota": {"health_window_s": health_window_s, "validation_runs": 3, "max_latency_ratio": 3.0},
        }
        path = self.root / f"{device}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def device(
        self, prefix: str, *, bandwidth_kib_s: float | None = None, health_window_s: float = 1.5
    ) -> tuple[str, Path, str, Path]:
        """A new device (id, config, local URL, data dir) starting from a copy of the base data dir (v1 committed)."""
        self._count += 1
        name = f"{prefix}-{self._count}"
        data = self.root / "devices" / name
        shutil.copytree(self.base, data)
        for leftover in ("outbox.sqlite", "outbox.sqlite-wal", "outbox.sqlite-shm", "running", "agent.lock"):
            (data / leftover).unlink(missing_ok=True)
        port = free_port()
        config = self.write_config(
            name, data_dir=data, port=port, bandwidth_kib_s=bandwidth_kib_s, health_window_s=health_window_s
        )
        return name, config, f"http://127.0.0.1:{port}", data

    def close(self) -> None:
        self.fleet.close()
        self.server.stop()
        self.broker.stop()


def journal(data: Path) -> dict[str, Any]:
    try:
        return json.loads((data / "state.json").read_bytes())
    except (OSError, ValueError):
        return {}


def ota_state(data: Path, deployment_id: str | None = None) -> tuple[str | None, int]:
    """The journaled state of ``deployment_id`` (None until the agent journaled that deployment) and its attempts."""
    ota = journal(data).get("ota") or {}
    if deployment_id is not None and ota.get("deployment_id") != deployment_id:
        return None, 0
    return ota.get("state"), int(ota.get("attempts", 0))


class Traffic:
    """Requests against the agent's endpoint in a loop (the slow model's health gate needs live traffic)."""

    def __init__(self, url: str) -> None:
        self.url, self.ok = url, 0
        self._stop = threading.Event()
        self._body = json.dumps({"inputs": sample_inputs(1, seed=4).tolist()}).encode()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            request = urllib.request.Request(
                f"{self.url}/v1/infer", data=self._body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
                    self.ok += 1
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                time.sleep(0.02)  # the agent is down between a kill and its restart (or died mid-answer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _after_restart(result: CrashResult, agent: AgentProcess) -> None:
    status, body = agent.wait_ready()
    result.restart_s.append(time.monotonic() - agent.started_at)
    if status != 200 or not body.get("model"):
        result.problems.append(f"no model served right after restart #{result.kills}: {status} {body}")


def _finish(result: CrashResult, rig: Rig, agent: AgentProcess, data: Path, dep: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state, _ = ota_state(data, dep)
        if state in TERMINAL:
            break
        if not agent.alive:
            result.problems.append(f"agent died on its own in {state}: {agent.tail()}")
            return
        time.sleep(0.05)
    ota = journal(data).get("ota") or {}
    result.final_state, result.final_code = ota.get("state"), ota.get("code")
    answer = agent.health()
    if answer is None or answer[0] != 200 or not answer[1].get("model"):
        result.problems.append(f"no model served at the end: {answer}")
    else:
        result.served_version = int(answer[1]["model"]["version"])
    want_state, want_version = EXPECTED[result.kind]
    if result.final_state != want_state:
        result.problems.append(f"ended in {result.final_state} ({result.final_code}), expected {want_state}")
    if result.served_version is not None and result.served_version != want_version:
        result.problems.append(f"serves v{result.served_version}, expected v{want_version}")
    # The active slot verifies in full against the digest the journal pinned.
    state_json = journal(data)
    active = state_json.get("active")
    record = (state_json.get("slots") or {}).get(active) if active else None
    if record is None:
        result.problems.append("no model: the journal names no active slot")
    else:
        verified = verify_directory(data / "slots" / active, trusted_keys=TrustedKeys.of([load_public_key(rig.pub)]))
        if verified.digest != record["digest"]:
            result.problems.append(f"slot {active} holds another manifest than the journal pinned")


def transition_kill(rig: Rig, kind: str, point: str) -> CrashResult:
    """Deploy ``kind`` with the agent armed to kill itself at ``point``; restart; check the outcome."""
    # The slow model's latency gate judges only with 100 requests on each side (LATENCY_MIN_REQUESTS);
    # one client on 2 loaded cores made fewer in 1.5 s once, and the gate let it commit.
    name, config, url, data = rig.device(f"t-{kind}", health_window_s=4.0 if kind == "slow" else 1.5)
    result = CrashResult(f"{kind} {point}", kind)
    log = data.parent / f"{name}.log"
    started = time.time()
    agent = AgentProcess(config, url, log, env={KILL_ENV: point}).start()
    traffic: Traffic | None = None
    try:
        agent.wait_ready()
        rig.fleet.wait_online(name, since=started)
        if kind == "slow":
            traffic = Traffic(url)
            _wait_for(lambda: traffic is not None and traffic.ok >= 40, 30)
        dep = rig.fleet.deploy(rig.targets[kind], device=name)
        code = agent.wait_exit(120)
        if code != -signal.SIGKILL:
            result.problems.append(
                f"kill point {point} was never reached (exit {code}, journal {ota_state(data, dep)})"
            )
            return result
        result.kills += 1
        result.killed_in.append(point)
        agent = AgentProcess(config, url, log).start()
        _after_restart(result, agent)
        _finish(result, rig, agent, data, dep)
    finally:
        if traffic is not None:
            traffic.stop()
        agent.stop()
    return result


def random_kills(rig: Rig, kills: int, rng: random.Random, *, phase: str = "download") -> CrashResult:
    """Deploy the large good package and kill the agent from outside at random moments, ``kills`` times at most.

    ``phase="download"``: the download is throttled, kills land while it streams (each restart resumes
    it with a Range request). ``phase="unpack"``: no throttle, kills land while the package is verified
    and unpacked into the inactive slot. A state that already used up its attempts is left alone.
    """
    bandwidth = 12 * 1024 if phase == "download" else None
    name, config, url, data = rig.device(f"r-{phase}", bandwidth_kib_s=bandwidth)
    result = CrashResult(f"random {phase}", "good")
    log = data.parent / f"{name}.log"
    started = time.time()
    agent = AgentProcess(config, url, log).start()
    try:
        agent.wait_ready()
        rig.fleet.wait_online(name, since=started)
        dep = rig.fleet.deploy(rig.targets["good"], device=name)
        while result.kills < kills:
            # download: kill while DOWNLOADING; unpack: from VERIFYING on (later states are fair game too).
            def ready() -> bool:
                state = ota_state(data, dep)[0]
                return state is not None and (state == "DOWNLOADING" if phase == "download" else state != "DOWNLOADING")

            if not _wait_for(ready, 60):
                result.problems.append(f"deployment never reached the {phase} phase: {ota_state(data, dep)}")
                break
            time.sleep(rng.uniform(0.0, 0.6 if phase == "download" else 0.3))
            state, attempts = ota_state(data, dep)
            if state in TERMINAL or state is None:
                break
            if State(state) not in NEVER_GIVE_UP and attempts >= MAX_ATTEMPTS - 1:
                break  # one more kill here would (rightly) end the deployment as a crash loop
            if phase == "download" and state != "DOWNLOADING":
                break
            agent.kill()
            result.kills += 1
            result.killed_in.append(state)
            agent = AgentProcess(config, url, log).start()
            _after_restart(result, agent)
        _finish(result, rig, agent, data, dep)
    finally:
        agent.stop()
    return result


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
