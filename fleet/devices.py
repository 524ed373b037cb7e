"""Reading the device registry and changing a device's tags (enrollment creates devices; ingest updates their state).

Tag filters run in SQL on both databases (``tags ->> key`` on PostgreSQL, ``json_extract`` on
SQLite), so a list page does not load the fleet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeship.errors import NotFoundError, UsageError
from edgeship.fleet import audit
from edgeship.fleet.context import FleetContext
from edgeship.fleet.enrollment import TAG_KEY, check_tags
from edgeship.fleet.models import Device, DeviceQuarantine, Event, Package, Rollout, RolloutDevice


def parse_tag_filters(items: Sequence[str]) -> dict[str, str]:
    """``["site=plant-1", "hw=r2"]`` -> ``{"site": "plant-1", "hw": "r2"}``; raises ``UsageError`` for an item without ``=``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"tag filter {item!r}: write key=value, e.g. site=plant-1")
        out[key] = value
    check_tag_keys(out)
    return out


def check_tag_keys(tags: Mapping[str, Any]) -> None:
    """Raise ``UsageError`` for a tag key that no device can have (it becomes a JSON path in SQL)."""
    for key in tags:
        if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
            raise UsageError(f"tag key {key!r}: use 1-64 letters, digits, '_', '.' or '-'")


def list_devices(
    ctx: FleetContext,
    *,
    tags: Mapping[str, str] | None = None,
    target: str | None = None,
    online: bool | None = None,
    model: str | None = None,
    version: int | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Device], int]:
    """Devices ordered by id, filtered by every given criterion; returns (page, total matching)."""
    conditions: list[Any] = []
    check_tag_keys(tags or {})
    for key, value in (tags or {}).items():
        conditions.append(Device.tags[key].as_string() == value)
    if target is not None:
        conditions.append(Device.target == target)
    if online is not None:
        conditions.append(Device.online.is_(online))
    if model is not None:
        conditions.append(Device.model_name == model)
    if version is not None:
        conditions.append(Device.model_version == version)
    with ctx.db.session(readonly=True) as session:
        total = int(session.scalar(select(func.count()).select_from(Device).where(*conditions)) or 0)
        rows = list(session.scalars(select(Device).where(*conditions).order_by(Device.id).limit(limit).offset(offset)))
    return rows, total


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"there is no device {device_id!r} (list them with edgeship fleet devices)")
    return device


def device_detail(ctx: FleetContext, device_id: str) -> dict[str, Any]:
    """A device with its rollouts (newest first) and the packages quarantined for it; ``NotFoundError``."""
    with ctx.db.session(readonly=True) as session:
        device = _device(session, device_id)
        rollouts = session.execute(
            select(Rollout.id, Rollout.name, Rollout.state, RolloutDevice.wave, RolloutDevice.state, RolloutDevice.code)
            .join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
            .where(RolloutDevice.device_id == device_id)
            .order_by(Rollout.id.desc())
            .limit(20)
        ).all()
        quarantine = session.execute(
            select(Package.name, Package.version, Package.target, DeviceQuarantine.rollout_id, DeviceQuarantine.at)
            .join(Package, Package.id == DeviceQuarantine.package_id)
            .where(DeviceQuarantine.device_id == device_id)
        ).all()
    return {
        **device_to_json(device),
        "rollouts": [
            {"id": r[0], "name": r[1], "state": r[2], "wave": r[3], "device_state": r[4], "code": r[5]}
            for r in rollouts
        ],
        "quarantine": [
            {"name": q[0], "version": q[1], "target": q[2], "rollout_id": q[3], "at": q[4]} for q in quarantine
        ],
    }


def device_history(ctx: FleetContext, device_id: str, *, limit: int = 100, before_id: int | None = None) -> list[Event]:
    """The device's events, newest first; ``before_id`` pages back. Raises ``NotFoundError`` for an unknown device."""
    with ctx.db.session(readonly=True) as session:
        _device(session, device_id)
        query = (
            select(Event).where(Event.device_id == device_id).order_by(Event.ts.desc(), Event.id.desc()).limit(limit)
        )
        if before_id is not None:
            query = query.where(Event.id < before_id)
        return list(session.scalars(query))


def update_tags(ctx: FleetContext, device_id: str, changes: Mapping[str, str | None], actor: str) -> Device:
    """Merge ``changes`` into the device's tags (a None value removes the tag); audited.

    Rollouts already created keep their device lists; the new tags count for rollouts created
    later and for selectors of devices that enroll later. Raises ``NotFoundError``, ``UsageError``
    for a bad tag.
    """
    now = ctx.now()
    with ctx.db.session() as session:
        device = session.scalar(select(Device).where(Device.id == device_id).with_for_update())
        if device is None:
            raise NotFoundError(f"there is no device {device_id!r} (list them with edgeship fleet devices)")
        tags = dict(device.tags or {})
        for key, value in changes.items():
            if value is None:
                tags.pop(key, None)
            else:
                tags[key] = value
        checked = check_tags(tags)
        before = dict(device.tags or {})
        device.tags = checked
        audit.record(session, actor, "device.tags", f"device:{device_id}", {"before": before, "after": checked}, at=now)
    return device


def device_to_json(device: Device) -> dict[str, Any]:
    model = None
    if device.model_name is not None:
        model = {
            "name": device.model_name,
            "version": device.model_version,
            "slot": device.model_slot,
            "digest": device.model_digest,
        }
    return {
        "id": device.id,
        "target": device.target,
        "tags": device.tags,
        "enrolled_at": device.enrolled_at,
        "online": device.online,
        "last_seen": device.last_seen,
        "model": model,
        "ota": {"state": device.ota_state, "deployment_id": device.ota_deployment},
        "last_seq": device.last_seq,
        "seq_gaps": device.seq_gaps,
        "duplicates": device.duplicates,
        "latest": device.latest,
    }


def event_to_json(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "seq": event.seq,
        "ts": event.ts,
        "received_at": event.received_at,
        "event": event.event,
        "deployment_id": event.deployment_id,
        "state": event.state,
        "code": event.code,
        "message": event.message,
    }


__all__ = [
    "device_detail",
    "device_history",
    "device_to_json",
    "event_to_json",
    "list_devices",
    "parse_tag_filters",
    "update_tags",
]
