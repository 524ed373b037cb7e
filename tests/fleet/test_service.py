"""``edgeship fleet serve --no-ingest`` beside ``edgeship fleet ingest`` processes: telemetry is stored by
the ingest processes only, spread over them by the broker's shared subscription, each with its own
/metrics; a SIGTERM stops each cleanly. Every part is real (tests/fleet/e2e_harness.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgeship.fleet.broker import free_port
from edgeship.fleet.telemetry_load import TelemetryLoad
from tests.fleet.e2e_harness import REPO_ROOT, FleetRig, wait_for
from tests.fleet.fleet_fixtures import write_public_key
from tests.package_fixtures import Publisher

pytestmark = pytest.mark.slow


def _ingest_process(config: Path, name: str, log: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "edgeship", "fleet", "ingest", "-c", str(config)),
                *("--name", name, "--metrics-port", str(metrics_port)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )


def _ingested(port: int) -> float:
    """This process's stored telemetry, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edgeship_fleet_ingest_messages_total{") and 'outcome="telemetry"' in line
    )


def _answers(port: int) -> bool:
    try:
        return _ingested(port) == 0.0
    except OSError:
        return False


def test_ingest_processes_store_the_telemetry_the_serving_process_leaves_to_them(
    tmp_path: Path, publisher: Publisher
) -> None:
    pub = write_public_key(publisher, tmp_path / "publisher.pub")
    rig = FleetRig(tmp_path / "rig", pub, serve_args=("--no-ingest",))
    ingesters: list[subprocess.Popen[bytes]] = []
    try:
        config = rig.processes[0].config
        devices = [f"d{i:02d}" for i in range(20)]
        (tmp_path / "devices.csv").write_text("device_id,target\n" + "".join(f"{d},linux-x86_64\n" for d in devices))
        credentials = tmp_path / "credentials.jsonl"
        rig.cli("fleet", "import-devices", tmp_path / "devices.csv", "--out", credentials, "-c", config)
        passwords = {}
        for line in credentials.read_text().splitlines():
            row = json.loads(line)
            passwords[row["device_id"]] = row["broker"]["password"]
        ports = [free_port(), free_port()]
        ingesters = [
            _ingest_process(config, f"ingest-{i}", tmp_path / f"ingest{i}.log", port) for i, port in enumerate(ports)
        ]
        for port in ports:
            wait_for(lambda p=port: _answers(p), f"ingest /metrics on {port}", 60)
        time.sleep(1.0)  # both have subscribed
        assert rig.broker.port is not None
        load = TelemetryLoad("f1", "127.0.0.1", rig.broker.port, passwords, interval_s=0.05, duration_s=3.0)

        async def send() -> int:
            await load.connect()
            counts = await load.run()
            assert counts.connected == 20 and not (counts.refused or counts.unacknowledged or counts.dropped)
            return counts.sent

        sent = asyncio.run(send())
        wait_for(lambda: rig.query("SELECT count(*) AS n FROM telemetry")[0]["n"] >= sent, f"{sent} rows", 60)
        assert rig.query("SELECT count(*) AS n FROM telemetry")[0]["n"] == sent
        shares = [_ingested(port) for port in ports]
        # The serving process stored none of it; each ingest process stored a share.
        assert sum(shares) == sent and all(share > 0 for share in shares), shares
        for process in ingesters:
            process.send_signal(signal.SIGTERM)
        assert [process.wait(60) for process in ingesters] == [0, 0]
    finally:
        for process in ingesters:
            if process.poll() is None:
                process.kill()
        rig.close()
