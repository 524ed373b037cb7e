"""The demo's device chapter: a fleet (broker + TUF repository), an agent process, updates over the air.

Called by ``examples/demo.py`` after the compile chapter, with the signed packages it built.
Everything is real: ``python -m edgeship agent run`` as a child process, mosquitto on a free
port, the TUF repository served over HTTP, deploy commands over MQTT, inference over the
agent's HTTP endpoint. Every number printed is measured in this run.
"""

from __future__ import annotations

import io
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
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edgeship.device_agent import protocol
from edgeship.device_agent.topics import device_topic
from edgeship.fleet.broker import Mosquitto, free_port
from edgeship.fleet.static_server import serve_directory
from edgeship.fleet.tuf_repo import TufRepository
from edgeship.runtime.package import TrustedKeys, load_private_key, read_manifest, write_package
from edgeship.runtime.package.writer import collect_directory

DEVICE, FLEET = "demo-device-1", "demo"
ROOT = Path(__file__).resolve().parents[1]


class FleetConsole:
    """The fleet's view: an MQTT client that prints what the device reports, and sends commands."""

    def __init__(self, broker: Mosquitto) -> None:
        self.events: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []
        self.status: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="demo-fleet", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(
            [(f"edgeship/v1/{FLEET}/+/{channel}", 1) for channel in ("status", "telemetry", "events")]
        )
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if not message.payload:
            return
        parsed = protocol.parse(bytes(message.payload), expected=protocol.DEVICE_TYPES)
        with self.lock:
            {"event": self.events, "telemetry": self.telemetry, "status": self.status}[parsed["type"]].append(parsed)
        if parsed["type"] == "event" and parsed["event"] in (
            "ota.transition",
            "ota.error",
            "cmd.rejected",
            "agent.started",
        ):
            extra = f" {parsed['code']}: {parsed['message']}" if parsed.get("message") else ""
            print(
                f"    device event #{parsed['seq']:<3} {parsed['event']:15} {parsed.get('state') or ''}{extra}",
                flush=True,
            )
        elif parsed["type"] == "status":
            model = parsed.get("model")
            print(
                f"    device status: {parsed['state']}"
                + (f" (serving {model['name']} v{model['version']})" if model else ""),
                flush=True,
            )

    def deploy(self, target_path: str, deployment_id: str, **fields: Any) -> None:
        command = protocol.deploy_command(f"cmd-{deployment_id}", deployment_id, target_path, time.time(), **fields)
        self.client.publish(device_topic(FLEET, DEVICE, "cmd"), protocol.encode(command), qos=1).wait_for_publish(30)

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise SystemExit(f"demo: no {what} within {timeout:g} s")

    def end_of(self, deployment_id: str) -> dict[str, Any]:
        return self.wait(
            f"end of {deployment_id}",
            lambda: next(
                (
                    e
                    for e in self.events
                    if e.get("deployment_id") == deployment_id
                    and e["event"] == "ota.transition"
                    and e["state"] in ("COMMITTED", "ROLLED_BACK", "FAILED")
                ),
                None,
            ),
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def infer(url: str, image: np.ndarray) -> tuple[int, str]:
    """One request with a .npy body; returns the predicted class and the model that answered."""
    buf = io.BytesIO()
    np.save(buf, image)
    request = urllib.request.Request(
        f"{url}/v1/infer", data=buf.getvalue(), headers={"Content-Type": "application/x-npy"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        logits = np.load(io.BytesIO(response.read()))
        return int(logits.argmax()), response.headers["X-Edgeship-Model"]


def health(url: str) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"{url}/v1/health", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, OSError):
        return None


def bump_version(package: Path, version: int, key_path: Path, pub: Path, out: Path) -> Path:
    """The same model re-packaged as another version (what a new build of it would be), signed."""
    import tempfile

    from edgeship.runtime.package import unpack_package

    verified = read_manifest(package, trusted_keys=TrustedKeys.load([pub]))
    with tempfile.TemporaryDirectory() as tmp:
        unpack_package(package, Path(tmp) / "p", trusted_keys=TrustedKeys.load([pub]), durable=False)
        contents: dict[str, Any] = {
            k: v.read_bytes()
            for k, v in collect_directory(Path(tmp) / "p", "x").items()
            if not k.startswith("x/manifest.")
        }
        contents = {k.removeprefix("x/"): v for k, v in contents.items()}
        import dataclasses

        draft = dataclasses.replace(verified.manifest, version=version, files=())
        write_package(out, draft, contents, [load_private_key(key_path)])
    return out


def run(
    out: Path, keys: Path, v1: Path, v2: Path, x_test: np.ndarray, y_test: np.ndarray, step: Callable[[str], None]
) -> None:
    pub = keys / "edgeship.pub"
    step("8. a fleet: mosquitto (per-device ACL in production, docs/broker.md) and a TUF repository served over HTTP")
    broker = Mosquitto.start(out / "broker")
    repo = TufRepository.create(out / "fleet/repo", keys_dir=out / "fleet/tuf-keys")
    server = serve_directory(out / "fleet/repo")
    trusted = TrustedKeys.load([pub])
    target_v1 = repo.add_package(v1, trusted_keys=trusted).path
    print(f"broker on {broker.host}:{broker.port}; repository {server.url}; listed {target_v1}")
    (out / "fleet/root.json").write_bytes(repo.root_bytes())
    fleet = FleetConsole(broker)

    step("9. a device: 'edgeship agent run' with this agent.yaml; the fleet deploys v1")
    port = free_port()
    here = out.resolve()  # the agent resolves relative paths against its config file's directory
    config = {
        "device_id": DEVICE,
        "fleet_id": FLEET,
        "target": "linux-x86_64",
        "data_dir": str(here / "device/data"),
        "broker": {"url": f"mqtt://{broker.host}:{broker.port}", "keepalive_s": 10},
        "updates": {
            "metadata_url": server.url + "metadata/",
            "targets_url": server.url + "targets/",
            "root": str(here / "fleet/root.json"),
            "signing_keys": [str(pub.resolve())],
        },
        "telemetry": {"interval_s": 2},
        "serve": {"port": port, "threads": 1},
        "ota": {"health_window_s": 3},
    }
    (out / "device").mkdir(parents=True, exist_ok=True)
    (out / "device/agent.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print((out / "device/agent.yaml").read_text())
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(out / "device/agent.log", "wb")  # noqa: SIM115 - closed at the end of the chapter
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgeship", "agent", "run", "--config", str(out / "device/agent.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        while (answer := health(url)) is None:
            if agent.poll() is not None:
                log.flush()
                raise SystemExit(
                    f"the agent exited with {agent.returncode}: {(out / 'device/agent.log').read_text().strip()}"
                )
            time.sleep(0.1)
        print(f"$ curl {url}/v1/health -> {answer[0]} {answer[1]['status']}  (nothing installed yet)")
        fleet.wait("online status", lambda: fleet.status)
        t0 = time.perf_counter()
        fleet.deploy(target_v1, "demo-v1")
        end = fleet.end_of("demo-v1")
        print(f"deployment demo-v1 ended {end['state']} in {time.perf_counter() - t0:.1f} s")
        hits, latencies = 0, []
        for image, label in zip(x_test, y_test):
            start = time.perf_counter()
            predicted, model = infer(url, image[None])
            latencies.append(time.perf_counter() - start)
            hits += predicted == label
        print(
            f"{len(x_test)} test images over HTTP (.npy bodies): accuracy {hits / len(x_test):.3f}, "
            f"client-side p50 {np.percentile(latencies, 50) * 1e3:.2f} ms, p99 {np.percentile(latencies, 99) * 1e3:.2f} ms, "
            f"answered by {model}"
        )
        tele = fleet.wait("telemetry with requests", lambda: [t for t in fleet.telemetry if t["requests"]])[-1]
        drift = tele.get("drift", {}).get("inputs", {}).get("image", {})
        print(
            f"telemetry #{tele['seq']}: {tele['requests']} requests, {tele['errors']} errors, p50 {tele['latency']['p50_ms']:.2f} ms "
            f"p99 {tele['latency']['p99_ms']:.2f} ms (device side), input PSI {drift.get('psi', float('nan')):.3f}, "
            f"agent RSS {tele['system']['rss_mib']:.0f} MiB, CPU {tele['system']['cpu_percent']:.0f}%"
        )

        step("10. an update while serving: v2 (retrained) is deployed while three clients keep sending requests")
        target_v2 = repo.add_package(v2, trusted_keys=trusted).path
        stop, served, failed = threading.Event(), [], []

        def load() -> None:
            while not stop.is_set():
                try:
                    served.append(infer(url, x_test[len(served) % len(x_test)][None])[1])
                except (urllib.error.URLError, OSError) as exc:
                    failed.append(str(exc))

        clients = [threading.Thread(target=load) for _ in range(3)]
        for c in clients:
            c.start()
        fleet.deploy(target_v2, "demo-v2")
        end = fleet.end_of("demo-v2")
        time.sleep(0.5)
        stop.set()
        for c in clients:
            c.join()
        by_model = {m: served.count(m) for m in sorted(set(served))}
        print(
            f"deployment demo-v2 ended {end['state']}; {len(served)} requests during it, {len(failed)} failed; answered by {by_model}"
        )

        step("11. a tampered update: v9 is listed, then a byte of it is flipped on the server (a hostile CDN)")
        v9 = bump_version(v2, 9, keys / "edgeship.key", pub, out / "device/digits-cnn-linux-x86_64-fp32-v9.edgepkg")
        info = repo.add_package(v9, trusted_keys=trusted)
        served_file = next((out / "fleet/repo/targets").rglob(f"*.{Path(info.path).name}"))
        data = bytearray(served_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        served_file.write_bytes(bytes(data))
        fleet.deploy(info.path, "demo-v9")
        end = fleet.end_of("demo-v9")
        _, model = infer(url, x_test[0][None])
        print(f"deployment demo-v9 ended {end['state']} ({end.get('code')}); the device still serves {model}")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        log.close()
        time.sleep(0.3)
        fleet.close()
        server.stop()
        broker.stop()
    print(f"agent stopped cleanly (exit {agent.returncode}); its log is {out / 'device/agent.log'}")
