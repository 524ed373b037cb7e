"""The demo's fleet chapter: ``edgeship fleet`` with enrolled agents, rollouts in waves, a halt and a roll-back.

Everything is driven through the commands an operator types: ``edgeship fleet broker-config``
(mosquitto with per-device accounts and the ACL), ``fleet init``, ``fleet serve``, ``agent
enroll`` and ``agent run`` on each device, ``fleet push``, ``fleet rollout create``, ``fleet
rollout status``. Every number printed is measured in this run.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgeship.fleet.broker import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[1]
FLEET = "demo-fleet"
DEVICES = [f"cam-{i:02}" for i in range(6)]


def edgeship(*args: Any, env: dict[str, str] | None = None, show: bool = True, check: bool = True) -> str:
    printable = " ".join(str(a) if not str(a).startswith("ese_") else "ese_..." for a in args)
    if show:
        print(f"$ edgeship {printable}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "edgeship", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if show:
        sys.stdout.write(result.stdout)
        sys.stdout.write("".join(line + "\n" for line in result.stderr.splitlines() if "token" not in line.lower()))
    if check and result.returncode != 0:
        raise SystemExit(f"demo: edgeship {printable} failed: {result.stderr.strip()}")
    return result.stdout


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise SystemExit(f"demo: no {what} within {timeout:g} s")


class Devices:
    """The demo's devices: each enrolled with a one-time token and running ``edgeship agent run``."""

    def __init__(self, out: Path, fleet_url: str, env: dict[str, str]) -> None:
        self.out, self.fleet_url, self.env = out, fleet_url, env
        self.urls: dict[str, str] = {}
        self.processes: list[subprocess.Popen[bytes]] = []

    def enroll(self, device: str, site: str) -> None:
        token = edgeship(
            "fleet",
            "enroll-token",
            "create",
            "--target",
            "linux-x86_64",
            "--tag",
            f"site={site}",
            env=self.env,
            show=False,
        ).strip()
        config = self.out / device / "agent.yaml"
        edgeship(
            "agent",
            "enroll",
            "--fleet",
            self.fleet_url,
            "--token",
            token,
            "--device-id",
            device,
            "--target",
            "linux-x86_64",
            "--data-dir",
            self.out / device / "data",
            "--out",
            config,
            show=device == DEVICES[0],
        )
        cfg = yaml.safe_load(config.read_text())
        port = free_port()
        cfg.update(
            serve={"port": port, "threads": 1},
            telemetry={"interval_s": 1.0},
            ota={"health_window_s": 2.0, "validation_runs": 5},
        )
        config.write_text(yaml.safe_dump(cfg))
        self.urls[device] = f"http://127.0.0.1:{port}"
        log = open(self.out / device / "agent.log", "wb")  # noqa: SIM115 - the process owns it
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "edgeship", "agent", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        )

    def serving(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for device, url in self.urls.items():
            try:
                with urllib.request.urlopen(f"{url}/v1/health", timeout=3) as response:
                    out[device] = json.loads(response.read())["model"]["version"]
            except (urllib.error.URLError, OSError, KeyError, TypeError, ValueError):
                out[device] = None
        return out

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()


class Traffic:
    """Images from the test set sent to every device at a steady rate (the latency gate needs traffic)."""

    def __init__(self, urls: list[str], images: np.ndarray, rate: float = 30.0) -> None:
        self.urls, self.images, self.rate = urls, images, rate
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(1.0 / self.rate):
            body = json.dumps({"inputs": self.images[i % len(self.images)][None].tolist()}).encode()
            request = urllib.request.Request(
                f"{self.urls[i % len(self.urls)]}/v1/infer", data=body, headers={"Content-Type": "application/json"}
            )
            i += 1
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
                    self.ok += 1
            except (urllib.error.URLError, OSError):
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _get(url: str, token: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def _rollout_alerts(url: str, token: str, rollout_id: int) -> list[dict[str, Any]] | None:
    """The fleet's alerts about rollout ``rollout_id`` (open and resolved), or None before there is one."""
    items = json.loads(_get(f"{url}/api/v1/alerts?open=false&limit=20", token))["items"]
    found = [a for a in items if a["subject"] == f"rollout/{rollout_id}"]
    return found or None


def create_rollout(env: dict[str, str], *args: str, show: bool = True) -> int:
    """``edgeship fleet rollout create ...``; prints the command and the waves it made, returns the id."""
    if show:
        print("$ edgeship fleet rollout create " + " ".join(args))
    created = json.loads(edgeship("fleet", "rollout", "create", *args, "--json", env=env, show=False))
    if show:
        waves = ", ".join(f"wave {w['index'] + 1}: {w['devices']} device(s)" for w in created["waves"])
        print(f"rollout {created['id']} created ({waves})")
    return int(created["id"])


def ended(env: dict[str, str], rollout_id: int) -> dict[str, Any] | None:
    status = show_status(env, rollout_id)
    return status if status["state"] in ("completed", "rolled_back", "aborted") else None


def show_status(env: dict[str, str], rollout_id: int) -> dict[str, Any]:
    return dict(json.loads(edgeship("fleet", "rollout", "status", str(rollout_id), "--json", env=env, show=False)))


def run(out: Path, keys: Path, packages: dict[str, Path], x_test: np.ndarray, step: Callable[[str], None]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    step("12. the fleet manager: a production-shaped broker, 'edgeship fleet init' and 'fleet serve'")
    (out / "fleet-password").write_text(os.urandom(18).hex())
    (out / "fleet-password").chmod(0o600)
    broker_port = free_port()
    edgeship(
        "fleet",
        "broker-config",
        "--out",
        out / "broker",
        "--fleet",
        FLEET,
        "--port",
        broker_port,
        "--fleet-password-file",
        out / "fleet-password",
    )
    conf = (out / "broker/mosquitto.conf").read_text()
    if os.geteuid() == 0:  # a demo run as root; in production mosquitto runs as its own user and owns these files
        conf = "user root\n" + conf
    broker = Mosquitto.start(out / "broker", conf, port=broker_port)
    (out / "broker/mosquitto.pid").write_text(str(broker.pid))
    port = free_port()
    settings = {
        "fleet_id": FLEET,
        "data_dir": str(out / "fleet"),
        "signing_keys": [str(keys / "edgeship.pub")],
        "http": {"port": port},
        "broker": {
            "url": f"mqtt://127.0.0.1:{broker.port}",
            "password_file": str(out / "fleet-password"),
            "accounts_file": str(out / "broker/passwd"),
            "pid_file": str(out / "broker/mosquitto.pid"),
        },
        "scheduler": {"tick_s": 0.5},
        "alerts": {"interval_s": 1},
    }
    (out / "fleet.yaml").write_text(yaml.safe_dump(settings))
    token = edgeship("fleet", "init", "--config", out / "fleet.yaml", show=False).strip().splitlines()[-1]
    print("$ edgeship fleet init --config fleet.yaml   # database, TUF repository and keys, a first admin token")
    fleet_log = open(out / "fleet.log", "wb")  # noqa: SIM115 - the process owns it
    server = subprocess.Popen(
        [sys.executable, "-m", "edgeship", "fleet", "serve", "--config", str(out / "fleet.yaml")],
        stdout=fleet_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    env = {"EDGESHIP_FLEET_URL": url, "EDGESHIP_FLEET_TOKEN": token}
    devices = Devices(out / "devices", url, env)
    traffic: Traffic | None = None
    try:
        wait_for(
            "the fleet API",
            lambda: (
                subprocess.run(
                    [sys.executable, "-m", "edgeship", "fleet", "devices"],
                    capture_output=True,
                    env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                ).returncode
                == 0
            ),
            60,
        )
        print(f"fleet API on {url}; broker on 127.0.0.1:{broker.port} with per-device accounts and the ACL")

        step(f"13. {len(DEVICES)} devices enroll with one-time tokens and start 'edgeship agent run'")
        for i, device in enumerate(DEVICES):
            devices.enroll(device, "plant-1" if i < 4 else "plant-2")
        wait_for(
            "every device online",
            lambda: (
                len(
                    [
                        d
                        for d in json.loads(edgeship("fleet", "devices", "--json", env=env, show=False))["items"]
                        if d["online"]
                    ]
                )
                == len(DEVICES)
            ),
            120,
        )
        edgeship("fleet", "devices", env=env)

        step("14. push v1, the retrained v2 and a v3 that is a much larger network (slower on the device)")
        edgeship("fleet", "push", packages["v1"], packages["v2"], packages["v3"], env=env)

        step("15. roll v1 out in three waves, then v2 while requests keep flowing")
        for version in (1, 2):
            if version == 2:  # from now on every device serves a model: requests flow through the updates
                traffic = Traffic(list(devices.urls.values()), x_test)
            t0 = time.perf_counter()
            rid = create_rollout(env, "--package", f"digits-cnn:{version}@linux-x86_64/fp32", "--waves", "34%,67%,100%")
            status = wait_for(f"rollout of v{version}", lambda rid=rid: ended(env, rid))
            waves = " | ".join(f"wave {w['index'] + 1}: {w['states']}" for w in status["waves"])
            print(f"rollout {rid} (v{version}): {status['state']} in {time.perf_counter() - t0:.1f} s   {waves}")
        print(f"devices serve {sorted(set(devices.serving().values()))}")

        step("16. v3: halted in its first wave by the fleet's latency gate, rolled back by a signed downgrade")
        print("(the devices' own latency gate is turned off for this rollout, so that the fleet's gate decides)")
        rid = create_rollout(
            env,
            "--package", "digits-cnn:3@linux-x86_64/fp32", "--waves", "34%,67%,100%", "--soak", "8s",
            "--gate", "max_latency_p99_ratio=2", "--health", "window_s=2", "--health", "max_latency_ratio=off",
        )  # fmt: skip
        status = wait_for("the end of the v3 rollout", lambda: ended(env, rid))
        edgeship("fleet", "rollout", "status", str(rid), env=env)
        serving = wait_for(
            "every device back on v2", lambda: s if set((s := devices.serving()).values()) == {2} else None, 90
        )
        assert traffic is not None
        traffic.stop()
        print(
            f"rollout {rid} (v3): {status['state']}; every device serves v{sorted(set(serving.values()))}; "
            f"{traffic.ok} requests served during the v2 and v3 rollouts, {traffic.failed} failed"
        )
        edgeship("fleet", "audit", "--limit", "8", env=env)

        step("17. what an operator watches: alerts, Prometheus metrics and the dashboard")
        alerts = wait_for("the rollout_halted alert", lambda: _rollout_alerts(url, token, rid), 30)
        for alert in alerts:
            resolved = "resolved" if alert["resolved_at"] else "open"
            print(f"alert {alert['kind']} {alert['subject']} ({alert['severity']}, {resolved}): {alert['message']}")
        metrics = _get(f"{url}/metrics", token).decode()
        shown = ("edgeship_fleet_devices{", "edgeship_fleet_ingest_messages_total{", "edgeship_fleet_alerts_open{")
        lines = [line for line in metrics.splitlines() if line.startswith(shown)]
        print(f"$ curl -H 'Authorization: Bearer ...' {url}/metrics   # {len(metrics.splitlines())} lines; a few:")
        for line in lines:
            print(f"  {line}")
        print(f"dashboard: {url}/dashboard (log in with an API token; docs/dashboard.md)")
    finally:
        if traffic is not None:
            traffic.stop()
        devices.stop()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(40)
        except subprocess.TimeoutExpired:
            server.kill()
        fleet_log.close()
        broker.stop()
