"""What the agent finds at start: an unclean stop, a damaged slot, a damaged state file, leftovers."""

from __future__ import annotations

import json
import sqlite3

import pytest

from edgeship.device_agent.config import load_config
from edgeship.device_agent.daemon import Agent
from edgeship.device_agent.store import StateStore

pytestmark = pytest.mark.py310


@pytest.fixture
def two_versions(agent_config, packages):
    """A device with v1 in slot A and v2 (active) in slot B."""
    cfg = load_config(agent_config())
    for version in (1, 2):
        assert (
            Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=version))["state"]
            == "COMMITTED"
        )
    return cfg


def events(cfg) -> list[dict]:
    db = sqlite3.connect(cfg.data_dir / "outbox.sqlite")
    rows = db.execute("SELECT payload FROM outbox WHERE topic LIKE '%/events' ORDER BY seq").fetchall()
    return [json.loads(p) for (p,) in rows]


def flip_byte(path, offset=-40):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_after_an_unclean_stop_a_damaged_active_slot_is_found_and_the_other_slot_serves(two_versions):
    cfg = two_versions
    (cfg.data_dir / "running").write_text(json.dumps({"pid": 999999, "boot_id": "x"}))  # left by a power cut
    flip_byte(cfg.data_dir / "slots" / "B" / "model" / "model.onnx")  # same size: only a re-hash sees it
    agent = Agent(cfg, serve_http=False)
    agent.start()
    try:
        assert agent.holder.current is not None and agent.holder.current.record.version == 1
        assert StateStore(cfg.data_dir).load().active == "A"
        names = [e["event"] for e in events(cfg)]
        assert "slot.corrupt" in names and "agent.recovered" in names
        recovered = next(e for e in events(cfg) if e["event"] == "agent.recovered")
        assert "power" in recovered["message"] or "killed" in recovered["message"]
    finally:
        agent.stop()
    assert not (cfg.data_dir / "running").exists()  # this stop was clean


def test_with_both_slots_damaged_the_device_serves_nothing_and_says_so(two_versions):
    cfg = two_versions
    (cfg.data_dir / "running").write_text("{}")
    for slot in ("A", "B"):
        flip_byte(cfg.data_dir / "slots" / slot / "model" / "model.onnx")
    agent = Agent(cfg, serve_http=False)
    agent.start()
    try:
        assert agent.holder.current is None and StateStore(cfg.data_dir).load().active is None
        assert sum(e["event"] == "slot.corrupt" for e in events(cfg)) == 1
    finally:
        agent.stop()


def test_a_damaged_state_file_is_rebuilt_from_the_slots(two_versions):
    cfg = two_versions
    (cfg.data_dir / "state.json").write_text('{"schema": 1, "active": "Q"')
    agent = Agent(cfg, serve_http=False)
    agent.start()
    try:
        state = StateStore(cfg.data_dir).load()
        assert state.active == "B" and state.slots["A"].version == 1 and state.committed == {"sensor-net": 2}
        assert agent.holder.current is not None and agent.holder.current.record.version == 2
    finally:
        agent.stop()


def test_leftovers_of_an_interrupted_update_are_removed(two_versions):
    cfg = two_versions
    downloads = cfg.data_dir / "downloads"
    (downloads / "dep-old.edgepkg.part").write_bytes(b"x" * 100)
    state = StateStore(cfg.data_dir).load()
    StateStore(cfg.data_dir).save(state.with_slot("A", None))  # slot A forgotten, its files still there
    agent = Agent(cfg, serve_http=False)
    agent.start()
    agent.stop()
    assert not list(downloads.iterdir()) and not (cfg.data_dir / "slots" / "A").exists()


def test_one_agent_per_data_dir(two_versions):
    agent = Agent(two_versions, serve_http=False)
    agent.start()
    try:
        from edgeship.errors import UsageError

        with pytest.raises(UsageError, match="another edgeship agent"):
            Agent(two_versions, serve_http=False).start()
    finally:
        agent.stop()
