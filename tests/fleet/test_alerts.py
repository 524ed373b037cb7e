"""Alerts: the table and its listing (newest first, open only, paged by id); one open alert per (kind, subject)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from edgeship.fleet.alerts import list_alerts
from edgeship.fleet.db import Database, migrate
from edgeship.fleet.models import Alert


def _alert(kind: str, subject: str, opened_at: float, resolved_at: float | None = None) -> Alert:
    return Alert(
        kind=kind,
        subject=subject,
        severity="warning",
        message=f"{subject}: {kind}",
        details={"k": 1},
        opened_at=opened_at,
        resolved_at=resolved_at,
    )


def test_list_alerts_open_only_newest_first_and_paged(db_url: str):
    database = Database(db_url)
    try:
        migrate(database)
        with database.session() as session:
            session.add(_alert("device_offline", "device/d1", 1.0, resolved_at=2.0))
            session.add(_alert("device_offline", "device/d1", 3.0))
            session.add(_alert("drift", "device/d2", 4.0))
            session.add(_alert("rollout_halted", "rollout/1", 5.0))
        with database.session(readonly=True) as session:
            opened = list_alerts(session)
            assert [(a.kind, a.subject) for a in opened] == [
                ("rollout_halted", "rollout/1"),
                ("drift", "device/d2"),
                ("device_offline", "device/d1"),
            ]
            assert len(list_alerts(session, open_only=False)) == 4
            first = list_alerts(session, open_only=False, limit=2)
            rest = list_alerts(session, open_only=False, limit=2, before_id=first[-1].id)
            assert [a.opened_at for a in first + rest] == [5.0, 4.0, 3.0, 1.0]
            assert rest[-1].details == {"k": 1} and rest[-1].resolved_at == 2.0
        # A second open alert for the same (kind, subject) is refused by the database itself.
        with pytest.raises(IntegrityError), database.session() as session:
            session.add(_alert("drift", "device/d2", 6.0))
        # A resolved one beside an open one is fine.
        with database.session() as session:
            session.add(_alert("drift", "device/d2", 0.5, resolved_at=0.7))
    finally:
        database.dispose()
