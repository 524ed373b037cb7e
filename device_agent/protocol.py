"""The messages of the edgeship MQTT protocol, schema 1 (docs/protocol.md), on both sides.

Every payload is a JSON object with ``"schema": 1`` and a ``"type"``. The agent builds
its messages here, the fleet and the simulated devices parse them here, so a field
renamed on one side is renamed on both. ``parse`` is strict: a payload that is not
UTF-8 JSON, has an unknown type, misses a required field, has a field of the wrong
type or a field this schema does not know raises ``ProtocolError`` naming the field,
and the receiver counts and drops the message; it never crashes on one.

Validation is written out by hand rather than run through jsonschema: the fleet checks
every telemetry message it ingests (thousands per second), and a compiled jsonschema
validator costs tens of microseconds per message where these checks cost a few.

Sequence numbers: a device numbers every telemetry and event message it sends with one
counter (``seq``), kept on disk across restarts. A receiver de-duplicates by
``(device, seq)``; a gap means messages were dropped (the device's bounded queue
overflowed while it was offline, which it also reports as ``queue.dropped``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from edgeship.errors import EdgeshipError

SCHEMA = 1

# Message types by direction.
DEVICE_TYPES = ("status", "telemetry", "event")
COMMAND_TYPES = ("deploy", "cancel", "clear_quarantine", "report")

# Event names a device sends (docs/protocol.md lists what each carries).
EVENTS = (
    "agent.started",  # the agent came up; model = what it serves
    "agent.recovered",  # after an unclean stop: what the journal said and what the agent did
    "ota.transition",  # one OTA state change (state, previous_state, deployment_id)
    "ota.error",  # a step failed (code, message); followed by a transition to FAILED or ROLLING_BACK
    "cmd.rejected",  # a command was not executed (code: malformed, expired, busy, quarantined, ...)
    "slot.corrupt",  # a slot failed verification at start; the agent switched or serves nothing
    "telemetry.dropped",  # the on-disk queue overflowed; count in details
)

MAX_PAYLOAD = 256 * 1024
"""Largest payload either side accepts; anything larger is refused before parsing."""


class ProtocolError(EdgeshipError):
    """A message does not follow the protocol; the message says which field and why."""


# --------------------------------------------------------------------------- field checks

Check = Callable[[str, Any], None]


def _fail(path: str, expected: str, value: Any) -> None:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise ProtocolError(f"field {path!r} must be {expected}, got {shown}")


def _str(max_len: int = 256) -> Check:
    def check(path: str, value: Any) -> None:
        if not isinstance(value, str) or len(value) > max_len:
            _fail(path, f"a string of at most {max_len} characters", value)

    return check


def _int(lo: int = 0, hi: int = 2**63 - 1) -> Check:
    def check(path: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            _fail(path, f"an integer in [{lo}, {hi}]", value)

    return check


def _num(lo: float = -math.inf, hi: float = math.inf) -> Check:
    def check(path: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(path, "a finite number", value)
        if not lo <= value <= hi:
            _fail(path, f"a number in [{lo}, {hi}]", value)

    return check


def _bool(path: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(path, "true or false", value)


def _enum(*choices: str) -> Check:
    def check(path: str, value: Any) -> None:
        if value not in choices:
            _fail(path, f"one of {', '.join(choices)}", value)

    return check


def _nullable(inner: Check) -> Check:
    def check(path: str, value: Any) -> None:
        if value is not None:
            inner(path, value)

    return check


def _list(inner: Check, max_items: int = 1024) -> Check:
    def check(path: str, value: Any) -> None:
        if not isinstance(value, list) or len(value) > max_items:
            _fail(path, f"a list of at most {max_items} items", value)
        for i, item in enumerate(value):
            inner(f"{path}[{i}]", item)

    return check


def _map(inner: Check, max_items: int = 256) -> Check:
    """An object with free-form string keys (tensor names) and values checked by ``inner``."""

    def check(path: str, value: Any) -> None:
        if not isinstance(value, dict) or len(value) > max_items:
            _fail(path, f"an object of at most {max_items} entries", value)
        for key, item in value.items():
            if len(key) > 256:
                _fail(path, "keys of at most 256 characters", key)
            inner(f"{path}.{key}", item)

    return check


def _any_object(path: str, value: Any) -> None:
    if not isinstance(value, dict):
        _fail(path, "an object", value)


def _object(required: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    optional = optional or {}
    known = set(required) | set(optional)

    def check(path: str, value: Any) -> None:
        if not isinstance(value, dict):
            _fail(path, "an object", value)
        for name, field_check in required.items():
            if name not in value:
                raise ProtocolError(f"field {path + '.' + name if path else name!r} is missing")
            field_check(f"{path}.{name}" if path else name, value[name])
        for name, field_check in optional.items():
            if name in value:
                field_check(f"{path}.{name}" if path else name, value[name])
        extra = set(value) - known
        if extra:
            raise ProtocolError(
                f"unknown field {sorted(extra)[0]!r}{' in ' + path if path else ''} (schema {SCHEMA} does not have it)"
            )

    return check


# --------------------------------------------------------------------------- message schemas

_ID = _str(64)
_TS = _num(0.0, 1e11)  # seconds since the epoch

MODEL_REF = _object(
    {
        "name": _str(128),
        "version": _int(0),
        "slot": _enum("A", "B"),
        "digest": _str(64),
        "target": _str(64),
        "format": _str(32),
        "precision": _str(32),
    }
)

_COMMON = {"schema": _int(SCHEMA, SCHEMA), "type": _str(32)}
_DEVICE = {**_COMMON, "fleet": _ID, "device": _ID, "ts": _TS}

STATUS = _object(
    {**_DEVICE, "state": _enum("online", "offline")},
    {"agent_version": _str(64), "boot_id": _str(64), "model": _nullable(MODEL_REF)},
)

_LATENCY = _object(
    {"count": _int(0)}, {"p50_ms": _nullable(_num(0)), "p99_ms": _nullable(_num(0)), "mean_ms": _nullable(_num(0))}
)
_DRIFT = _object(
    {},
    {
        "psi": _nullable(_num(0)),
        "ks": _nullable(_num(0, 1)),
        "class_psi": _nullable(_num(0)),
        "confidence_ks": _nullable(_num(0, 1)),
    },
)

TELEMETRY = _object(
    {
        **_DEVICE,
        "seq": _int(0),
        "interval_s": _num(0),
        "model": _nullable(MODEL_REF),
        "requests": _int(0),
        "errors": _int(0),
        "latency": _LATENCY,
        "system": _object(
            {"cpu_percent": _num(0), "rss_mib": _num(0)},
            {"temperature_c": _nullable(_num(-100, 300)), "load1": _nullable(_num(0))},
        ),
        "queue": _object({"depth": _int(0), "dropped": _int(0)}),
        "ota": _object({"state": _str(32)}, {"deployment_id": _nullable(_ID)}),
    },
    {
        "drift": _object({}, {"inputs": _map(_DRIFT), "outputs": _map(_DRIFT)}),
        "shadow": _nullable(_object({"compared": _int(0), "agreed": _int(0)}, {"agreement": _nullable(_num(0, 1))})),
        "duplicates": _int(0),
    },
)

EVENT = _object(
    {**_DEVICE, "seq": _int(0), "event": _enum(*EVENTS)},
    {
        "deployment_id": _nullable(_ID),
        "state": _nullable(_str(32)),
        "previous_state": _nullable(_str(32)),
        "code": _nullable(_str(64)),
        "message": _nullable(_str(2048)),
        "model": _nullable(MODEL_REF),
        "details": _any_object,
    },
)

_CMD = {**_COMMON, "id": _ID, "issued_at": _TS}

VALIDATION = _object({}, {"max_latency_ms": _nullable(_num(0)), "runs": _int(1, 100_000)})
SHADOW = _object(
    {},
    {
        "fraction": _num(0, 1),
        "min_requests": _int(0, 10_000_000),
        "max_s": _num(0, 7 * 86400),
        "min_agreement": _num(0, 1),
    },
)
HEALTH = _object(
    {},
    {
        "window_s": _num(0, 7 * 86400),
        "min_requests": _int(0, 10_000_000),
        "max_error_rate": _num(0, 1),
        "max_latency_ratio": _nullable(_num(0)),
        "latency_slack_ms": _num(0),
        "min_agreement": _nullable(_num(0, 1)),
    },
)

DEPLOY = _object(
    {**_CMD, "deployment_id": _ID, "target_path": _str(512)},
    {
        "expires_at": _nullable(_TS),
        "validation": VALIDATION,
        "shadow": _nullable(SHADOW),
        "health": HEALTH,
    },
)
CANCEL = _object({**_CMD, "deployment_id": _ID})
CLEAR_QUARANTINE = _object(
    {**_CMD}, {"versions": _list(_object({"name": _str(128), "version": _int(0)}), 256), "all": _bool}
)
REPORT = _object({**_CMD})

SCHEMAS: dict[str, Check] = {
    "status": STATUS,
    "telemetry": TELEMETRY,
    "event": EVENT,
    "deploy": DEPLOY,
    "cancel": CANCEL,
    "clear_quarantine": CLEAR_QUARANTINE,
    "report": REPORT,
}


# --------------------------------------------------------------------------- encode / parse


def model_ref(package: Any, slot: str) -> dict[str, Any]:
    """The ``model`` object of status and telemetry messages for ``package`` (anything with name, version,
    digest, target, format and precision attributes: an installed slot, a simulated package) in ``slot``."""
    return {
        "name": package.name,
        "version": package.version,
        "slot": slot,
        "digest": package.digest,
        "target": package.target,
        "format": package.format,
        "precision": package.precision,
    }


def encode(message: Mapping[str, Any]) -> bytes:
    """Serialize a message to compact UTF-8 JSON (no NaN: a NaN in a message is a bug, not data)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"payload holds {name}, which is not JSON")


