"""systemd integration: sd_notify over a real datagram socket, the watchdog, and the unit file."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from edgeship.device_agent import systemd
from edgeship.device_agent.config import load_config
from edgeship.device_agent.daemon import Agent

pytestmark = pytest.mark.py310


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def drain(sock: socket.socket, until: str, timeout: float = 15.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and until not in got:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
    return got


def test_notify_reaches_the_socket_and_is_a_no_op_outside_systemd(notify_socket, monkeypatch):
    assert systemd.notify("READY=1")
    assert notify_socket.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_abstract_socket_names_work(monkeypatch):
    name = f"edgeship-test-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert systemd.notify("WATCHDOG=1") and sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_watchdog_interval_is_half_of_watchdogsec_and_only_for_us(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    monkeypatch.delenv("WATCHDOG_PID")
    assert systemd.watchdog_interval() is None


def test_the_agent_says_ready_pings_the_watchdog_and_says_stopping(notify_socket, monkeypatch, agent_config):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every 0.5 s
    agent = Agent(load_config(agent_config()), serve_http=False)
    agent.start()
    try:
        got = drain(notify_socket, "WATCHDOG=1")
        assert got[0] == "READY=1" and "WATCHDOG=1" in got
    finally:
        agent.stop()
    assert "STOPPING=1" in drain(notify_socket, "STOPPING=1")


def test_the_unit_file_is_valid_and_hardened(tmp_path):
    unit = systemd.unit_file(python=sys.executable, config=str(tmp_path / "agent.yaml"))
    assert re.search(r"^Type=notify$", unit, re.M) and re.search(r"^Restart=always$", unit, re.M)
    assert re.search(r"^WatchdogSec=\d+", unit, re.M) and re.search(r"^User=edgeship$", unit, re.M)
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax was not checked by systemd")
    path = tmp_path / "edgeship-agent.service"
    path.write_text(unit)
    verify = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(path)], capture_output=True, text=True
    )
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert exposure is not None and float(exposure.group(1)) <= 4.0, security.stdout[-400:]
