"""mosquitto for edgeship: a production-shaped broker configuration and a broker process for tests and demos.

What is generated (``write_broker_config``), for one fleet:

* ``mosquitto.conf``: listeners (plain on 127.0.0.1 for development, TLS, optionally mutual TLS with
  the certificate's CN as username), one set of security settings for all listeners, unlimited
  per-client queues, persistence saved after every change (by default), a log file, no pid file.
* ``passwd``: one line per account in mosquitto 2.0's own ``$7$`` hash format (PBKDF2-HMAC-SHA512),
  written here in Python, byte-compatible with ``mosquitto_passwd``.
* ``acl``: the device pattern lines of ``edgeship.device_agent.topics.acl_patterns`` (a device writes
  only its own status/telemetry/events and reads only its own cmd) and read+write on the fleet's
  subtree for the fleet's own account.
* ``tls/``: a development CA, a server certificate for 127.0.0.1/localhost and, for mutual TLS,
  one client certificate per account (CN = username). Production uses its own CA (docs/broker.md).

Facts this module is built on (mosquitto 2.0.11, measured in docs/broker.md and FACTS.md): the ACL
file never refuses a SUBSCRIBE, it filters delivery; with MQTT 5 a refused PUBLISH gets PUBACK
0x87, after which Debian's 2.0.11 build closes the connection; the default queue limits drop QoS 1
messages for a slow or offline subscriber; queued messages survive a kill -9 only when the database
is autosaved on changes; SIGHUP re-reads the password and ACL files, so devices are added without
a restart.

``Mosquitto`` runs a real broker in the foreground on free ports (tests, demos, benchmarks). It is
not how production runs mosquitto (a service manager does that), but it runs the same files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from edgeship.device_agent import topics
from edgeship.errors import BrokerError, ConfigError
from edgeship.fleet.dev_tls import ClientCert, TlsFiles, create_dev_tls, issue_client_cert, write_private

# ---------------------------------------------------------------------------------------------
# Passwords
# ---------------------------------------------------------------------------------------------

PBKDF2_ITERATIONS = 101
"""What ``mosquitto_passwd`` 2.0.11 writes (``$7$101$...``). mosquitto is single-threaded and hashes on
every CONNECT, so a fleet reconnecting after a broker restart pays this per device; the broker reads
the count from each line, so a larger one is accepted too (``hash_password(iterations=...)``)."""

_SALT_BYTES = 12  # mosquitto_passwd's salt length
_HASH_RE = re.compile(r"\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Hash ``password`` the way mosquitto 2.0 stores it: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``.

    A random 12-byte salt is drawn unless ``salt`` is given (tests compare against ``mosquitto_passwd``).
    Raises ``ConfigError`` for an empty password or an iteration count below 1.
    """
    if not password:
        raise ConfigError("an empty MQTT password is not allowed: give every account a password")
    if iterations < 1:
        raise ConfigError(f"PBKDF2 iterations must be >= 1, not {iterations}")
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(encoded: str, password: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash as written by ``hash_password`` or ``mosquitto_passwd``.

    Raises ``ConfigError`` if ``encoded`` is not a ``$7$`` hash.
    """
    match = _HASH_RE.fullmatch(encoded.strip())
    if match is None:
        raise ConfigError(f"{encoded[:12]!r}... is not a mosquitto $7$ password hash")
    iterations, salt, digest = int(match[1]), base64.b64decode(match[2]), base64.b64decode(match[3])
    computed = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(computed, digest)


def password_line(username: str, password: str) -> str:
    """One ``username:$7$...`` line of a mosquitto password file (no newline); raises ``ConfigError`` for a bad name."""
    _check_username(username)
    return f"{username}:{hash_password(password)}"


def password_file_users(path: Path) -> list[str]:
    """Usernames listed in a mosquitto password file, in file order."""
    return [line.split(":", 1)[0] for line in path.read_text().splitlines() if ":" in line]


def _check_username(username: str) -> None:
    # Usernames become ACL ``%u`` substitutions and password-file keys: the topic id rules keep
    # them free of ':', newlines, wildcards and '/'.
    topics.check_id("MQTT username", username)


# ---------------------------------------------------------------------------------------------
# ACL
# ---------------------------------------------------------------------------------------------


def default_fleet_username(fleet: str) -> str:
    """The fleet service's own MQTT account name: ``fleet-<fleet>``."""
    return f"fleet-{topics.check_id('fleet id', fleet)}"


def render_acl(fleet: str, fleet_username: str | None = None) -> str:
    """The text of a mosquitto ACL file for one fleet.

    Device accounts (username = device id) get the ``pattern`` lines of ``topics.acl_patterns``; the
    fleet's account (``fleet-<fleet>`` unless named) gets read+write on ``edgeship/v1/<fleet>/#``, which
    covers publishing commands and consuming telemetry/events, also through ``$share/<group>/...``.
    Raises ``ConfigError`` for a bad fleet id or username.
    """
    fleet_username = fleet_username or default_fleet_username(fleet)
    _check_username(fleet_username)
    return "\n".join(
        [
            f"# mosquitto ACL for edgeship fleet {fleet!r} (generated by edgeship.fleet.broker).",
            "# mosquitto grants every SUBSCRIBE and filters delivery by these lines; with MQTT 5 a",
            "# refused PUBLISH gets PUBACK/PUBREC reason code 0x87 (Not authorized), and then",
            "# mosquitto 2.0.11 (Debian 12) closes the client's connection.",
            "",
            "# Devices (username = device id): write own status/telemetry/events, read own cmd.",
            "# pattern lines apply to every account, wherever they stand in the file.",
            *topics.acl_patterns(fleet),
            "",
            "# The fleet service: commands out, telemetry/events/status in.",
            f"user {fleet_username}",
            f"topic readwrite {topics.ROOT}/{fleet}/#",
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------
# mosquitto.conf
# ---------------------------------------------------------------------------------------------

_EXPIRY_RE = re.compile(r"[1-9][0-9]*[hdwmy]")


@dataclass(frozen=True)
class BrokerSettings:
    """Everything ``render_mosquitto_conf`` writes; validated on construction (``ConfigError``).

    Ports: ``None`` = no such listener, ``0`` = pick a free port when ``Mosquitto`` starts the
    broker (``render_mosquitto_conf`` needs real ports). The queue limits and ``autosave_interval``
    take ``None`` for "leave mosquitto's default", which the tests use to show what the defaults lose.
    ``allow_anonymous`` ``None`` means: anonymous only if there is neither a password file nor mutual TLS.
    """

    port: int | None = 0
    host: str = "127.0.0.1"
    tls_port: int | None = None
    tls_host: str | None = "127.0.0.1"
    """Bind address of the TLS listener; ``None`` listens on every interface (production)."""
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    mutual_tls: bool = False
    password_file: Path | None = None
    acl_file: Path | None = None
    allow_anonymous: bool | None = None
    persistence: bool = True
    persistence_location: Path | None = None
    autosave_interval: int | None = 1
    autosave_on_changes: bool = True
    max_queued_messages: int | None = 0
    max_queued_bytes: int | None = 0
    max_inflight_messages: int | None = 0
    persistent_client_expiration: str | None = "14d"
    log_file: Path | None = None
    user: str | None = None
    """Account mosquitto switches to when started as root (its default is ``mosquitto``)."""
    extra_lines: tuple[str, ...] = ()
    """Further global lines, written before the listeners (e.g. a plugin)."""

    def __post_init__(self) -> None:
        for name in ("port", "tls_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name} {value} is not a TCP port: use 1-65535, 0 for a free port, None for none")
        if self.port is None and self.tls_port is None:
            raise ConfigError("the broker has no listener: set port (plain) or tls_port (TLS)")
        if self.tls_port is not None and None in (self.cafile, self.certfile, self.keyfile):
            raise ConfigError(
                "a TLS listener needs cafile, certfile and keyfile (create_dev_tls makes development ones)"
            )
        if self.mutual_tls and self.tls_port is None:
            raise ConfigError("mutual_tls needs a TLS listener: set tls_port")
        for name in ("max_queued_messages", "max_queued_bytes", "max_inflight_messages", "autosave_interval"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = unlimited), not {value}")
        expiry = self.persistent_client_expiration
        if expiry is not None and not _EXPIRY_RE.fullmatch(expiry):
            raise ConfigError(
                f"persistent_client_expiration {expiry!r} is not a mosquitto duration: use e.g. 12h, 14d, 2w, 1m, 1y"
            )

    @property
    def anonymous(self) -> bool:
        """Whether the rendered config allows clients without a username."""
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return self.password_file is None and not self.mutual_tls


def render_mosquitto_conf(settings: BrokerSettings) -> str:
    """The text of a mosquitto 2.0 configuration file for ``settings``, with comments that say why.

    Raises ``ConfigError`` if a listener port is still 0 (``free_port`` or ``Mosquitto.start`` picks one).
    """
    if settings.port == 0 or settings.tls_port == 0:
        raise ConfigError("a listener port is 0: pick a real port first (free_port(), or let Mosquitto.start do it)")
    out = [
        "# mosquitto 2.0 configuration for edgeship (generated by edgeship.fleet.broker; docs/broker.md).",
        "# Runs in the foreground without a pid_file: the service manager or test fixture owns the process.",
        "",
        "# One set of security settings (password_file, acl_file, allow_anonymous) for every listener.",
        "per_listener_settings false",
        f"allow_anonymous {_bool(settings.anonymous)}",
    ]
    if settings.password_file is not None:
        out.append(f"password_file {settings.password_file}")
    if settings.acl_file is not None:
        out.append(f"acl_file {settings.acl_file}")
    if settings.user is not None:
        out.append(f"user {settings.user}")
    out += [
        "",
        "# Per-client queues. mosquitto's defaults (max_queued_messages 1000, max_inflight_messages 20)",
        "# silently drop QoS 1 messages for a slow or offline subscriber ('Outgoing messages are being",
        "# dropped'): measured with 5,000 commands queued for an offline device (tests/fleet/test_broker.py).",
        "# 0 = unlimited: a backlog becomes latency and memory, never loss. What bounds it instead:",
        "# persistent_client_expiration below, and watching $SYS/broker/store/messages/count.",
    ]
    out += _optional("max_queued_messages", settings.max_queued_messages)
    out += _optional("max_queued_bytes", settings.max_queued_bytes)
    out += _optional("max_inflight_messages", settings.max_inflight_messages)
    out += ["", f"persistence {_bool(settings.persistence)}"]
    if settings.persistence:
        out += [
            "# Sessions and queued QoS 1 messages live in memory until the database is saved; a timed save",
            "# (default every 1800 s) loses them on kill -9 or power loss. autosave_on_changes makes",
            "# autosave_interval a count of changes (subscriptions, retained and queued messages):",
            "# at most that many are lost on a crash. Each save rewrites the whole database, so 1 costs",
            "# a full write per message (docs/broker.md has the measured price).",
        ]
        if settings.persistence_location is not None:
            # mosquitto before 2.0 concatenated location and file name: keep the trailing slash.
            out.append(f"persistence_location {str(settings.persistence_location).rstrip('/')}/")
        out += _optional("autosave_interval", settings.autosave_interval)
        out.append(f"autosave_on_changes {_bool(settings.autosave_on_changes)}")
    if settings.persistent_client_expiration is not None:
        out += [
            "# A device offline for longer than this loses its session and queued commands (it gets the",
            "# current state again on its next connect); without it, sessions of dead devices pile up.",
            f"persistent_client_expiration {settings.persistent_client_expiration}",
        ]
    out += ["", f"log_dest {'stderr' if settings.log_file is None else f'file {settings.log_file}'}"]
    out += ["log_timestamp_format %Y-%m-%dT%H:%M:%S", "connection_messages true"]
    if settings.extra_lines:
        out += ["", *settings.extra_lines]
    if settings.port is not None:
        out += [
            "",
            "# Plain MQTT, for development and for processes on this host only.",
            f"listener {settings.port} {settings.host}",
        ]
    if settings.tls_port is not None:
        bind = "" if settings.tls_host is None else f" {settings.tls_host}"
        out += ["", "# MQTT over TLS.", f"listener {settings.tls_port}{bind}"]
        out += [f"cafile {settings.cafile}", f"certfile {settings.certfile}", f"keyfile {settings.keyfile}"]
        out.append("tls_version tlsv1.2")
        if settings.mutual_tls:
            out += [
                "# Mutual TLS: a client certificate signed by cafile is required, and its CN is the",
                "# username the ACL sees (the password file is not consulted on this listener).",
                "require_certificate true",
                "use_identity_as_username true",
            ]
    return "\n".join(out) + "\n"


def _optional(name: str, value: int | None) -> list[str]:
    return [] if value is None else [f"{name} {value}"]


def _bool(value: bool) -> str:
    return "true" if value else "false"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, below the kernel's ephemeral range when there is room there.

    Servers that restart on the same port (a broker, an agent, a fleet process) would otherwise pick
    a port from the ephemeral range, which any outgoing connection of any process may take while the
    server is down; below it only another explicit bind can. Falls back to a port the kernel chooses.
    """
    low = _ephemeral_low()
    for _ in range(50):
        port = random.randrange(10000, low) if low > 10100 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
            return chosen
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        fallback: int = sock.getsockname()[1]
        return fallback


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------------------------------------
# The files of one fleet's broker
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerFiles:
    """The configuration written by ``write_broker_config``.

    ``settings`` holds the ports as requested (0 = picked when ``Mosquitto`` starts); ``conf`` was
    rendered with free ports picked at write time, and ``Mosquitto.start(files.directory, files)``
    rewrites it with the ports the broker really uses.
    """

    directory: Path
    fleet: str
    fleet_username: str
    settings: BrokerSettings
    conf: Path
    password_file: Path
    acl_file: Path
    tls: TlsFiles | None


def write_broker_config(
    directory: Path,
    fleet: str,
    devices: Mapping[str, str],
    fleet_password: str,
    *,
    tls: bool = False,
    mutual_tls: bool = False,
    port: int | None = 0,
    tls_port: int = 0,
    tls_host: str | None = "127.0.0.1",
    fleet_username: str | None = None,
    autosave_interval: int = 1,
) -> BrokerFiles:
    """Write ``mosquitto.conf``, ``passwd``, ``acl`` (and ``tls/`` with development certificates) for one fleet.

    ``devices`` maps device id (= MQTT username) to password; the fleet's own account is
    ``fleet_username`` (default ``fleet-<fleet>``). ``port`` is the plain listener on 127.0.0.1
    (``None``: none), ``tls_port`` the TLS listener when ``tls`` or ``mutual_tls``; 0 picks a free
    port. With ``mutual_tls`` every account also gets a client certificate (CN = username). The
    password file is 0600, private keys 0600; persistence goes to ``directory/data``, the log to
    ``directory/mosquitto.log``. ``autosave_interval`` counts changes between database saves: 1 loses
    nothing acknowledged on a kill -9 but rewrites the database per message (docs/broker.md has the
    cost). Raises ``ConfigError`` for a bad id, an empty password, or a device
    named like the fleet account.
    """
    topics.check_id("fleet id", fleet)
    fleet_username = fleet_username or default_fleet_username(fleet)
    _check_username(fleet_username)
    for device in devices:
        topics.check_id("device id", device)
    if fleet_username in devices:
        raise ConfigError(f"device id {fleet_username!r} is the fleet's own account name: rename the device")
    tls = tls or mutual_tls
    directory.mkdir(parents=True, exist_ok=True)
    tls_files: TlsFiles | None = None
    if tls:
        accounts = [fleet_username, *devices] if mutual_tls else []
        tls_files = create_dev_tls(directory / "tls", clients=accounts)
    settings = BrokerSettings(
        port=port,
        tls_port=tls_port if tls else None,
        tls_host=tls_host,
        cafile=tls_files.ca_cert if tls_files else None,
        certfile=tls_files.server_cert if tls_files else None,
        keyfile=tls_files.server_key if tls_files else None,
        mutual_tls=mutual_tls,
        password_file=directory / "passwd",
        acl_file=directory / "acl",
        persistence_location=directory / "data",
        autosave_interval=autosave_interval,
        log_file=directory / "mosquitto.log",
    )
    lines = [password_line(fleet_username, fleet_password)]
    lines += [password_line(device, password) for device, password in devices.items()]
    write_private(directory / "passwd", ("\n".join(lines) + "\n").encode())
    (directory / "acl").write_text(render_acl(fleet, fleet_username))
    (directory / "data").mkdir(exist_ok=True)
    conf = directory / "mosquitto.conf"
    conf.write_text(render_mosquitto_conf(_with_free_ports(settings)))
    return BrokerFiles(
        directory, fleet, fleet_username, settings, conf, directory / "passwd", directory / "acl", tls_files
    )


def add_device(
    files: BrokerFiles, device_id: str, password: str, *, broker: Mosquitto | None = None
) -> ClientCert | None:
    """Give ``device_id`` an account: append it to the password file and, with mutual TLS, issue its certificate.

    The password file is replaced atomically, so a broker re-reading it never sees half a file. With
    ``broker``, the running broker is sent SIGHUP and re-reads its password and ACL files (no
    restart, no dropped connections); for a broker run by a service manager, reload it there
    (``systemctl reload mosquitto``). The ACL needs no change: device rules are ``%u`` patterns.
    Returns the client certificate under mutual TLS, else None. Raises ``ConfigError`` for a bad
    id, an empty password, or an account that already exists.
    """
    topics.check_id("device id", device_id)
    existing = password_file_users(files.password_file)
    if device_id in existing:
        raise ConfigError(f"device {device_id!r} already has an account in {files.password_file}")
    text = files.password_file.read_text()
    if text and not text.endswith("\n"):
        text += "\n"
    write_private(files.password_file, (text + password_line(device_id, password) + "\n").encode())
    cert = None
    if files.settings.mutual_tls and files.tls is not None:
        cert = issue_client_cert(files.tls, device_id)
    if broker is not None:
        broker.reload()
    return cert


def _with_free_ports(settings: BrokerSettings) -> BrokerSettings:
    return replace(
        settings,
        port=free_port(settings.host) if settings.port == 0 else settings.port,
        tls_port=free_port(settings.tls_host or "127.0.0.1") if settings.tls_port == 0 else settings.tls_port,
    )


# ---------------------------------------------------------------------------------------------
# A broker process
# ---------------------------------------------------------------------------------------------

_START_ATTEMPTS = 5
_ADDRESS_IN_USE = "Address already in use"
RELOAD_RESEND_S = 0.5
"""How long ``Mosquitto.reload`` waits for its reload to be logged before it sends SIGHUP again."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary (PATH, then /usr/sbin); raises ``BrokerError`` if it is not installed."""
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if found is None:
        raise BrokerError("mosquitto is not installed: apt-get install mosquitto (or brew install mosquitto)")
    return found


class Mosquitto:
    """A mosquitto broker running in the foreground as a child process, for tests, demos and benchmarks.

    Start it with ``Mosquitto.start``; ``host``, ``port`` and ``tls_port`` say where it listens. The
    broker writes its log to ``log_file`` (``log_text()``) and keeps its database in
    ``persistence_file``; ``restart()`` reuses both and the same ports.
    """

    def __init__(self, config_dir: Path, requested: BrokerSettings | None, text: str | None, executable: str) -> None:
        # Use Mosquitto.start; __init__ only records what start resolved.
        self.config_dir = config_dir
        self.conf = config_dir / "mosquitto.conf"
        self._requested = requested
        self._text = text
        self._executable = executable
        self._process: subprocess.Popen[bytes] | None = None
        self._out = config_dir / "mosquitto.out"
        self._log_offset = 0
        self._out_offset = 0
        self.settings: BrokerSettings | None = None
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.tls_port: int | None = None

    @classmethod
    def start(
        cls,
        config_dir: Path,
        config: BrokerSettings | BrokerFiles | str | None = None,
        *,
        port: int | None = None,
        tls_port: int | None = None,
        timeout: float = 10.0,
        executable: str | None = None,
    ) -> Mosquitto:
        """Run ``mosquitto -c <config_dir>/mosquitto.conf`` and return once every listener accepts connections.

        ``config`` is a ``BrokerSettings``, the ``BrokerFiles`` of ``write_broker_config``, a complete
        configuration text, or None (anonymous plain broker with unlimited queues and persistence).
        ``port``/``tls_port`` override the settings' ports; 0 picks a free port, and if another process
        takes it before mosquitto binds, start retries with new ports. Settings without a persistence
        location or log file get ``config_dir/data`` and ``config_dir/mosquitto.log``. A configuration
        text is used verbatim and ``port`` must name its plain or TLS listener. Raises ``BrokerError``
        with the end of the log if mosquitto exits or does not listen within ``timeout`` seconds,
        ``ConfigError`` for invalid settings.
        """
        config_dir.mkdir(parents=True, exist_ok=True)
        exe = executable or find_mosquitto()
        if isinstance(config, str):
            if not port:
                raise ConfigError("Mosquitto.start with a configuration text needs port= (the port it listens on)")
            broker = cls(config_dir, None, config, exe)
            broker.port = port
            broker._launch(timeout)
            return broker
        settings = config.settings if isinstance(config, BrokerFiles) else (config or BrokerSettings())
        # Started as root, mosquitto switches to the 'mosquitto' account, which can neither read
        # our 0600 keys and password file nor write a root-owned persistence directory.
        as_root = settings.user is None and hasattr(os, "geteuid") and os.geteuid() == 0
        requested = replace(
            settings,
            port=settings.port if port is None else port,
            tls_port=settings.tls_port if tls_port is None else tls_port,
            persistence_location=settings.persistence_location
            or (config_dir / "data" if settings.persistence else None),
            log_file=settings.log_file or config_dir / "mosquitto.log",
            user="root" if as_root else settings.user,
        )
        if requested.persistence_location is not None:
            requested.persistence_location.mkdir(parents=True, exist_ok=True)
        broker = cls(config_dir, requested, None, exe)
        for attempt in range(_START_ATTEMPTS):
            broker.settings = _with_free_ports(requested)
            try:
                broker._launch(timeout)
                return broker
            except BrokerError as exc:
                picked = requested.port == 0 or requested.tls_port == 0
                if not (picked and _ADDRESS_IN_USE in str(exc)) or attempt == _START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    # -- process control --------------------------------------------------------------------

    def _launch(self, timeout: float) -> None:
        if self.settings is not None:
            self.port, self.tls_port = self.settings.port, self.settings.tls_port
            self.host = self.settings.host if self.port is not None else (self.settings.tls_host or "127.0.0.1")
            self.conf.write_text(render_mosquitto_conf(self.settings))
        else:
            assert self._text is not None
            self.conf.write_text(self._text)
        log = self.log_file
        self._log_offset = log.stat().st_size if log is not None and log.exists() else 0
        with open(self._out, "ab") as out:
            self._out_offset = out.tell()
            self._process = subprocess.Popen(
                [self._executable, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        # A broker must not outlive a demo or test process that forgot stop() (or died of an
        # exception): the finalizer runs when this object is collected or the interpreter exits.
        weakref.finalize(self, _terminate, self._process)
        deadline = time.monotonic() + timeout
        waiting = [p for p in (self.port, self.tls_port) if p is not None]
        while True:
            code = self._process.poll()
            if code is not None:
                raise BrokerError(f"mosquitto exited with code {code} while starting; end of its log:\n{self._tail()}")
            # The 'running' line comes after every listener is open; probing the port alone could
            # reach another process that took the port first.
            if (log is None or " running" in self._new_log()) and all(self._accepts(p) for p in waiting):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not listen on {self.host} ports {waiting} within {timeout:g} s; "
                    f"end of its log:\n{self._tail()}"
                )
            time.sleep(0.02)

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def pid(self) -> int:
        """Process id of the running broker; raises ``BrokerError`` if it is not running."""
        if self._process is None or self._process.poll() is not None:
            raise BrokerError("the mosquitto broker is not running: start() or restart() it")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_file(self) -> Path | None:
        return None if self.settings is None else self.settings.log_file

    @property
    def persistence_file(self) -> Path | None:
        """The broker's database (``mosquitto.db`` in the persistence location), if persistence is on."""
        if self.settings is None or not self.settings.persistence or self.settings.persistence_location is None:
            return None
        return self.settings.persistence_location / "mosquitto.db"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (mosquitto saves its database on the way out); SIGKILL if it takes over ``timeout`` s."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL and wait: what a crash or power loss looks like to the database."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.kill()
        self._process.wait()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop if running, then start again with the same configuration, ports and database.

        Raises ``BrokerError`` if it does not come back (for example another process took a port).
        """
        self.stop()
        self._launch(timeout)

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP: mosquitto re-reads its configuration, password and ACL files without dropping clients.

        Returns once the broker has logged a reload that began after this call (it applies it before
        serving anything else, being single-threaded). mosquitto clears its reload flag only when a
        reload ends, so a SIGHUP that lands while it reloads for someone else is lost; without a new
        "Reloading config" line after ``RELOAD_RESEND_S`` the signal is sent again (a reload is
        idempotent). Raises ``BrokerError`` if it is not running or does not log one in time.
        """
        log = self.log_file
        before = log.stat().st_size if log is not None and log.exists() else 0
        os.kill(self.pid, signal.SIGHUP)
        if log is None:
            return
        now = time.monotonic()
        deadline, resend = now + timeout, now + RELOAD_RESEND_S
        while "Reloading config" not in _read_from(log, before):
            now = time.monotonic()
            if now > deadline or not self.running:
                raise BrokerError(f"mosquitto did not reload within {timeout:g} s; end of its log:\n{self._tail()}")
            if now > resend:
                os.kill(self.pid, signal.SIGHUP)
                resend = now + RELOAD_RESEND_S
            time.sleep(0.02)

    def log_text(self) -> str:
        """Everything the broker logged so far (its log file, then what it printed to stdout/stderr)."""
        parts = [_read_from(p, 0) for p in (self.log_file, self._out) if p is not None]
        return "".join(parts)

    def _new_log(self) -> str:
        return "" if self.log_file is None else _read_from(self.log_file, self._log_offset)

    def _tail(self, lines: int = 30) -> str:
        text = self._new_log() + _read_from(self._out, self._out_offset)
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self._process.pid}" if self.running and self._process else "stopped"
        return f"Mosquitto({self.host}, port={self.port}, tls_port={self.tls_port}, {state})"


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_from(path: Path | None, offset: int) -> str:
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")