def parse(payload: bytes, expected: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Decode and check one message; return it as a dict.

    ``expected`` limits the types accepted (a device accepts only command types on its cmd
    topic, the fleet only device types). Raises ``ProtocolError`` for anything else.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload is {len(payload)} bytes, over the {MAX_PAYLOAD}-byte cap")
    try:
        message = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ProtocolError("payload is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"payload is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(message, dict):
        raise ProtocolError("payload is not a JSON object")
    schema = message.get("schema")
    if schema != SCHEMA:
        raise ProtocolError(f"schema {schema!r} is not supported (this side speaks schema {SCHEMA})")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}")
    if expected is not None and kind not in expected:
        raise ProtocolError(f"a {kind!r} message is not expected here (expected {', '.join(expected)})")
    SCHEMAS[kind]("", message)
    return message


def check(message: Mapping[str, Any]) -> None:
    """Check a message before sending it; raises ``ProtocolError`` (a bug on the sending side)."""
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}")
    SCHEMAS[kind]("", dict(message))


# --------------------------------------------------------------------------- builders (device side)


def status(fleet: str, device: str, state: str, ts: float, **fields: Any) -> dict[str, Any]:
    """A status message (retained ``online`` birth or ``offline`` will)."""
    return {"schema": SCHEMA, "type": "status", "fleet": fleet, "device": device, "ts": ts, "state": state, **fields}


def event(fleet: str, device: str, seq: int, ts: float, name: str, **fields: Any) -> dict[str, Any]:
    """An event message; ``fields`` are the optional event fields (deployment_id, state, code, ...)."""
    return {
        "schema": SCHEMA,
        "type": "event",
        "fleet": fleet,
        "device": device,
        "ts": ts,
        "seq": seq,
        "event": name,
        **fields,
    }


def deploy_command(
    command_id: str,
    deployment_id: str,
    target_path: str,
    issued_at: float,
    *,
    expires_at: float | None = None,
    validation: Mapping[str, Any] | None = None,
    shadow: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``deploy`` command (fleet side, and tests): install ``target_path`` from the fleet's TUF repository."""
    message: dict[str, Any] = {
        "schema": SCHEMA,
        "type": "deploy",
        "id": command_id,
        "issued_at": issued_at,
        "deployment_id": deployment_id,
        "target_path": target_path,
        "expires_at": expires_at,
    }
    if validation is not None:
        message["validation"] = dict(validation)
    if shadow is not None:
        message["shadow"] = dict(shadow)
    if health is not None:
        message["health"] = dict(health)
    check(message)
    return message
