"""``edgeship agent``: the commands a field engineer types, as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.py310


def edgeship(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeship", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_install_status_verify_round_trip(agent_config, packages):
    cfg = agent_config()
    result = edgeship("agent", "install", packages(version=1), "--config", cfg)
    assert result.returncode == 0, result.stderr
    assert "installed sensor-net v1: COMMITTED (slot A)" in result.stdout
    status = json.loads(edgeship("agent", "status", "--config", cfg, "--json").stdout)
    assert status["active"] == "A" and status["slots"]["A"]["version"] == 1
    verify = edgeship("agent", "verify", "--config", cfg)
    assert verify.returncode == 0 and "slot A: sensor-net v1 OK (active)" in verify.stdout
    # Damage the installed model: verify says which slot and exits 3.
    model = next((cfg.parent / "agent-data" / "slots" / "A").rglob("model.onnx"))
    data = bytearray(model.read_bytes())
    data[-10] ^= 1
    model.write_bytes(bytes(data))
    verify = edgeship("agent", "verify", "--config", cfg)
    assert verify.returncode == 3 and "slot A: sensor-net v1 DAMAGED" in verify.stdout


def test_a_refused_install_is_one_line_and_a_non_zero_exit(agent_config, packages):
    cfg = agent_config()
    edgeship("agent", "install", packages(version=1), "--config", cfg)
    result = edgeship("agent", "install", packages(version=2, kind="bad_golden"), "--config", cfg)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "golden_failed" in errors[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["agent", "run", "--config", "missing.yaml"], "does not exist"),
        (["agent", "install", "nope.edgepkg", "--config", "x.yaml"], "nope.edgepkg does not exist"),
    ],
)
def test_usage_errors_are_one_line(args, says, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "edgeship", *args], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr


def test_a_bad_config_names_the_key(agent_config):
    cfg = agent_config(telemetry={"intervall_s": 3})
    result = edgeship("agent", "run", "--config", cfg)
    assert (
        result.returncode == 2
        and "telemetry.intervall_s: unknown setting; did you mean telemetry.interval_s?" in result.stderr
    )


def test_help_and_examples_are_printed():
    assert "install" in edgeship("agent", "--help").stdout
    assert "device_id:" in edgeship("agent", "config-example").stdout
    assert "Type=notify" in edgeship("agent", "systemd-unit").stdout
