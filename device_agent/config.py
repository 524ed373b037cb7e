"""The agent's configuration file (``agent.yaml``): typed, validated, unknown keys refused.

A mistake is one ``ConfigError`` line naming the key (``broker.url: ...``), never a
setting silently ignored. Paths are resolved relative to the config file. See
docs/agent.md for an annotated example; ``edgeship agent config-example`` prints one.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgeship.device_agent.topics import check_id
from edgeship.errors import ConfigError

EXAMPLE = """\
# edgeship agent configuration. Paths are relative to this file.
device_id: jetson-042            # this device's id (its MQTT username and client id)
fleet_id: factory-7              # the fleet it belongs to
target: jetson-orin-nano         # target profile; packages for other targets are refused
data_dir: /var/lib/edgeship-agent

broker:
  url: mqtts://broker.example.com:8883   # mqtt://host:1883 or mqtts://host:8883 (TLS)
  username: jetson-042
  password_file: /etc/edgeship/mqtt-password   # or password: "..." (the file is better)
  ca_file: /etc/edgeship/ca.pem                # CA that signed the broker's certificate
  # cert_file / key_file: a client certificate instead of (or with) a password
  keepalive_s: 30

updates:
  metadata_url: https://fleet.example.com/tuf/metadata/
  targets_url: https://fleet.example.com/tuf/targets/
  root: /etc/edgeship/root.json            # the fleet's TUF root, installed with the agent
  signing_keys: [/etc/edgeship/edgeship.pub]  # keys that sign model packages
  bandwidth_kib_s: null                    # cap downloads (KiB/s); null = no cap

telemetry:
  interval_s: 10
  queue_max_messages: 10000      # on-disk queue while the broker is unreachable; oldest dropped beyond
  queue_max_mib: 20

serve:
  host: 127.0.0.1                # the local inference endpoint; keep it on loopback
  port: 8470
  threads: 1                     # intra-op threads of the model
  backend: auto
"""


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 14 * 86400

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "mqtts"

    def secret(self) -> str | None:
        """The password, read from ``password_file`` when that is set."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"broker.password_file: cannot read {self.password_file}: {exc.strerror}") from None
        return self.password


@dataclass(frozen=True)
class UpdatesConfig:
    metadata_url: str | None = None
    targets_url: str | None = None
    root: Path | None = None
    signing_keys: tuple[Path, ...] = ()
    bandwidth_kib_s: float | None = None
    download_timeout_s: float = 30.0
    accept_targets: tuple[str, ...] = ()
    """Targets besides the device's own whose packages it accepts (e.g. linux-arm64 on a Jetson)."""


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = 10.0
    queue_max_messages: int = 10_000
    queue_max_mib: float = 20.0


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8470
    threads: int | None = 1
    backend: str = "auto"
    max_body_mib: float = 64.0


@dataclass(frozen=True)
class OtaDefaults:
    """What a deploy command does not say: validation, health window and shadow defaults."""

    validation_runs: int = 50
    max_latency_ms: float | None = None
    health_window_s: float = 30.0
    health_min_requests: int = 0
    max_error_rate: float = 0.01
    max_latency_ratio: float | None = 3.0
    min_agreement: float | None = None
    latency_slack_ms: float = 1.0
    command_max_age_s: float = 7 * 86400.0


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    fleet_id: str
    target: str
    data_dir: Path
    broker: BrokerConfig | None = None
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ota: OtaDefaults = field(default_factory=OtaDefaults)
    source: Path | None = None

    @property
    def accepted_targets(self) -> tuple[str, ...]:
        return (self.target, *self.updates.accept_targets)


