"""Alerts: conditions someone should look at, opened and resolved by the fleet service.

This module writes the ``alerts`` table (``fleet.models.Alert``). Reading: ``list_alerts``.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeship.fleet.models import Alert

KINDS = ("device_offline", "drift", "rollout_halted")
SEVERITIES = ("warning", "critical")


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


__all__ = ["KINDS", "SEVERITIES", "list_alerts"]
