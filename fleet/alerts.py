"""Alerts: conditions someone should look at, opened and resolved by the fleet service.

This module writes the ``alerts`` table (``fleet.models.Alert``). ``evaluate`` compares what is
true now with the open alerts and opens or resolves them, in one transaction; every fleet
process calls it periodically (the service's maintenance thread) and they serialize on a lock
(PostgreSQL advisory lock; SQLite's write lock), so a change is made, and announced, once.

Kinds (``subject`` in brackets):

* ``device_offline`` (``device/<id>``, warning): the device's status topic said offline, or nothing
  came from it for ``alerts.offline_after``. Resolved by its next message. A device never heard
  from since enrollment has no alert.
* ``drift`` (``device/<id>``, warning): the largest drift PSI in its telemetry of the last
  ``alerts.drift_window`` is over ``alerts.drift_psi``. Resolved when telemetry in the window is
  back under it (a device that went silent keeps the alert; ``device_offline`` says why).
* ``rollout_halted`` (``rollout/<id>``, critical): a gate stopped a rollout (state ``halted``, then
  ``rolling_back``). Resolved when it runs again or ends (rolled back, aborted, completed).

``Notifier`` POSTs each change to ``alerts.webhook_url`` from its own thread, retried with back-off;
it never blocks the caller, and a failing webhook is logged and counted, never fatal.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeship import __version__
from edgeship.fleet.db import advisory_lock
from edgeship.fleet.models import Alert, Device, Rollout, Telemetry
from edgeship.fleet.settings import AlertSettings

log = logging.getLogger("edgeship.fleet.alerts")

KINDS = ("device_offline", "drift", "rollout_halted")
SEVERITIES = ("warning", "critical")
HALTED_STATES = ("halted", "rolling_back")
_LOCK = "edgeship-fleet-alerts"


def list_alerts(
    session: Session, *, open_only: bool = True, limit: int = 100, before_id: int | None = None
) -> list[Alert]:
    """Alerts, newest first (by id): only the open ones unless ``open_only`` is False.

    ``before_id`` pages on: the next page is ``before_id=<last id of this page>``.
    """
    query = select(Alert)
    if open_only:
        query = query.where(Alert.resolved_at.is_(None))
    if before_id is not None:
        query = query.where(Alert.id < before_id)
    return list(session.scalars(query.order_by(Alert.id.desc()).limit(limit)))


def alert_to_json(alert: Alert) -> dict[str, Any]:
    return {
        "id": alert.id,
        "kind": alert.kind,
        "subject": alert.subject,
        "severity": alert.severity,
        "message": alert.message,
        "details": alert.details or {},
        "opened_at": alert.opened_at,
        "resolved_at": alert.resolved_at,
        "open": alert.resolved_at is None,
    }


@dataclass(frozen=True)
class Condition:
    """Something true now that deserves an open alert."""

    kind: str
    subject: str
    severity: str
    message: str
    details: dict[str, Any]


@dataclass(frozen=True)
class Change:
    """An alert opened or resolved by ``evaluate`` (what the webhook is told)."""

    event: str  # "opened" | "resolved"
    alert: dict[str, Any]


def current_conditions(session: Session, settings: AlertSettings, now: float) -> dict[tuple[str, str], Condition]:
    """Every condition true at ``now``, by (kind, subject): three aggregate queries."""
    found: dict[tuple[str, str], Condition] = {}
    stale = now - settings.offline_after
    rows = session.execute(
        select(Device.id, Device.online, Device.last_seen).where(
            Device.last_seen.is_not(None), (Device.online.is_(False)) | (Device.last_seen < stale)
        )
    ).all()
    for device_id, online, last_seen in rows:
        why = "its status says offline" if not online else f"nothing heard for {now - (last_seen or now):.0f} s"
        found[("device_offline", f"device/{device_id}")] = Condition(
            "device_offline",
            f"device/{device_id}",
            "warning",
            f"device {device_id} is offline: {why}",
            {"device_id": device_id, "last_seen": last_seen, "status_offline": not online},
        )
    drift = session.execute(
        select(Telemetry.device_id, func.max(Telemetry.drift_psi))
        .where(Telemetry.ts >= now - settings.drift_window, Telemetry.drift_psi.is_not(None))
        .group_by(Telemetry.device_id)
    ).all()
    for device_id, psi in drift:
        subject = f"device/{device_id}"
        if psi is not None and psi > settings.drift_psi:
            found[("drift", subject)] = Condition(
                "drift",
                subject,
                "warning",
                f"device {device_id}: drift PSI {psi:.3g} is over {settings.drift_psi:g}",
                {"device_id": device_id, "psi": psi, "threshold": settings.drift_psi},
            )
        else:
            # Data in the window under the threshold: an open drift alert may resolve (see evaluate).
            found[("drift_clear", subject)] = Condition("drift_clear", subject, "", "", {})
    halted = session.execute(
        select(Rollout.id, Rollout.name, Rollout.state, Rollout.halt_reason, Rollout.current_wave).where(
            Rollout.state.in_(HALTED_STATES)
        )
    ).all()
    for rollout_id, name, state, reason, wave in halted:
        subject = f"rollout/{rollout_id}"
        found[("rollout_halted", subject)] = Condition(
            "rollout_halted",
            subject,
            "critical",
            f"rollout {rollout_id} ({name}) halted at wave {wave + 1}: {reason or 'a gate was breached'}",
            {"rollout_id": rollout_id, "name": name, "state": state, "halt_reason": reason, "wave": wave},
        )
    return found


def evaluate(
    session_factory: Callable[[], AbstractContextManager[Session]], settings: AlertSettings, now: float
) -> list[Change]:
    """Open alerts for new conditions and resolve those whose condition cleared; returns the changes.

    One transaction under a lock, so several fleet processes make (and announce) each change once.
    """
    changes: list[Change] = []
    with session_factory() as session:
        advisory_lock(session, _LOCK)
        conditions = current_conditions(session, settings, now)
        open_alerts = {(a.kind, a.subject): a for a in list_alerts(session, open_only=True, limit=1_000_000)}
        opened: list[Alert] = []
        for key, condition in conditions.items():
            if condition.kind not in KINDS or key in open_alerts:
                continue
            alert = Alert(
                kind=condition.kind,
                subject=condition.subject,
                severity=condition.severity,
                message=condition.message,
                details=condition.details,
                opened_at=now,
            )
            session.add(alert)
            opened.append(alert)
        for key, alert in open_alerts.items():
            if key in conditions:
                continue
            if alert.kind == "drift" and ("drift_clear", alert.subject) not in conditions:
                continue  # no telemetry in the window: nothing says the drift is gone
            alert.resolved_at = now
            changes.append(Change("resolved", alert_to_json(alert)))
        session.flush()
        changes.extend(Change("opened", alert_to_json(a)) for a in opened)
    return changes


class Notifier:
    """Delivers alert changes to a webhook from a background thread: POST JSON, retried with back-off.

    ``send`` never blocks: the queue is bounded (``capacity``) and a change that does not fit is
    dropped and counted. Each delivery is tried ``1 + retries`` times, waiting 1 s, 2 s, 4 s ...
    (``backoff_s``, doubled, at most 60 s) between tries; a 2xx answer is success, anything else
    (another status, a refused connection, a timeout) is retried, then logged and counted as failed.
    ``counts``: ``sent``, ``failed``, ``dropped``, ``retried``.
    """

    def __init__(
        self,
        url: str,
        *,
        fleet_id: str,
        timeout_s: float = 5.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        capacity: int = 1000,
    ) -> None:
        self.url = url
        self.fleet_id = fleet_id
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Change | None] = queue.Queue(capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeship-alert-webhook", daemon=True)
        self._thread.start()

    def payload(self, change: Change) -> dict[str, Any]:
        return {"event": change.event, "fleet_id": self.fleet_id, "alert": change.alert, "sent_at": time.time()}

    def send(self, changes: list[Change]) -> None:
        for change in changes:
            try:
                self._queue.put_nowait(change)
            except queue.Full:
                self._count("dropped")
                log.warning("alert webhook queue full: dropped %s %s", change.event, change.alert.get("subject"))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _run(self) -> None:
        while True:
            change = self._queue.get()
            if change is None or self._stop.is_set():
                return
            self._deliver(change)

    def _deliver(self, change: Change) -> None:
        body = json.dumps(self.payload(change)).encode()
        delay = self.backoff_s
        error = "stopped"
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retried")
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, 60.0)
            try:
                request = urllib.request.Request(
                    self.url,
                    data=body,
                    method="POST",
                    headers={"Content-Type": "application/json", "User-Agent": f"edgeship-fleet/{__version__}"},
                )
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                self._count("sent")
                return
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            log.debug("alert webhook try %d failed: %s", attempt + 1, error)
        self._count("failed")
        log.warning(
            "alert webhook %s: could not deliver %s %s (%s); dropped",
            self.url,
            change.event,
            change.alert.get("subject"),
            error,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the delivery in progress (waits ``timeout`` at most); undelivered changes are dropped."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)


__all__ = [
    "HALTED_STATES",
    "KINDS",
    "SEVERITIES",
    "Change",
    "Condition",
    "Notifier",
    "alert_to_json",
    "current_conditions",
    "evaluate",
    "list_alerts",
]
