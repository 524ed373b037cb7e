"""The fleet manager's settings file (``fleet.yaml``): typed, validated, unknown keys refused.

A mistake is one ``ConfigError`` line naming the key (``broker.url: ...``, ``scheduler.tick: unknown
setting; did you mean scheduler.tick_s?``), never a setting silently ignored. Relative paths
(``data_dir``, key files, a relative SQLite path in ``database_url``) are resolved against the
directory of the settings file. ``EXAMPLE`` is an annotated file (docs/fleet.md explains each key).

Durations (``*_s`` keys, ``tuf.*`` expiries, ``--expires`` on the command line) are numbers of
seconds or strings with a unit: ``90s``, ``10m``, ``6h``, ``7d``, ``2w`` (``parse_duration``).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgeship.device_agent.topics import check_id
from edgeship.errors import ConfigError

EXAMPLE = """\
# edgeship fleet manager settings. Paths are relative to this file.
fleet_id: factory-7                 # the fleet id in every MQTT topic (edgeship/v1/<fleet_id>/...)
data_dir: /var/lib/edgeship-fleet   # packages, the TUF repository and its keys, uploads
# database_url: sqlite:///<data_dir>/fleet.db   (the default: one machine)
# database_url: postgresql+psycopg://fleet@db.example.com/fleet   (several `fleet serve` processes)
signing_keys: [keys/edgeship.pub]   # publisher keys every pushed package must be signed by

http:
  host: 0.0.0.0
  port: 8480
  public_url: https://fleet.example.com   # what devices use for /tuf/metadata/ and /tuf/targets/
  max_upload_mib: 2048

broker:
  url: mqtt://127.0.0.1:1883              # the fleet's own connection
  username: fleet-factory-7               # default fleet-<fleet_id>
  password_file: broker/fleet-password
  public_url: mqtts://broker.example.com:8883   # what enrolled devices are told
  device_ca: broker/tls/ca.crt            # CA devices trust for the broker's certificate
  accounts_file: broker/passwd            # mosquitto's password file; enrollment adds devices to it
  pid_file: /run/mosquitto/mosquitto.pid  # enrollment sends SIGHUP there (re-read accounts, no restart)

scheduler:
  tick_s: 1.0          # how often each fleet process looks for rollout work
  lease_s: 15          # a rollout claimed by a process that died is taken over after this
  resend_after_s: 30   # a deploy command without an answer is sent again after this

tuf:
  root_expiry: 365d    # root and targets are signed with offline keys in production (docs/fleet.md)
  targets_expiry: 90d
  snapshot_expiry: 7d
  timestamp_expiry: 1d
  refresh_within: 6h   # re-sign the timestamp when it expires within this

ingest:
  share_group: ingest  # MQTT shared subscription $share/<group>/... across fleet processes
  workers: 1
  session_expiry: 1h   # a crashed process's share waits this long in the broker for it to restart

alerts:
  offline_after: 5m    # a device with no message for this long is offline (its status topic may say so sooner)
  drift_psi: 0.25      # a device whose drift PSI went over this within drift_window gets a drift alert
  drift_window: 10m
  interval_s: 15       # how often each fleet process looks for alerts to open or resolve
  # webhook_url: https://hooks.example.com/edgeship   # POSTed JSON on every alert opened and resolved
  webhook_timeout_s: 5
  webhook_retries: 5   # with back-off 1 s, 2 s, 4 s ... (at most 60 s); then the delivery is dropped and logged

retention:
  raw: 7d              # raw telemetry is kept this long, then rolled up per minute and per hour and deleted
  minute: 30d          # per-minute roll-ups are kept this long
  hour: 365d           # per-hour roll-ups are kept this long
  interval: 5m         # how often a fleet process runs the maintenance job (one process at a time)
  batch: 5000          # raw rows per transaction (short transactions never hold ingest up for long)
  vacuum: true         # PostgreSQL: plain VACUUM (ANALYZE) of what the job emptied (never VACUUM FULL: it locks)
