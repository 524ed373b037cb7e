"""Creating rollouts and operating them by hand: pause, resume, abort, approve; and reading their status.

``create_rollout`` validates a spec (``RolloutSpec.from_json``), selects the devices it reaches and
writes the rollout (state ``pending``) with one ``rollout_devices`` row per device, each in its
wave. The scheduler (``fleet.scheduler``) takes it from there; the states are listed in
``fleet.rollout_logic``. Selection, in order:

1. every enrolled device whose target runs the package (the package's own target: targets/
   declares no compatibility between targets, so a TensorRT package never reaches a phone) and
   whose tags match the selector (``rollout_logic.matches``);
2. minus devices quarantined for this package (``device_quarantine``: an earlier wave of it was
   rolled back there);
3. devices that run this package's name at this version or a newer one already are listed in
   state ``skipped`` (code ``already_current``, a terminal state) instead of being commanded; the
   scheduler, which adds matching devices it does not know yet, then leaves them alone.

A rollout that ends with no device is refused with one line saying how many devices matched the
tags and why none of them is compatible. So is a rollout whose devices overlap those of a rollout
that has not ended (the message names it): one device, one active rollout. Creation is serialized
(a PostgreSQL advisory lock; SQLite's write lock) so two creations cannot both pass that check.

Every change made here bumps ``rollouts.revision`` (the scheduler re-reads a rollout whose
revision moved) and is written to the audit log in the same transaction.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeship.device_agent import protocol
from edgeship.errors import ConflictError, NotFoundError, UsageError
from edgeship.fleet import audit
from edgeship.fleet.context import FleetContext
from edgeship.fleet.db import advisory_lock
from edgeship.fleet.models import Device, DeviceQuarantine, Package, Rollout, RolloutDevice
from edgeship.fleet.packages import find_package, package_to_json
from edgeship.fleet.rollout_logic import (
    ENDED_ROLLOUT,
    Gates,
    assign_waves,
    matches,
    parse_waves,
)

NOT_ENDED = frozenset({"pending", "running", "paused", "waiting_approval", "halted", "rolling_back"})

# By-hand operations: the states each applies to, and the state it leads to.
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "pause": (frozenset({"pending", "running", "waiting_approval"}), "paused"),
    "resume": (frozenset({"paused"}), "running"),
    "abort": (NOT_ENDED, "aborted"),
    "approve": (frozenset({"waiting_approval"}), "running"),
}

_PACKAGE_REF = re.compile(r"(?P<name>[^:@/\s]+):v?(?P<version>\d+)@(?P<target>[^/\s]+)(?:/(?P<precision>[^/\s]+))?")
_DEPLOY_CHECKS = {"validation": protocol.VALIDATION, "shadow": protocol.SHADOW, "health": protocol.HEALTH}
_MAX_INT = 2**31 - 1  # the database's integer columns
_MAX_SECONDS = 365 * 86400.0
_RATE_GATES = (
    "max_install_failure_rate",
    "max_rollback_rate",
    "max_error_rate",
    "min_shadow_agreement",
    "min_reporting_fraction",
)


def parse_package_ref(ref: str) -> tuple[str, int, str, str | None]:
    """Split ``NAME:VERSION@TARGET[/PRECISION]`` into its parts; raises ``UsageError`` for another shape."""
    match = _PACKAGE_REF.fullmatch(ref.strip()) if isinstance(ref, str) else None
    if match is None:
        raise UsageError(f"package {ref!r}: write NAME:VERSION@TARGET[/PRECISION], e.g. digits:3@linux-x86_64/fp32")
    return match["name"], int(match["version"]), match["target"], match["precision"]


@dataclass(frozen=True)
class RolloutSpec:
    """A validated rollout request. Build it with ``from_json`` (the API's and the CLI's body)."""

    package: str | None = None
    """``NAME:VERSION@TARGET[/PRECISION]``; or give ``package_id``."""
    package_id: int | None = None
    name: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    """Selector: tag -> value, or a list of accepted values."""
    waves: tuple[str | int, ...] = ("100%",)
    soak_s: float = 0.0
    max_per_minute: int | None = None
    device_timeout_s: float = 900.0
    gates: dict[str, Any] = field(default_factory=dict)
    deploy: dict[str, Any] = field(default_factory=dict)
    """What each deploy command carries: ``validation``, ``shadow``, ``health`` (docs/protocol.md)."""
    require_approval: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutSpec:
        """Check a rollout request; raises ``UsageError`` naming the first bad field.

        ``waves`` parse with ``rollout_logic.parse_waves``; ``gates`` with ``Gates.from_json`` (rates
        in [0, 1], the latency ratio and drift positive); ``deploy`` against the protocol's
        ``validation``/``shadow``/``health`` schemas.
        """
        if not isinstance(data, Mapping):
            raise UsageError("a rollout is a JSON object (package, waves, tags, gates, ...)")
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise UsageError(f"rollout field {key!r} is unknown; fields are {', '.join(sorted(known))}")
        package, package_id = data.get("package"), data.get("package_id")
        if (package is None) == (package_id is None):
            raise UsageError("a rollout names its package: package NAME:VERSION@TARGET[/PRECISION] or package_id")
        if package is not None:
            parse_package_ref(package)
        if package_id is not None and (
            isinstance(package_id, bool) or not isinstance(package_id, int) or not 1 <= package_id <= _MAX_INT
        ):
            raise UsageError(f"package_id must be a package id (a positive integer), not {package_id!r}")
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 128):
            raise UsageError("name: a rollout name is a string of 1-128 characters")
        tags = _selector_tags(data.get("tags") or {})
        raw_waves = data.get("waves", ["100%"])
        if isinstance(raw_waves, (str, bytes)) or not isinstance(raw_waves, Sequence):
            raise UsageError("waves: give a list such as ['1%', '10%', '50%', '100%'] or [2, 10, 50]")
        for item in raw_waves:
            if isinstance(item, int) and not isinstance(item, bool) and item > _MAX_INT:
                raise UsageError(f"wave {item}: a device count must be at most {_MAX_INT}")
        waves = tuple(w.to_json() for w in parse_waves(list(raw_waves)))
        soak_s = _number("soak_s", data.get("soak_s", 0.0), low=0.0)
        timeout = _number("device_timeout_s", data.get("device_timeout_s", 900.0), low=1.0)
        rate = data.get("max_per_minute")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= _MAX_INT):
            raise UsageError(f"max_per_minute must be a whole number of devices >= 1 (or null), not {rate!r}")
        gates = check_gates(data.get("gates") or {})
        deploy = check_deploy(data.get("deploy") or {})
        approval = data.get("require_approval", False)
        if not isinstance(approval, bool):
            raise UsageError(f"require_approval must be true or false, not {approval!r}")
        return cls(
            package=package,
            package_id=package_id,
            name=name,
            tags=tags,
            waves=waves,
            soak_s=soak_s,
            max_per_minute=rate,
            device_timeout_s=timeout,
            gates=gates,
            deploy=deploy,
            require_approval=approval,
        )


def _number(where: str, value: Any, *, low: float, high: float = _MAX_SECONDS) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise UsageError(f"{where} must be a number of seconds from {low:g} to {high / 86400:g} days, not {value!r}")
    return float(value)


def _selector_tags(tags: Any) -> dict[str, Any]:
    if not isinstance(tags, Mapping):
        raise UsageError("tags: give the selector as a mapping of tag to value (or to a list of values)")
    out: dict[str, Any] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"tags: tag key {key!r} must be a non-empty string")
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) for v in value):
                raise UsageError(f"tags.{key}: a list of accepted values must hold strings")
            out[key] = list(value)
        elif isinstance(value, str):
            out[key] = value
        else:
            raise UsageError(f"tags.{key}: a tag value is a string (or a list of strings), not {value!r}")
    return out


def check_gates(data: Any) -> dict[str, Any]:
    """Gates as stored: every gate with its threshold (defaults filled in); raises ``UsageError``."""
    if not isinstance(data, Mapping):
        raise UsageError("gates: give a mapping of gate to threshold, e.g. {'max_install_failure_rate': 0.1}")
    gates = Gates.from_json(data)
    for name, value in gates.to_json().items():
        if name == "min_devices_for_rates":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"gate min_devices_for_rates must be a whole number >= 1, not {value!r}")
            continue
        if name == "early_halt":
            if not isinstance(value, bool) and value is not None:
                raise UsageError(f"gate early_halt is true or false, not {value!r}")
            continue
        if name == "min_reporting_fraction" and value is None:
            raise UsageError("gate min_reporting_fraction is a fraction between 0 and 1; it cannot be turned off")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UsageError(f"gate {name} must be a number >= 0 (or null to turn it off), not {value!r}")
        if name in _RATE_GATES and value > 1:
            raise UsageError(f"gate {name} is a rate between 0 and 1, not {value!r}")
    return gates.to_json()


def check_deploy(data: Any) -> dict[str, Any]:
    """What each deploy command carries (``validation``, ``shadow``, ``health``), checked against the protocol."""
    if not isinstance(data, Mapping):
        raise UsageError("deploy: give a mapping with validation, shadow and/or health")
    out: dict[str, Any] = {}
    for key, value in data.items():
        check = _DEPLOY_CHECKS.get(key)
        if check is None:
            raise UsageError(f"deploy.{key}: unknown; a deploy carries {', '.join(_DEPLOY_CHECKS)}")
        if value is None and key == "shadow":
            out[key] = None
            continue
        try:
            check(f"deploy.{key}", value)
        except protocol.ProtocolError as exc:
            raise UsageError(str(exc)) from None
        out[key] = dict(value)
    return out


# --------------------------------------------------------------------------- creation


def create_rollout(ctx: FleetContext, spec: RolloutSpec | Mapping[str, Any], actor: str) -> Rollout:
    """Validate ``spec``, select its devices, and write the rollout (``pending``) with its devices in waves.

    Raises ``UsageError`` for a bad spec or a rollout that reaches no compatible device (saying how
    many matched the tags and why none qualifies), ``NotFoundError`` for a package not pushed,
    ``ConflictError`` when its devices overlap a rollout that has not ended (naming it). Nothing
    is written when it raises.
    """
    # A spec built in code is checked like one from the API.
    spec = RolloutSpec.from_json(asdict(spec) if isinstance(spec, RolloutSpec) else spec)
    specs = parse_waves(list(spec.waves))
    selector = {"tags": spec.tags} if spec.tags else {}
    now = ctx.now()
    with ctx.db.session() as session:
        advisory_lock(session, "rollout-create")
        package = _resolve_package(session, spec)
        chosen, current, previous, why_none = _select(session, package, selector)
        if not chosen:
            raise UsageError(f"rollout of {_package_ref(package)} refused: {why_none}")
        _refuse_overlap(session, chosen)
        rollout = Rollout(
            name=spec.name or f"{package.name} v{package.version} ({package.target}/{package.precision})",
            package_id=package.id,
            selector=selector,
            waves=list(spec.waves),
            soak_s=spec.soak_s,
            max_per_minute=spec.max_per_minute,
            device_timeout_s=spec.device_timeout_s,
            gates=dict(spec.gates),
            deploy=dict(spec.deploy),
            require_approval=spec.require_approval,
            state="pending",
            current_wave=0,
            gate_values={},
            created_at=now,
            created_by=actor[:64],
            updated_at=now,
            revision=0,
        )
        session.add(rollout)
        session.flush()
        waves = assign_waves(chosen, specs, salt=f"rollout-{rollout.id}")
        session.add_all(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=device_id,
                wave=wave,
                state="pending",
                previous_package_id=previous.get(device_id),
            )
            for device_id, wave in waves.items()
        )
        # Devices already on this version are listed as skipped (a terminal state), so that the
        # scheduler, which adds matching devices it does not know yet, leaves them alone.
        session.add_all(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=device_id,
                wave=len(specs) - 1,
                state="skipped",
                code="already_current",
                message=f"runs {package.name} v{package.version} or newer already",
                previous_package_id=previous.get(device_id),
                finished_at=now,
            )
            for device_id in current
        )
        per_wave = Counter(waves.values())
        audit.record(
            session,
            actor,
            "rollout.create",
            f"rollout:{rollout.id}",
            {
                "package": _package_ref(package),
                "package_id": package.id,
                "selector": selector,
                "waves": list(spec.waves),
                "devices": len(chosen),
                "already_current": len(current),
                "per_wave": [per_wave.get(i, 0) for i in range(len(specs))],
            },
            at=now,
        )
    return rollout


def _resolve_package(session: Session, spec: RolloutSpec) -> Package:
    if spec.package_id is not None:
        package = session.get(Package, spec.package_id)
        if package is None:
            raise NotFoundError(f"there is no package with id {spec.package_id}")
        return package
    assert spec.package is not None
    name, version, target, precision = parse_package_ref(spec.package)
    return find_package(session, name, version, target, precision)


def _package_ref(package: Package) -> str:
    return f"{package.name}:{package.version}@{package.target}/{package.precision}"


def _select(
    session: Session, package: Package, selector: Mapping[str, Any]
) -> tuple[list[str], list[str], dict[str, int], str]:
    """(device ids to roll out to, ids already on this version or newer, current package ids, why there are none)."""
    rows = session.execute(
        select(Device.id, Device.target, Device.tags, Device.model_name, Device.model_version, Device.model_digest)
    ).all()
    quarantined = set(
        session.scalars(select(DeviceQuarantine.device_id).where(DeviceQuarantine.package_id == package.id))
    )
    tag_only: dict[str, Any] = {**selector}
    tagged = [r for r in rows if matches(tag_only, r.target, r.tags or {}, r.target)]
    compatible = [r for r in tagged if matches(selector, r.target, r.tags or {}, package.target)]
    current = [
        r
        for r in compatible
        if r.model_name == package.name and r.model_version is not None and r.model_version >= package.version
    ]
    current_ids = {r.id for r in current}
    chosen = [r for r in compatible if r.id not in current_ids and r.id not in quarantined]
    why = ""
    if not chosen:
        tag_text = f"the tags {selector['tags']}" if selector.get("tags") else "the selector (every device)"
        if not tagged:
            why = f"no enrolled device matches {tag_text} (of {len(rows)} enrolled)"
        elif not compatible:
            by_target = Counter(r.target for r in tagged)
            seen = ", ".join(f"{t} x{n}" for t, n in sorted(by_target.items()))
            why = (
                f"{len(tagged)} device(s) match {tag_text}, but none is a {package.target} device "
                f"(they are {seen}); the package runs only on {package.target}"
            )
        else:
            parts = []
            if current_ids:
                parts.append(f"{len(current_ids)} run {package.name} v{package.version} or newer already")
            blocked = len([r for r in compatible if r.id in quarantined and r.id not in current_ids])
            if blocked:
                parts.append(f"{blocked} have this package quarantined (an earlier wave was rolled back there)")
            why = f"{len(compatible)} compatible device(s) match {tag_text}, but " + " and ".join(parts)
    previous = _previous_packages(session, chosen + current)
    return [r.id for r in chosen], sorted(current_ids - quarantined), previous, why


def _previous_packages(session: Session, rows: Sequence[Any]) -> dict[str, int]:
    """The package each device runs now, by manifest digest, else by name, version and target when unique."""
    digests = {r.model_digest for r in rows if r.model_digest}
    names = {r.model_name for r in rows if r.model_name}
    by_digest: dict[str, int] = {}
    by_identity: dict[tuple[str, int, str], list[int]] = {}
    if digests:
        for pid, digest in session.execute(
            select(Package.id, Package.manifest_sha256).where(Package.manifest_sha256.in_(digests))
        ):
            by_digest[digest] = pid
    if names:
        for pid, name, version, target in session.execute(
            select(Package.id, Package.name, Package.version, Package.target).where(Package.name.in_(names))
        ):
            by_identity.setdefault((name, version, target), []).append(pid)
    out: dict[str, int] = {}
    for r in rows:
        if r.model_digest and r.model_digest in by_digest:
            out[r.id] = by_digest[r.model_digest]
            continue
        if r.model_name is not None and r.model_version is not None:
            candidates = by_identity.get((r.model_name, r.model_version, r.target), [])
            if len(candidates) == 1:
                out[r.id] = candidates[0]
    return out


def _refuse_overlap(session: Session, device_ids: Sequence[str]) -> None:
    wanted = set(device_ids)
    active = session.execute(
        select(Rollout.id, Rollout.name, Rollout.state, RolloutDevice.device_id)
        .join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
        .where(Rollout.state.in_(NOT_ENDED), RolloutDevice.state != "skipped")
    ).all()
    clash: dict[int, list[str]] = {}
    names: dict[int, tuple[str, str]] = {}
    for rid, name, state, device_id in active:
        if device_id in wanted:
            clash.setdefault(rid, []).append(device_id)
            names[rid] = (name, state)
    if clash:
        rid = min(clash)
        name, state = names[rid]
        devices = sorted(clash[rid])
        raise ConflictError(
            f"rollout {rid} ({name}) is {state} on {len(devices)} of these devices (e.g. {devices[0]}); "
            f"wait for it to end or abort it (edgeship fleet rollout abort {rid})"
        )


# --------------------------------------------------------------------------- by-hand operations


def transition(ctx: FleetContext, rollout_id: int, operation: str, actor: str, *, reason: str | None = None) -> Rollout:
    """Apply a by-hand operation (``pause``, ``resume``, ``abort``, ``approve``) to a rollout.

    ``approve`` lets a rollout waiting for approval go on to its next wave. Each bumps the
    rollout's revision and is audited. Raises ``NotFoundError`` for an unknown rollout,
    ``ConflictError`` when the rollout is in a state the operation does not apply to (saying which
    states it does), ``UsageError`` for an unknown operation.
    """
    if operation not in TRANSITIONS:
        raise UsageError(f"unknown rollout operation {operation!r}; use {', '.join(TRANSITIONS)}")
    allowed, target_state = TRANSITIONS[operation]
    now = ctx.now()
    with ctx.db.session() as session:
        rollout = session.scalar(select(Rollout).where(Rollout.id == rollout_id).with_for_update())
        if rollout is None:
            raise NotFoundError(f"there is no rollout {rollout_id} (list them with edgeship fleet rollout list)")
        if rollout.state not in allowed:
            order = ["pending", "running", "waiting_approval", "paused", "halted", "rolling_back"]
            can = ", ".join(s for s in order if s in allowed)
            raise ConflictError(
                f"rollout {rollout_id} is {rollout.state}; {operation} applies to a rollout that is {can}"
            )
        before = rollout.state
        rollout.state = target_state
        if operation == "approve":
            rollout.current_wave += 1
            rollout.wave_started_at = now
            rollout.wave_done_at = None
        if operation == "abort":
            rollout.halt_reason = f"aborted by {actor}" + (f": {reason}" if reason else "")
            rollout.lease_owner = None
            rollout.lease_until = None
        rollout.revision += 1
        rollout.updated_at = now
        details: dict[str, Any] = {"from": before, "to": target_state}
        if reason:
            details["reason"] = reason
        if operation == "approve":
            details["wave"] = rollout.current_wave
        audit.record(session, actor, f"rollout.{operation}", f"rollout:{rollout_id}", details, at=now)
    return rollout


def pause(ctx: FleetContext, rollout_id: int, actor: str) -> Rollout:
    """Stop commanding devices (devices already commanded finish); ``resume`` goes on. See ``transition``."""
    return transition(ctx, rollout_id, "pause", actor)


def resume(ctx: FleetContext, rollout_id: int, actor: str) -> Rollout:
    """Let a paused rollout run again. See ``transition``."""
    return transition(ctx, rollout_id, "resume", actor)


def abort(ctx: FleetContext, rollout_id: int, actor: str, reason: str | None = None) -> Rollout:
    """End a rollout that has not ended; devices keep what they run. See ``transition``."""
    return transition(ctx, rollout_id, "abort", actor, reason=reason)


def approve(ctx: FleetContext, rollout_id: int, actor: str) -> Rollout:
    """Start the next wave of a rollout waiting for approval. See ``transition``."""
    return transition(ctx, rollout_id, "approve", actor)


# --------------------------------------------------------------------------- reading


def get_rollout(session: Session, rollout_id: int) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"there is no rollout {rollout_id} (list them with edgeship fleet rollout list)")
    return rollout


def status(ctx: FleetContext, rollout_id: int) -> dict[str, Any]:
    """A rollout's state: per wave the device counts by state, the gate values, the halt reason.

    Raises ``NotFoundError`` for an unknown rollout.
    """
    with ctx.db.session(readonly=True) as session:
        rollout = get_rollout(session, rollout_id)
        package = session.get(Package, rollout.package_id)
        counts = session.execute(
            select(RolloutDevice.wave, RolloutDevice.state, func.count())
            .where(RolloutDevice.rollout_id == rollout_id)
            .group_by(RolloutDevice.wave, RolloutDevice.state)
        ).all()
    waves: list[dict[str, Any]] = [
        {"index": i, "reach": spec, "devices": 0, "states": {}} for i, spec in enumerate(rollout.waves)
    ]
    totals: Counter[str] = Counter()
    for wave, state, n in counts:
        while wave >= len(waves):
            waves.append({"index": len(waves), "reach": None, "devices": 0, "states": {}})
        waves[wave]["states"][state] = int(n)
        waves[wave]["devices"] += int(n)
        totals[state] += int(n)
    return {
        **rollout_to_json(rollout),
        "package": package_to_json(package) if package is not None else None,
        "waves": waves,
        "devices": sum(totals.values()),
        "totals": dict(totals),
        "ended": rollout.state in ENDED_ROLLOUT,
    }


def list_rollouts(
    ctx: FleetContext, *, state: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[Rollout], int]:
    """Rollouts newest first (optionally in one state); returns (page, total)."""
    query = select(Rollout)
    count = select(func.count()).select_from(Rollout)
    if state is not None:
        query = query.where(Rollout.state == state)
        count = count.where(Rollout.state == state)
    with ctx.db.session(readonly=True) as session:
        total = int(session.scalar(count) or 0)
        rows = list(session.scalars(query.order_by(Rollout.id.desc()).limit(limit).offset(offset)))
    return rows, total


def rollout_to_json(rollout: Rollout) -> dict[str, Any]:
    return {
        "id": rollout.id,
        "name": rollout.name,
        "package_id": rollout.package_id,
        "state": rollout.state,
        "selector": rollout.selector,
        "wave_specs": rollout.waves,
        "current_wave": rollout.current_wave,
        "wave_started_at": rollout.wave_started_at,
        "wave_done_at": rollout.wave_done_at,
        "soak_s": rollout.soak_s,
        "max_per_minute": rollout.max_per_minute,
        "device_timeout_s": rollout.device_timeout_s,
        "require_approval": rollout.require_approval,
        "gates": rollout.gates,
        "gate_values": rollout.gate_values,
        "halt_reason": rollout.halt_reason,
        "deploy": rollout.deploy,
        "created_at": rollout.created_at,
        "created_by": rollout.created_by,
        "updated_at": rollout.updated_at,
        "revision": rollout.revision,
    }


__all__ = [
    "NOT_ENDED",
    "TRANSITIONS",
    "RolloutSpec",
    "abort",
    "approve",
    "check_deploy",
    "check_gates",
    "create_rollout",
    "list_rollouts",
    "parse_package_ref",
    "pause",
    "resume",
    "rollout_to_json",
    "status",
    "transition",
]
