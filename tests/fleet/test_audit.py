"""The audit log: one row per change, in the change's transaction; newest first, filtered, paged."""

from __future__ import annotations

import pytest

from edgeship.fleet import audit
from tests.fleet.fleet_fixtures import FleetUnderTest


def test_record_list_and_page(any_fleet: FleetUnderTest):
    ctx = any_fleet.ctx
    with ctx.db.session() as session:
        for i in range(5):
            audit.record(session, f"token:{'a' if i % 2 else 'b'}", "thing.do", f"thing:{i}", {"i": i}, at=float(i))
    with ctx.db.session(readonly=True) as session:
        # The fixture's two token creations come first.
        everything = audit.list_entries(session, limit=100)
        assert [e.subject for e in everything[:5]] == [f"thing:{i}" for i in (4, 3, 2, 1, 0)]
        page = audit.list_entries(session, limit=2, before_id=everything[1].id, action="thing.do")
        assert [e.subject for e in page] == ["thing:2", "thing:1"]
        assert [e.subject for e in audit.list_entries(session, actor="token:a")] == ["thing:3", "thing:1"]
        assert audit.to_json(everything[0])["details"] == {"i": 4}


def test_a_change_that_fails_leaves_no_audit_row(fleet: FleetUnderTest):
    ctx = fleet.ctx
    with pytest.raises(RuntimeError), ctx.db.session() as session:
        audit.record(session, "t", "thing.do", "thing:x", at=1.0)
        raise RuntimeError
    with ctx.db.session(readonly=True) as session:
        assert audit.list_entries(session, subject="thing:x") == []


def test_long_values_are_cut_to_the_columns(fleet: FleetUnderTest):
    with fleet.ctx.db.session() as session:
        row = audit.record(session, "a" * 100, "b" * 100, "c" * 300, at=1.0)
    assert (len(row.actor), len(row.action), len(row.subject)) == (64, 64, 256)