"""

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(value: str | int | float, where: str = "duration") -> float:
    """Seconds in ``value``: a number of seconds, or a string like ``90s``, ``10m``, ``6h``, ``7d``, ``2w``.

    Raises ``ConfigError`` naming ``where`` for anything else (negative numbers, unknown units).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 30s, 10m, 6h or 7d, got a boolean")
    if isinstance(value, (int, float)):
        if value < 0 or value != value:
            raise ConfigError(f"{where}: a duration must be a non-negative number of seconds, got {value!r}")
        return float(value)
    match = _DURATION.fullmatch(str(value))
    if match is None:
        raise ConfigError(f"{where}: {value!r} is not a duration; write e.g. 30s, 10m, 6h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8480
    public_url: str | None = None
    """The base URL devices reach this service at; default ``http://<host>:<port>``."""
    max_upload_mib: float = 2048.0

    @property
    def base_url(self) -> str:
        """``public_url`` without a trailing slash, or ``http://host:port`` when it is not set."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class FleetBrokerSettings:
    """The fleet's own MQTT connection, what devices are told, and the mosquitto whose accounts enrollment edits."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    public_url: str | None = None
    """The broker URL enrolled devices use; default ``url``."""
    device_ca: Path | None = None
    """PEM of the CA devices trust for the broker's TLS certificate (sent in the enrollment bundle)."""
    accounts_file: Path | None = None
    """mosquitto's password file; enrollment appends device accounts to it."""
    pid_file: Path | None = None
    """Where mosquitto's pid is; enrollment sends it SIGHUP so it re-reads ``accounts_file``."""
    keepalive_s: int = 30

    def secret(self) -> str | None:
        """The fleet's own MQTT password, read from ``password_file`` when that is set."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"broker.password_file: cannot read {self.password_file}: {exc.strerror}") from None
        return self.password

    @property
    def device_url(self) -> str:
        return self.public_url or self.url


@dataclass(frozen=True)
class SchedulerSettings:
    tick_s: float = 1.0
    lease_s: float = 15.0
    resend_after_s: float = 30.0


@dataclass(frozen=True)
class TufSettings:
    root_expiry: float = 365 * 86400.0
    targets_expiry: float = 90 * 86400.0
    snapshot_expiry: float = 7 * 86400.0
    timestamp_expiry: float = 86400.0
    refresh_within: float = 6 * 3600.0
    keys_dir: Path | None = None
    """Where the role keys are; default ``<data_dir>/tuf/keys``."""

    def expiry(self) -> Any:
        """The ``fleet.tuf_repo.Expiry`` these settings describe."""
        from edgeship.fleet.tuf_repo import Expiry

        return Expiry(
            root=timedelta(seconds=self.root_expiry),
            targets=timedelta(seconds=self.targets_expiry),
            snapshot=timedelta(seconds=self.snapshot_expiry),
            timestamp=timedelta(seconds=self.timestamp_expiry),
        )


@dataclass(frozen=True)
class IngestSettings:
    share_group: str = "ingest"
    workers: int = 1
    # How long the broker keeps a crashed process's session (its share of device messages) for it to
    # come back under the same instance name; a clean stop ends the session at once.
    session_expiry: float = 3600.0


@dataclass(frozen=True)
class AlertSettings:
    offline_after: float = 300.0
    drift_psi: float = 0.25
    drift_window: float = 600.0
    interval_s: float = 15.0
    webhook_url: str | None = None
    webhook_timeout_s: float = 5.0
    webhook_retries: int = 5


@dataclass(frozen=True)
class RetentionSettings:
    raw: float = 7 * 86400.0
    minute: float = 30 * 86400.0
    hour: float = 365 * 86400.0
    interval: float = 300.0
    batch: int = 5000
    vacuum: bool = True


@dataclass(frozen=True)
class FleetSettings:
    """Everything ``fleet.yaml`` holds; build it with ``load_settings`` or ``settings_from_dict``."""

    fleet_id: str
    data_dir: Path
    database_url: str
    signing_keys: tuple[Path, ...]
    http: HttpSettings = field(default_factory=HttpSettings)
    broker: FleetBrokerSettings = field(default_factory=FleetBrokerSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    tuf: TufSettings = field(default_factory=TufSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    source: Path | None = None

    @property
    def tuf_dir(self) -> Path:
        """The TUF repository served at ``/tuf/`` (``metadata/`` and ``targets/``)."""
        return self.data_dir / "tuf" / "repo"

    @property
    def tuf_keys_dir(self) -> Path:
        return self.tuf.keys_dir or self.data_dir / "tuf" / "keys"

    @property
    def packages_dir(self) -> Path:
        """The package store (``LocalStorage``)."""
        return self.data_dir / "packages"

    @property
    def uploads_dir(self) -> Path:
        """Where uploads are spooled while they are verified (same file system as the store)."""
        return self.data_dir / "uploads"

    @property
    def broker_username(self) -> str:
        return self.broker.username or f"fleet-{self.fleet_id}"

    @property
    def metadata_url(self) -> str:
        return f"{self.http.base_url}/tuf/metadata/"

    @property
    def targets_url(self) -> str:
        return f"{self.http.base_url}/tuf/targets/"


_SECTIONS: dict[str, type] = {
    "http": HttpSettings,
    "broker": FleetBrokerSettings,
    "scheduler": SchedulerSettings,
    "tuf": TufSettings,
    "ingest": IngestSettings,
    "alerts": AlertSettings,
    "retention": RetentionSettings,
}
_DURATION_KEYS = {
    "tuf": {"root_expiry", "targets_expiry", "snapshot_expiry", "timestamp_expiry", "refresh_within"},
    "ingest": {"session_expiry"},
    "alerts": {"offline_after", "drift_window"},
    "retention": {"raw", "minute", "hour", "interval"},
}


def load_settings(path: str | os.PathLike[str]) -> FleetSettings:
    """Read and validate ``fleet.yaml``; raise ``ConfigError`` naming the first bad key."""
    import yaml

    source = Path(path)
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise ConfigError(f"settings file {source} does not exist; docs/fleet.md has an annotated example") from None
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {source}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of settings (docs/fleet.md has an example)")
    return settings_from_dict(data, base=source.resolve().parent, source=source)


def settings_from_dict(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> FleetSettings:
    """Build ``FleetSettings`` from parsed YAML (or a dict in tests); ``base`` resolves relative paths.

    Raises ``ConfigError`` naming the key for an unknown key, a wrong type, a missing required
    key (``fleet_id``, ``data_dir``, ``signing_keys``), a key file that does not exist, or a
    database URL that is neither SQLite nor PostgreSQL.
    """
    top = {f.name for f in fields(FleetSettings)} - {"source"}
    _reject_unknown("", data, top)
    for required in ("fleet_id", "data_dir", "signing_keys"):
        if data.get(required) in (None, "", []):
            raise ConfigError(f"{required}: required setting is missing")
    data_dir = _path(base, _typed("data_dir", data["data_dir"], str))
    keys_value = data["signing_keys"]
    keys_list = keys_value if isinstance(keys_value, list) else [keys_value]
    kwargs: dict[str, Any] = {
        "fleet_id": check_id("fleet_id", _typed("fleet_id", data["fleet_id"], str)),
        "data_dir": data_dir,
        "database_url": _database_url(data.get("database_url"), base, data_dir),
        "signing_keys": tuple(_path(base, _typed(f"signing_keys[{i}]", v, str)) for i, v in enumerate(keys_list)),
        "source": source,
    }
    for name, cls in _SECTIONS.items():
        section = data.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: must be a mapping of settings, got {type(section).__name__}")
        kwargs[name] = _section(name, cls, section, base)
    settings = FleetSettings(**kwargs)
    _validate(settings)
    return settings


def _database_url(value: Any, base: Path, data_dir: Path) -> str:
    if value is None:
        return f"sqlite:///{data_dir / 'fleet.db'}"
    url = _typed("database_url", value, str)
    scheme = url.split(":", 1)[0]
    if scheme.startswith("sqlite"):
        prefix = "sqlite:///"
        if not url.startswith(prefix):
            raise ConfigError(f"database_url: write SQLite URLs as sqlite:///path/to/fleet.db, not {url!r}")
        rest = url[len(prefix) :]
        if rest and rest != ":memory:" and not rest.startswith("/"):
            # A relative SQLite path is relative to the settings file, like every other path here.
            return f"{prefix}{base / rest}"
        return url
    if scheme in ("postgresql", "postgresql+psycopg"):
        return "postgresql+psycopg:" + url.split(":", 1)[1]
    raise ConfigError(
        f"database_url: use sqlite:///path/fleet.db or postgresql+psycopg://user@host/db, not {scheme}://..."
    )


def _section(prefix: str, cls: type, data: Mapping[str, Any], base: Path) -> Any:
    known = {f.name: f for f in fields(cls)}
    _reject_unknown(prefix + ".", data, set(known))
    durations = _DURATION_KEYS.get(prefix, set())
    values: dict[str, Any] = {}
    for key, value in data.items():
        kind = str(known[key].type)
        where = f"{prefix}.{key}"
        if value is None:
            if "None" not in kind:
                raise ConfigError(f"{where}: must be set (null is not allowed here)")
            values[key] = None
        elif key in durations or (key.endswith("_s") and kind.startswith("float")):
            values[key] = parse_duration(value, where)
        elif kind.startswith("Path"):
            values[key] = _path(base, _typed(where, value, str))
        elif kind.startswith("bool"):
            values[key] = _typed(where, value, bool)
        elif kind.startswith("int"):
            values[key] = _typed(where, value, int)
        elif kind.startswith("float"):
            values[key] = float(_typed(where, value, (int, float)))
        else:
            values[key] = _typed(where, value, str)
    return cls(**values)


def _typed(where: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {_kind_name(kind)}, got {type(value).__name__} {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return "a number"
    return {str: "a string", int: "an integer", bool: "true or false"}.get(kind, kind.__name__)


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def _reject_unknown(prefix: str, data: Mapping[str, Any], known: set[str]) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(f"{prefix}{key}: unknown setting{hint}")


def _validate(settings: FleetSettings) -> None:
    for i, key_path in enumerate(settings.signing_keys):
        if not key_path.is_file():
            raise ConfigError(f"signing_keys[{i}]: {key_path} does not exist (a publisher's public key, PEM)")
    h = settings.http
    if not 0 <= h.port <= 65535:
        raise ConfigError(f"http.port: {h.port} is not a TCP port")
    if h.public_url is not None and urlparse(h.public_url).scheme not in ("http", "https"):
        raise ConfigError(f"http.public_url: use http://host[:port] or https://host[:port], not {h.public_url!r}")
    if h.max_upload_mib <= 0:
        raise ConfigError("http.max_upload_mib: must be positive")
    b = settings.broker
    for key in ("url", "public_url"):
        value = getattr(b, key)
        if value is not None and urlparse(value).scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"broker.{key}: use mqtt://host:port or mqtts://host:port, not {value!r}")
    if b.password is not None and b.password_file is not None:
        raise ConfigError("broker.password and broker.password_file: set one, not both")
    for key in ("password_file", "ca_file", "device_ca"):
        path = getattr(b, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"broker.{key}: {path} does not exist")
    if b.username is not None:
        check_id("broker.username", b.username)
    s = settings.scheduler
    for key in ("tick_s", "lease_s", "resend_after_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"scheduler.{key}: must be positive")
    if s.lease_s <= s.tick_s:
        raise ConfigError(f"scheduler.lease_s ({s.lease_s:g}) must be longer than scheduler.tick_s ({s.tick_s:g})")
    t = settings.tuf
    for key in ("root_expiry", "targets_expiry", "snapshot_expiry", "timestamp_expiry"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"tuf.{key}: must be a positive duration")
    if t.refresh_within >= t.timestamp_expiry:
        raise ConfigError(
            f"tuf.refresh_within ({t.refresh_within:g} s) must be shorter than tuf.timestamp_expiry "
            f"({t.timestamp_expiry:g} s), or every refresh re-signs"
        )
    ingest = settings.ingest
    check_id("ingest.share_group", ingest.share_group)
    if ingest.workers < 1:
        raise ConfigError("ingest.workers: must be at least 1")
    if not 0 < ingest.session_expiry <= 0xFFFFFFFF:
        raise ConfigError("ingest.session_expiry: must be a positive duration such as 1h")
    _validate_alerts(settings.alerts)
    _validate_retention(settings.retention)


def _validate_alerts(a: AlertSettings) -> None:
    for key in ("offline_after", "drift_window", "interval_s", "webhook_timeout_s"):
        if getattr(a, key) <= 0:
            raise ConfigError(f"alerts.{key}: must be a positive duration")
    if not a.drift_psi > 0:
        raise ConfigError(f"alerts.drift_psi: must be a positive PSI such as 0.25, got {a.drift_psi:g}")
    if a.webhook_retries < 0:
        raise ConfigError("alerts.webhook_retries: must be 0 or more")
    if a.webhook_url is not None:
        url = urlparse(a.webhook_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"alerts.webhook_url: use http://host/path or https://host/path, not {a.webhook_url!r}")


def _validate_retention(r: RetentionSettings) -> None:
    for key in ("raw", "minute", "hour", "interval"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"retention.{key}: must be a positive duration such as 7d")
    if r.minute < r.raw:
        raise ConfigError(f"retention.minute ({r.minute:g} s) must be at least retention.raw ({r.raw:g} s)")
    if r.hour < r.minute:
        raise ConfigError(f"retention.hour ({r.hour:g} s) must be at least retention.minute ({r.minute:g} s)")
    if not 1 <= r.batch <= 100_000:
        raise ConfigError(f"retention.batch: must be between 1 and 100000 rows, got {r.batch}")


__all__ = [
    "EXAMPLE",
    "AlertSettings",
    "RetentionSettings",
    "FleetBrokerSettings",
    "FleetSettings",
    "HttpSettings",
    "IngestSettings",
    "SchedulerSettings",
    "TufSettings",
    "load_settings",
    "parse_duration",
    "settings_from_dict",
]