_SECTIONS: dict[str, type] = {
    "broker": BrokerConfig,
    "updates": UpdatesConfig,
    "telemetry": TelemetryConfig,
    "serve": ServeConfig,
    "ota": OtaDefaults,
}


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate ``agent.yaml``; raise ``ConfigError`` naming the first bad key."""
    import yaml

    source = Path(path)
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist; 'edgeship agent config-example' prints one") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of settings (see 'edgeship agent config-example')")
    return config_from_dict(data, base=source.parent, source=source)


def config_from_dict(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> AgentConfig:
    """Build an ``AgentConfig`` from parsed YAML (or a dict in tests); ``base`` resolves relative paths."""
    top = {f.name for f in fields(AgentConfig)} - {"source"}
    _reject_unknown("", data, top)
    for required in ("device_id", "fleet_id", "target", "data_dir"):
        if data.get(required) in (None, ""):
            raise ConfigError(f"{required}: required setting is missing")
    kwargs: dict[str, Any] = {
        "device_id": check_id("device_id", _typed("device_id", data["device_id"], str)),
        "fleet_id": check_id("fleet_id", _typed("fleet_id", data["fleet_id"], str)),
        "target": _typed("target", data["target"], str),
        "data_dir": _path(base, _typed("data_dir", data["data_dir"], str)),
        "source": source,
    }
    for name, cls in _SECTIONS.items():
        section = data.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: must be a mapping of settings, got {type(section).__name__}")
        kwargs[name] = _section(name, cls, section, base)
    config = AgentConfig(**kwargs)
    _validate(config)
    return config


def _section(prefix: str, cls: type, data: Mapping[str, Any], base: Path) -> Any:
    known = {f.name: f for f in fields(cls)}
    _reject_unknown(prefix + ".", data, set(known))
    values: dict[str, Any] = {}
    for key, value in data.items():
        # Annotations are strings here (postponed evaluation): dispatch on them.
        kind = str(known[key].type)
        where = f"{prefix}.{key}"
        if value is None:
            if "None" not in kind:
                raise ConfigError(f"{where}: must be set (null is not allowed here)")
            values[key] = None
        elif kind.startswith("tuple[Path"):
            items = value if isinstance(value, list) else [value]
            values[key] = tuple(_path(base, _typed(f"{where}[{i}]", v, str)) for i, v in enumerate(items))
        elif kind.startswith("tuple[str"):
            items = value if isinstance(value, list) else [value]
            values[key] = tuple(_typed(f"{where}[{i}]", v, str) for i, v in enumerate(items))
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


def _validate(config: AgentConfig) -> None:
    b = config.broker
    if b is not None:
        scheme = urlparse(b.url).scheme
        if scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"broker.url: use mqtt://host:port or mqtts://host:port, not {b.url!r}")
        if b.password is not None and b.password_file is not None:
            raise ConfigError("broker.password and broker.password_file: set one, not both")
        if (b.cert_file is None) != (b.key_file is None):
            raise ConfigError("broker.cert_file and broker.key_file: a client certificate needs both")
        if (b.cert_file is not None or b.ca_file is not None) and not b.tls:
            raise ConfigError("broker.url: certificates are set but the url is mqtt://; use mqtts://")
        for key in ("password_file", "ca_file", "cert_file", "key_file"):
            path = getattr(b, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"broker.{key}: {path} does not exist")
        if not 5 <= b.keepalive_s <= 3600:
            raise ConfigError(f"broker.keepalive_s: {b.keepalive_s} is outside 5..3600 seconds")
    u = config.updates
    if (u.metadata_url is None) != (u.targets_url is None) or (u.metadata_url is not None and u.root is None):
        raise ConfigError("updates: metadata_url, targets_url and root go together (all three, or none for no fleet)")
    if u.root is not None and not u.root.is_file():
        raise ConfigError(f"updates.root: {u.root} does not exist (the fleet's TUF root.json)")
    for key_path in u.signing_keys:
        if not key_path.is_file():
            raise ConfigError(f"updates.signing_keys: {key_path} does not exist")
    if not u.signing_keys:
        raise ConfigError("updates.signing_keys: at least one public key that signs model packages is required")
    if u.bandwidth_kib_s is not None and u.bandwidth_kib_s <= 0:
        raise ConfigError("updates.bandwidth_kib_s: must be positive (or null for no cap)")
    t = config.telemetry
    if t.interval_s < 0.1:
        raise ConfigError(f"telemetry.interval_s: {t.interval_s} is below 0.1 s")
    if t.queue_max_messages < 1 or t.queue_max_mib <= 0:
        raise ConfigError("telemetry.queue_max_messages / queue_max_mib: must be positive")
    s = config.serve
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"serve.port: {s.port} is not a TCP port")
    if s.threads is not None and s.threads < 1:
        raise ConfigError("serve.threads: must be at least 1 (or null for the library default)")
