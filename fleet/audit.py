"""The audit log: who did what, when, to what. Written in the same transaction as the change it records.

``actor`` names a person's token (``token:<name>``), an enrollment (``enrollment:<token id>``), the
command line working on the database directly (``cli``), or a fleet process (``scheduler:<id>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeship.fleet.models import Audit


def record(
    session: Session, actor: str, action: str, subject: str, details: Mapping[str, Any] | None = None, *, at: float
) -> Audit:
    """Add one audit row to ``session`` (committed with the change it describes).

    ``action`` is a dotted verb (``package.push``, ``rollout.pause``); ``subject`` what it acted on
    (``package:3``, ``device:cam-1``); ``details`` JSON data. Long values are cut to the column sizes.
    """
    row = Audit(at=at, actor=actor[:64], action=action[:64], subject=subject[:256], details=dict(details or {}))
    session.add(row)
    return row


def list_entries(
    session: Session,
    *,
    limit: int = 100,
    before_id: int | None = None,
    actor: str | None = None,
    action: str | None = None,
    subject: str | None = None,
) -> list[Audit]:
    """The newest audit rows first; ``before_id`` pages back (pass the last id of the previous page)."""
    query = select(Audit).order_by(Audit.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(Audit.id < before_id)
    if actor is not None:
        query = query.where(Audit.actor == actor)
    if action is not None:
        query = query.where(Audit.action == action)
    if subject is not None:
        query = query.where(Audit.subject == subject)
    return list(session.scalars(query))


def to_json(row: Audit) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": row.at,
        "actor": row.actor,
        "action": row.action,
        "subject": row.subject,
        "details": row.details,
    }


__all__ = ["list_entries", "record", "to_json"]
