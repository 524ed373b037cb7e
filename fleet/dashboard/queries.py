"""What each dashboard page shows, read from the database in a few indexed queries.

Lists are paged by key (keyset pagination: ``id > after`` / ``id < before``, never ``OFFSET``), so a
page of the device list costs the same at the end of 10,000 devices as at the start. The
overview's counts are ``GROUP BY``s over ``devices`` (one row per device: a few milliseconds at
10,000, measured by ``benchmarks/dashboard.py``). Charts read one device's newest telemetry rows
through ``ix_telemetry_device_ts``.

Rollout status and gates come from ``fleet.rollouts.status`` and ``fleet.rollout_logic`` (the same
functions the API and the scheduler use), so the dashboard shows what the scheduler judged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from edgeship.fleet import alerts as alert_ops
from edgeship.fleet import devices as device_ops
from edgeship.fleet import rollouts as rollout_ops
from edgeship.fleet.context import FleetContext
from edgeship.fleet.models import Alert, Device, Rollout, RolloutDevice, Telemetry
from edgeship.fleet.rollout_logic import ENDED_ROLLOUT, GATE_CHECKS, TERMINAL_DEVICE, Gates, judge_values

DEVICE_PAGE = 50
ROLLOUT_PAGE = 25
EVENT_PAGE = 50
CHART_POINTS = 720
"""Telemetry rows per device chart: 12 hours at one message a minute."""


@dataclass(frozen=True)
class Page:
    """One page of a keyset-paged list: its rows and the keys of the neighbouring pages (None: none)."""

    rows: list[Any]
    next_key: str | int | None = None
    prev_key: str | int | None = None


def _keyset(
    session: Session,
    query: Select[Any],
    key: Any,
    *,
    after: Any = None,
    before: Any = None,
    limit: int,
    descending: bool = False,
) -> Page:
    """Page ``query`` by the unique column ``key`` in display order (ascending, or ``descending``).

    ``after``: the rows that follow that key in display order; ``before``: the rows that precede it.
    The page's ``next_key`` goes in the next link's ``after``, its ``prev_key`` in the previous link's ``before``.
    """

    def key_of(row: Any) -> Any:
        return getattr(row, key.key)

    if before is not None:
        # Walk backwards from ``before``, then show the page in display order.
        query = query.where(key > before if descending else key < before)
        rows = list(session.scalars(query.order_by(key.asc() if descending else key.desc()).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit][::-1]
        if not rows:
            return Page(rows)
        return Page(rows, next_key=key_of(rows[-1]), prev_key=key_of(rows[0]) if more else None)
    if after is not None:
        query = query.where(key < after if descending else key > after)
    rows = list(session.scalars(query.order_by(key.desc() if descending else key.asc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    if not rows:
        return Page(rows)
    return Page(
        rows, next_key=key_of(rows[-1]) if more else None, prev_key=key_of(rows[0]) if after is not None else None
    )


# --------------------------------------------------------------------------- overview


@dataclass
class Overview:
    total: int
    online: int
    versions: list[tuple[str, int]]
    slots: list[tuple[str, int]]
    ota_states: list[tuple[str, int]]
    devices: Page
    active_rollouts: list[Rollout]
    alerts: list[Alert] = field(default_factory=list)
    open_alerts: int = 0

    @property
    def offline(self) -> int:
        return self.total - self.online


def device_filters(status: str | None, prefix: str | None) -> list[Any]:
    conditions: list[Any] = []
    if status == "online":
        conditions.append(Device.online.is_(True))
    elif status == "offline":
        conditions.append(Device.online.is_(False))
    if prefix:
        conditions.append(Device.id.startswith(prefix, autoescape=True))
    return conditions


def overview(
    ctx: FleetContext,
    *,
    status: str | None = None,
    prefix: str | None = None,
    after: str | None = None,
    before: str | None = None,
    limit: int = DEVICE_PAGE,
) -> Overview:
    """The fleet at a glance: online/offline, versions, slots, OTA states, open alerts, one page of devices."""
    with ctx.db.session(readonly=True) as session:
        by_online = dict(session.execute(select(Device.online, func.count()).group_by(Device.online)).all())
        versions = session.execute(
            select(Device.model_name, Device.model_version, func.count().label("n"))
            .group_by(Device.model_name, Device.model_version)
            .order_by(func.count().desc())
            .limit(12)
        ).all()
        slots = session.execute(
            select(Device.model_slot, func.count()).group_by(Device.model_slot).order_by(Device.model_slot)
        ).all()
        ota = session.execute(
            select(Device.ota_state, func.count()).group_by(Device.ota_state).order_by(func.count().desc()).limit(12)
        ).all()
        page = _keyset(
            session,
            select(Device).where(*device_filters(status, prefix)),
            Device.id,
            after=after,
            before=before,
            limit=limit,
        )
        active = list(
            session.scalars(
                select(Rollout).where(Rollout.state.not_in(ENDED_ROLLOUT)).order_by(Rollout.id.desc()).limit(10)
            )
        )
        alerts = alert_ops.list_alerts(session, open_only=True, limit=20)
        open_alerts = int(
            session.scalar(select(func.count()).select_from(Alert).where(Alert.resolved_at.is_(None))) or 0
        )
    online = int(by_online.get(True, 0))
    total = sum(int(n) for n in by_online.values())
    return Overview(
        total=total,
        online=online,
        versions=[(f"{name} v{version}" if name else "no model", int(n)) for name, version, n in versions],
        slots=[(slot or "none", int(n)) for slot, n in slots],
        ota_states=[(state or "unknown", int(n)) for state, n in ota],
        devices=page,
        active_rollouts=active,
        alerts=alerts,
        open_alerts=open_alerts,
    )


def alerts_page(ctx: FleetContext, *, open_only: bool, before_id: int | None, limit: int = 50) -> Page:
    """A page of alerts, newest first (``before_id`` pages back)."""
    with ctx.db.session(readonly=True) as session:
        rows = list(alert_ops.list_alerts(session, open_only=open_only, limit=limit + 1, before_id=before_id))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, next_key=rows[-1].id if more and rows else None, prev_key=None)


# --------------------------------------------------------------------------- device


CHARTS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("latency", "ms", (("p50", "p50_ms"), ("p99", "p99_ms"))),
    ("errors", "per message", (("errors", "errors"),)),
    ("drift (PSI)", "", (("max PSI", "drift_psi"),)),
    ("CPU", "%", (("cpu", "cpu_percent"),)),
    ("RSS", "MiB", (("rss", "rss_mib"),)),
    ("temperature", "°C", (("temperature", "temperature_c"),)),
)
"""The device page's charts: title, unit, and the (label, telemetry column) series each draws."""


