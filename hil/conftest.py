"""Hardware-in-the-loop options: which real devices to drive, and how to reach them over ssh.

The device tests in this folder run *on* the device (copy the repository there and run
``pytest hil/``). From a workstation, ``pytest hil/ --jetson user@host`` (or
``EDGESHIP_HIL_JETSON``) and ``--mac user@host`` (or ``EDGESHIP_HIL_MAC``) copy the
repository to the device with rsync and run the device tests there over ssh; see README.md.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What the device does not need: virtualenvs, git history, caches and build output.
RSYNC_EXCLUDES = (".venv*", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "demo-out", "build")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgeship-hil", "edgeship hardware-in-the-loop")
    group.addoption(
        "--jetson",
        metavar="HOST",
        default=os.environ.get("EDGESHIP_HIL_JETSON"),
        help="ssh destination of a Jetson with JetPack 6 (user@host); default $EDGESHIP_HIL_JETSON",
    )
    group.addoption(
        "--mac",
        metavar="HOST",
        default=os.environ.get("EDGESHIP_HIL_MAC"),
        help="ssh destination of a Mac with coremltools and torch; default $EDGESHIP_HIL_MAC",
    )
    group.addoption(
        "--hil-python",
        metavar="PATH",
        default=os.environ.get("EDGESHIP_HIL_PYTHON", "python3"),
        help="Python on the device, e.g. ~/edgeship-venv/bin/python; default $EDGESHIP_HIL_PYTHON or python3",
    )
    group.addoption(
        "--hil-dir",
        metavar="DIR",
        default=os.environ.get("EDGESHIP_HIL_DIR", "edgeship-hil"),
        help="where the repository is copied on the device, relative to its home; default edgeship-hil",
    )


@dataclass(frozen=True)
class RemoteDevice:
    """A device reached over ssh: copy this repository there and run pytest in it."""

    host: str
    python: str
    directory: str

    def sync_repo(self) -> None:
        """Mirror the working tree (uncommitted changes included) into ``directory`` on the device."""
        excludes = [f"--exclude={pattern}" for pattern in RSYNC_EXCLUDES]
        subprocess.run(
            ["rsync", "-a", "--delete", *excludes, f"{REPO}/", f"{self.host}:{self.directory}/"],
            check=True,
            timeout=600,
        )

    def run_pytest(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        """Run pytest on the device with hardware required: a missing library fails instead of skipping."""
        command = (
            f"cd {shlex.quote(self.directory)} && EDGESHIP_HIL_REQUIRE=1 "
            f"{self.python} -m pytest -p no:cacheprovider -rs {' '.join(shlex.quote(a) for a in args)}"
        )
        return subprocess.run(
            ["ssh", "-o", "BatchMode=yes", self.host, command], capture_output=True, text=True, timeout=timeout
        )


def _remote(config: pytest.Config, option: str, what: str, env: str) -> RemoteDevice:
    host = config.getoption(option)
    if not host:
        pytest.skip(f"no {what} given: pass {option} user@host or set {env}")
    for tool in ("ssh", "rsync"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed on this machine")
    return RemoteDevice(host, config.getoption("--hil-python"), config.getoption("--hil-dir"))


@pytest.fixture(scope="session")
def remote_jetson(pytestconfig: pytest.Config) -> RemoteDevice:
    """The Jetson named by --jetson / EDGESHIP_HIL_JETSON; skips the test when none is given."""
    return _remote(pytestconfig, "--jetson", "Jetson", "EDGESHIP_HIL_JETSON")


@pytest.fixture(scope="session")
def remote_mac(pytestconfig: pytest.Config) -> RemoteDevice:
    """The Mac named by --mac / EDGESHIP_HIL_MAC; skips the test when none is given."""
    return _remote(pytestconfig, "--mac", "Mac", "EDGESHIP_HIL_MAC")
