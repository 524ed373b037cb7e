"""systemd integration without dependencies: sd_notify over $NOTIFY_SOCKET, and the unit file.

``notify("READY=1")`` after start-up, ``notify("WATCHDOG=1")`` every half ``WatchdogSec``
while the agent's threads are alive, ``notify("STOPPING=1")`` on the way out. Outside
systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

UNIT = """\
# /etc/systemd/system/edgeship-agent.service (written by 'edgeship agent systemd-unit')
[Unit]
Description=edgeship device agent (model serving, telemetry, OTA updates)
Documentation=https://github.com/edgeship/edgeship/blob/main/docs/agent.md
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -m edgeship agent run --config {config}
Restart=always
RestartSec=2
# The agent pings the watchdog every WatchdogSec/2 while its threads are alive.
WatchdogSec=30
TimeoutStopSec=40
User={user}
Group={user}
StateDirectory=edgeship-agent
StateDirectoryMode=0750
ConfigurationDirectory=edgeship
# Hardening: the agent needs its data directory, the network and nothing else.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices={private_devices}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=no
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0027
ReadWritePaths={data_dir}

[Install]
WantedBy=multi-user.target
"""


def unit_file(
    *,
    python: str = "/usr/bin/python3",
    config: str = "/etc/edgeship/agent.yaml",
    user: str = "edgeship",
    data_dir: str = "/var/lib/edgeship-agent",
    gpu: bool = False,
) -> str:
    """The systemd unit text. ``gpu=True`` keeps /dev visible (Jetson: the GPU is /dev/nvhost-*)."""
    return UNIT.format(
        python=python,
        config=config,
        user=user,
        data_dir=data_dir,
        private_devices="no" if gpu else "yes",
        # MemoryDenyWriteExecute stays off: XNNPACK and ONNX Runtime generate code at run time.
    )


def notify(message: str) -> bool:
    """Send ``message`` to systemd's notification socket; False when not run by systemd or on error."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None when no watchdog is armed for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.5)
    except ValueError:
        return None