@dataclass
class DeviceView:
    detail: dict[str, Any]
    charts: list[dict[str, Any]]
    points: int
    events: Page


def device_view(ctx: FleetContext, device_id: str, *, events_before: int | None = None) -> DeviceView:
    """A device, its telemetry as chart series (oldest first) and a page of its events (newest first).

    Raises ``NotFoundError`` for an unknown device.
    """
    detail = device_ops.device_detail(ctx, device_id)
    columns = [getattr(Telemetry, column) for _, _, series in CHARTS for _, column in series]
    with ctx.db.session(readonly=True) as session:
        rows = list(
            session.execute(
                select(Telemetry.ts, *columns)
                .where(Telemetry.device_id == device_id)
                .order_by(Telemetry.ts.desc())
                .limit(CHART_POINTS)
            ).all()
        )
    rows.reverse()
    events = device_ops.device_history(ctx, device_id, limit=EVENT_PAGE + 1, before_id=events_before)
    more = len(events) > EVENT_PAGE
    events = events[:EVENT_PAGE]
    return DeviceView(
        detail=detail,
        charts=chart_series(rows),
        points=len(rows),
        events=Page(events, next_key=events[-1].id if more and events else None),
    )


def chart_series(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """``CHARTS`` filled from telemetry rows (``ts`` then the columns in ``CHARTS`` order); None values are gaps."""
    charts = []
    col = 1
    for title, unit, series in CHARTS:
        out = []
        for label, _column in series:
            points = [[round(r[0], 3), r[col]] for r in rows if r[col] is not None]
            out.append({"name": label, "points": points})
            col += 1
        charts.append({"title": title, "unit": unit, "series": out})
    return charts


# --------------------------------------------------------------------------- rollouts


def rollouts_page(
    ctx: FleetContext, *, state: str | None = None, after: int | None = None, before: int | None = None
) -> Page:
    """Rollouts newest first, one page (``after``: older than that id; ``before``: newer)."""
    query = select(Rollout)
    if state:
        query = query.where(Rollout.state == state)
    with ctx.db.session(readonly=True) as session:
        return _keyset(session, query, Rollout.id, after=after, before=before, limit=ROLLOUT_PAGE, descending=True)


@dataclass(frozen=True)
class GateRow:
    gate: str
    value: float | None
    bound: str
    """``max`` or ``min``"""
    threshold: float | None
    breached: bool


def gate_rows(gates: Mapping[str, Any], values: Mapping[str, float | None]) -> list[GateRow]:
    """Each gate's value against its threshold, breached or not, as the scheduler judged it."""
    parsed = Gates.from_json({k: v for k, v in gates.items() if k in Gates.__dataclass_fields__})
    breached = {b.gate for b in judge_values(parsed, values)}
    rows = []
    for name, field_name, is_minimum in GATE_CHECKS:
        rows.append(
            GateRow(
                gate=name,
                value=values.get(name),
                bound="min" if is_minimum else "max",
                threshold=getattr(parsed, field_name),
                breached=name in breached,
            )
        )
    return rows


BAR_ORDER = (
    "COMMITTED",
    "reverted",
    "commanded",
    "reverting",
    "pending",
    "FAILED",
    "ROLLED_BACK",
    "timed_out",
    "revert_failed",
    "skipped",
)
"""The order of device states in a wave's progress bar: done well, under way, waiting, gone wrong, left out."""


def bar_segments(states: Mapping[str, int], total: int) -> list[dict[str, Any]]:
    """A wave's stacked progress bar: per state its count, x and width in percent of the wave."""
    out = []
    x = 0.0
    order = list(BAR_ORDER) + sorted(s for s in states if s not in BAR_ORDER)
    for state in order:
        n = states.get(state, 0)
        if not n or not total:
            continue
        width = 100.0 * n / total
        out.append({"state": state, "count": n, "x": round(x, 3), "width": round(width, 3)})
        x += width
    return out


_PROBLEM_STATES = ("FAILED", "ROLLED_BACK", "timed_out", "revert_failed")


@dataclass
class RolloutView:
    status: dict[str, Any]
    waves: list[dict[str, Any]]
    judged: list[tuple[int, list[GateRow]]]
    problems: list[RolloutDevice]
    operations: list[str]


def rollout_view(ctx: FleetContext, rollout_id: int) -> RolloutView:
    """A rollout's status with per-wave progress, gate values against thresholds, and devices that failed.

    Raises ``NotFoundError`` for an unknown rollout.
    """
    status = rollout_ops.status(ctx, rollout_id)
    waves = []
    for wave in status["waves"]:
        states: dict[str, int] = wave["states"]
        # Skipped devices (already current, or left out after a halt) were never part of the wave's work.
        skipped = states.get("skipped", 0)
        finished = sum(n for s, n in states.items() if s in TERMINAL_DEVICE and s != "skipped")
        work = wave["devices"] - skipped
        waves.append(
            {
                **wave,
                "finished": finished,
                "skipped": skipped,
                "work": work,
                "percent": round(100.0 * finished / work) if work else None,
                "current": wave["index"] == status["current_wave"] and not status["ended"],
                "segments": bar_segments(states, wave["devices"]),
            }
        )
    judged = []
    for key, values in sorted((status.get("gate_values") or {}).items(), key=lambda kv: int(kv[0])):
        judged.append((int(key), gate_rows(status.get("gates") or {}, values or {})))
    with ctx.db.session(readonly=True) as session:
        problems = list(
            session.scalars(
                select(RolloutDevice)
                .where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.state.in_(_PROBLEM_STATES))
                .order_by(RolloutDevice.wave, RolloutDevice.device_id)
                .limit(20)
            )
        )
    operations = [op for op, (allowed, _) in rollout_ops.TRANSITIONS.items() if status["state"] in allowed]
    return RolloutView(status=status, waves=waves, judged=judged, problems=problems, operations=operations)


__all__ = [
    "CHARTS",
    "DeviceView",
    "GateRow",
    "Overview",
    "Page",
    "RolloutView",
    "alerts_page",
    "bar_segments",
    "chart_series",
    "device_view",
    "gate_rows",
    "overview",
    "rollout_view",
    "rollouts_page",
]
