"""The device registry: filters (tags in SQL on both databases), detail, history, tag changes audited."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from edgeship.errors import NotFoundError, UsageError
from edgeship.fleet import devices
from edgeship.fleet.models import Audit, Event
from tests.fleet.fleet_fixtures import FleetUnderTest


def test_filters_and_pages(any_fleet: FleetUnderTest):
    for i in range(6):
        any_fleet.add_device(
            f"d{i}",
            tags={"site": "a" if i < 4 else "b", "hw": f"r{i % 2}"},
            online=i < 3,
            model_name="m",
            model_version=i % 3,
        )
    any_fleet.add_device("j0", target="jetson-orin-nano", tags={"site": "a"})
    ctx = any_fleet.ctx

    def ids(**filters: object) -> list[str]:
        rows, _total = devices.list_devices(ctx, **filters)  # type: ignore[arg-type]
        return [d.id for d in rows]

    assert ids(tags={"site": "a"}) == ["d0", "d1", "d2", "d3", "j0"]
    assert ids(tags={"site": "a", "hw": "r1"}) == ["d1", "d3"]
    assert ids(tags={"site": "c"}) == []
    assert ids(target="jetson-orin-nano") == ["j0"]
    assert ids(online=True) == ["d0", "d1", "d2"]
    assert ids(online=False, target="linux-x86_64") == ["d3", "d4", "d5"]
    assert ids(model="m", version=2) == ["d2", "d5"]
    rows, total = devices.list_devices(ctx, tags={"site": "a"}, limit=2, offset=2)
    assert total == 5 and [d.id for d in rows] == ["d2", "d3"]
    assert devices.parse_tag_filters(["site=a", "hw=r=2"]) == {"site": "a", "hw": "r=2"}
    with pytest.raises(UsageError, match="write key=value"):
        devices.parse_tag_filters(["site"])
    with pytest.raises(UsageError, match="tag key"):
        devices.parse_tag_filters(['a"b=1'])
    # Keys with the characters tags allow are matched literally in SQL, not as JSON path syntax.
    any_fleet.add_device("z0", tags={"hw.rev": "2", "rack-id": "7", "a_b": "x"})
    assert ids(tags={"hw.rev": "2", "rack-id": "7", "a_b": "x"}) == ["z0"]
    assert ids(tags={"hw": "2"}) == []


def test_detail_history_and_tags(any_fleet: FleetUnderTest):
    any_fleet.add_device("d0", tags={"site": "a"})
    ctx = any_fleet.ctx
    with ctx.db.session() as session:
        for seq in range(5):
            session.add(Event(device_id="d0", seq=seq, ts=10.0 + seq, received_at=20.0, event="ota.transition"))
    newest = devices.device_history(ctx, "d0", limit=2)
    assert [e.seq for e in newest] == [4, 3]
    assert [e.seq for e in devices.device_history(ctx, "d0", before_id=newest[-1].id)] == [2, 1, 0]
    updated = devices.update_tags(ctx, "d0", {"site": None, "hw": "r2"}, "token:ops")
    assert updated.tags == {"hw": "r2"}
    assert devices.device_detail(ctx, "d0")["tags"] == {"hw": "r2"}
    with ctx.db.session(readonly=True) as session:
        entry = session.scalars(select(Audit).where(Audit.action == "device.tags")).one()
    assert entry.details == {"before": {"site": "a"}, "after": {"hw": "r2"}} and entry.actor == "token:ops"
    for missing in (
        lambda: devices.device_detail(ctx, "nope"),
        lambda: devices.device_history(ctx, "nope"),
        lambda: devices.update_tags(ctx, "nope", {}, "t"),
    ):
        with pytest.raises(NotFoundError, match="there is no device 'nope'"):
            missing()
