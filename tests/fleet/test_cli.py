"""``edgeship fleet`` and ``edgeship agent enroll`` as a user runs them: real processes against the fleet API
served by a real uvicorn, one error line and the documented exit code on every failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from edgeship.device_agent.config import load_config
from edgeship.fleet.context import FleetContext
from edgeship.fleet.settings import load_settings
from tests.fleet.fleet_fixtures import ApiServer, FleetUnderTest, _fleet, write_public_key
from tests.package_fixtures import Publisher

MakePackage = Callable[..., Path]


PY310 = Path(__file__).resolve().parents[2] / ".venv-py310" / "bin" / "python"


def edgeship(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_")}
    full_env.update(env or {})
    return subprocess.run(
        [python, "-m", "edgeship", *map(str, args)], capture_output=True, text=True, timeout=120, env=full_env
    )


def fleet_env(server: ApiServer, token: str) -> dict[str, str]:
    return {"EDGESHIP_FLEET_URL": server.url, "EDGESHIP_FLEET_TOKEN": token}


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_init_creates_everything_once_and_the_token_works(tmp_path: Path, publisher: Publisher):
    key = write_public_key(publisher, tmp_path / "keys" / "publisher.pub")
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({"fleet_id": "f1", "data_dir": "data", "signing_keys": [str(key)]}))
    first = edgeship("fleet", "init", "--config", config)
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip().splitlines()[-1]
    assert token.startswith("esf_")
    assert "TUF repository" in first.stdout and "created" in first.stdout
    assert (tmp_path / "data" / "tuf" / "repo" / "metadata" / "1.root.json").is_file()
    assert (tmp_path / "data" / "tuf" / "keys" / "root.pem").stat().st_mode & 0o777 == 0o600
    again = edgeship("fleet", "init", "--config", config)
    assert again.returncode == 0 and "exists, kept" in again.stdout and "esf_" not in again.stdout
    ctx = FleetContext.open(load_settings(config))
    server = ApiServer(ctx).start()
    try:
        devices = edgeship("fleet", "devices", "--json", env=fleet_env(server, token))
        assert devices.returncode == 0, devices.stderr
        assert json.loads(devices.stdout)["total"] == 0
        # A token made directly on the database (for a lost admin token), then used over HTTP.
        direct = edgeship("fleet", "token", "create", "--name", "rescue", "--role", "read", "--config", config)
        assert direct.returncode == 0, direct.stderr
        listed = edgeship("fleet", "token", "list", "--json", env=fleet_env(server, token))
        assert [t["name"] for t in json.loads(listed.stdout)] == ["admin", "rescue"]
    finally:
        server.stop()
        ctx.close()


def test_push_reports_each_refusal_in_one_line_and_exits_3(
    api_server: ApiServer, fleet: FleetUnderTest, make_package: MakePackage, stranger: Publisher
):
    env = fleet_env(api_server, fleet.admin_token)
    good, bad = make_package(version=3), make_package(version=4, key=stranger.key)
    result = edgeship("fleet", "push", good, bad, env=env)
    assert result.returncode == 3, result.stderr
    assert f"pushed digits-cnn v3 for linux-x86_64/fp32 (package 1, {good.stat().st_size} bytes)" in result.stdout
    line = one_error_line(result)
    assert line.startswith(f"error: {bad.name}: ") and "trust" in line
    again = edgeship("fleet", "push", good, env=env)
    assert again.returncode == 3
    assert "is not above the current version 3" in one_error_line(again)
    unknown = edgeship("fleet", "push", make_package(version=5, target="jetson-nano"), env=env)
    assert unknown.returncode == 3 and "did you mean" in one_error_line(unknown)
    read_only = edgeship("fleet", "push", make_package(version=6), env=fleet_env(api_server, fleet.read_token))
    assert read_only.returncode == 2 and "read-only" in one_error_line(read_only)


def test_rollout_commands(api_server: ApiServer, fleet: FleetUnderTest, make_package: MakePackage):
    env = fleet_env(api_server, fleet.admin_token)
    assert edgeship("fleet", "push", make_package(version=2), env=env).returncode == 0
    for i in range(10):
        fleet.add_device(f"d{i}", tags={"site": "a"})
    fleet.add_device("phone", target="android-arm64", tags={"site": "a"})
    none = edgeship("fleet", "rollout", "create", "--package", "digits-cnn:2@linux-x86_64", "--tag", "site=b", env=env)
    assert none.returncode == 2 and "no enrolled device matches" in one_error_line(none)
    created = edgeship(
        "fleet",
        "rollout",
        "create",
        "--package",
        "digits-cnn:2@linux-x86_64/fp32",
        "--waves",
        "10%,50%,100%",
        "--soak",
        "10m",
        "--max-per-minute",
        "5",
        "--tag",
        "site=a",
        "--gate",
        "max_install_failure_rate=0.1",
        "--gate",
        "max_latency_p99_ratio=off",
        "--approval",
        "--health",
        "window_s=30",
        "--validation",
        "runs=20",
        "--name",
        "canary",
        "--json",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    status = json.loads(created.stdout)
    rid = status["id"]
    assert [w["devices"] for w in status["waves"]] == [1, 4, 5]
    assert status["soak_s"] == 600 and status["max_per_minute"] == 5 and status["require_approval"]
    assert status["gates"]["max_install_failure_rate"] == 0.1 and status["gates"]["max_latency_p99_ratio"] is None
    assert status["deploy"] == {"validation": {"runs": 20}, "health": {"window_s": 30}}
    shown = edgeship("fleet", "rollout", "status", str(rid), env=env)
    assert shown.returncode == 0 and f"rollout {rid} canary: pending, wave 1/3" in shown.stdout
    assert "install_failure_rate - (max 0.1)" in shown.stdout
    assert edgeship("fleet", "rollout", "pause", str(rid), env=env).stdout.strip() == f"rollout {rid}: paused"
    wrong = edgeship("fleet", "rollout", "approve", str(rid), env=env)
    assert wrong.returncode == 2 and "approve applies to a rollout that is waiting_approval" in one_error_line(wrong)
    assert edgeship("fleet", "rollout", "resume", str(rid), env=env).stdout.strip() == f"rollout {rid}: running"
    # --watch redraws until the rollout ends; here an abort ends it.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "edgeship", "fleet", "rollout", "status", str(rid), "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    time.sleep(1.0)
    assert watcher.poll() is None
    aborted = edgeship("fleet", "rollout", "abort", str(rid), "--reason", "test", env=env)
    assert aborted.stdout.strip() == f"rollout {rid}: aborted"
    out, _err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0 and f"rollout {rid} ended: aborted" in out
    listed = edgeship("fleet", "rollout", "list", "--json", env=env)
    assert json.loads(listed.stdout)["items"][0]["state"] == "aborted"
    missing = edgeship("fleet", "rollout", "status", "99", env=env)
    assert missing.returncode == 2 and "there is no rollout 99" in one_error_line(missing)
    audit = edgeship("fleet", "audit", "--json", "--action", "rollout.abort", env=env)
    assert [e["actor"] for e in json.loads(audit.stdout)] == ["token:root"]
    table = edgeship("fleet", "devices", "--tag", "site=a", "--target", "linux-x86_64", env=env)
    assert table.returncode == 0 and "10 of 10 device(s)" in table.stdout


def test_cli_errors_without_or_with_an_unreachable_fleet(fleet: FleetUnderTest):
    no_url = edgeship("fleet", "devices")
    assert no_url.returncode == 2 and "EDGESHIP_FLEET_URL" in one_error_line(no_url)
    unreachable = edgeship("fleet", "devices", "--url", "http://127.0.0.1:9", "--token", "esf_x")
    assert unreachable.returncode == 1 and "cannot reach the fleet at http://127.0.0.1:9" in one_error_line(unreachable)


@pytest.mark.parametrize("python", ["this", "py310"])
def test_agent_enroll_writes_a_config_the_agent_loads(
    tmp_path: Path, publisher: Publisher, sqlite_url: str, python: str
):
    # The device side runs on Python 3.10 (JetPack 6): enroll from the device venv too when it exists.
    if python == "py310" and not PY310.exists():
        pytest.skip(".venv-py310 does not exist (make install310)")
    interpreter = str(PY310) if python == "py310" else sys.executable
    accounts = tmp_path / "broker" / "passwd"
    accounts.parent.mkdir()
    accounts.write_text("")
    ca = tmp_path / "broker" / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    overrides = {
        "broker": {"public_url": "mqtts://broker.example:8883", "device_ca": str(ca), "accounts_file": str(accounts)}
    }
    for f in _fleet(tmp_path, publisher, sqlite_url, **overrides):
        server = ApiServer(f.ctx).start()
        try:
            env = fleet_env(server, f.admin_token)
            made = edgeship(
                "fleet",
                "enroll-token",
                "create",
                "--tag",
                "site=a",
                "--target",
                "linux-x86_64",
                "--expires",
                "1h",
                env=env,
            )
            assert made.returncode == 0, made.stderr
            token = made.stdout.strip()
            device = tmp_path / "device"
            args = [
                "agent",
                "enroll",
                "--fleet",
                server.url,
                "--token",
                token,
                "--device-id",
                "cam-1",
                "--target",
                "linux-x86_64",
                "--tag",
                "hw=r2",
                "--data-dir",
                device / "data",
                "--out",
                device / "agent.yaml",
            ]
            result = edgeship(*args, python=interpreter)
            assert result.returncode == 0, result.stderr
            assert "enrolled cam-1 in fleet f1 as linux-x86_64 with tags hw=r2 site=a" in result.stdout
            for name in ("agent.yaml", "mqtt-password", "ca.pem", "root.json", "signing-key-1.pem"):
                assert f"wrote {device / name}" in result.stdout
            config = load_config(device / "agent.yaml")
            assert (config.device_id, config.fleet_id, config.target) == ("cam-1", "f1", "linux-x86_64")
            assert config.data_dir == (device / "data").resolve()
            assert config.broker is not None and config.broker.url == "mqtts://broker.example:8883"
            assert config.broker.username == "cam-1" and config.broker.ca_file == device / "ca.pem"
            assert (device / "mqtt-password").stat().st_mode & 0o777 == 0o600
            password = config.broker.secret()
            assert password and accounts.read_text().startswith("cam-1:$7$")
            from edgeship.fleet.broker import check_password

            assert check_password(accounts.read_text().split(":", 1)[1].strip(), password)
            assert config.updates.metadata_url == f"{f.ctx.settings.http.base_url}/tuf/metadata/"
            assert config.updates.root is not None and config.updates.root.read_bytes() == f.ctx.tuf.root_bytes()
            assert config.updates.signing_keys == (device / "signing-key-1.pem",)
            # The files exist now, and the token is spent: both are refused with one line.
            again = edgeship(*args, python=interpreter)
            assert again.returncode == 2 and "exists; enroll into an empty directory" in one_error_line(again)
            other = tmp_path / "other"
            reused = edgeship(
                *args[:-4], "--data-dir", other / "data", "--out", other / "agent.yaml", python=interpreter
            )
            assert reused.returncode == 2 and "was used already (by cam-1)" in one_error_line(reused)
            assert not (other / "agent.yaml").exists()
        finally:
            server.stop()


def test_broker_config(tmp_path: Path):
    out = tmp_path / "broker"
    result = edgeship(
        "fleet", "broker-config", "--out", out, "--fleet", "f1", "--tls", "--port", "18830", "--tls-port", "18883"
    )
    assert result.returncode == 0, result.stderr
    for name in ("mosquitto.conf", "passwd", "acl", "fleet-password", "tls/ca.crt"):
        assert f"wrote {out / name}" in result.stdout
    assert (out / "fleet-password").stat().st_mode & 0o777 == 0o600
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert "listener 18830 127.0.0.1" in conf
    assert "autosave_interval 1" in conf and "autosave_on_changes true" in conf  # nothing acknowledged is lost
    assert (out / "passwd").read_text().startswith("fleet-f1:$7$")
    again = edgeship("fleet", "broker-config", "--out", out, "--fleet", "f1")
    assert again.returncode == 2 and "exists" in one_error_line(again)
    big = edgeship("fleet", "broker-config", "--out", tmp_path / "big", "--fleet", "f1", "--save-every", "300")
    assert big.returncode == 0, big.stderr
    assert "autosave_interval 300" in (tmp_path / "big/mosquitto.conf").read_text().splitlines()
    zero = edgeship("fleet", "broker-config", "--out", tmp_path / "zero", "--fleet", "f1", "--save-every", "0")
    assert zero.returncode == 2 and not (tmp_path / "zero/mosquitto.conf").exists()
