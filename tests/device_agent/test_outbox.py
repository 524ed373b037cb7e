"""The on-disk telemetry/event queue: ordered, numbered, bounded, durable across a reopen."""

from __future__ import annotations

import threading

import pytest

from edgeship.device_agent.outbox import Outbox

pytestmark = pytest.mark.py310


def payload(seq: int) -> bytes:
    return f'{{"seq": {seq}}}'.encode()


def test_rows_come_out_in_sequence_order_with_their_numbers(tmp_path):
    box = Outbox(tmp_path / "q.sqlite")
    seqs = [box.put("t", payload) for _ in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    rows = box.peek(10)
    assert [r.seq for r in rows] == seqs and rows[2].payload == payload(2)
    assert [r.seq for r in box.peek(2, exclude={0})] == [1, 2]


def test_acked_rows_leave_and_numbers_continue_after_reopen(tmp_path):
    box = Outbox(tmp_path / "q.sqlite")
    for _ in range(3):
        box.put("t", payload)
    box.ack(0)
    box.ack(1)
    box.ack(1)  # twice: no-op
    box.close()
    again = Outbox(tmp_path / "q.sqlite")
    assert [r.seq for r in again.peek(10)] == [2] and again.depth == 1
    assert again.put("t", payload) == 3


def test_over_budget_the_oldest_are_dropped_and_counted(tmp_path):
    box = Outbox(tmp_path / "q.sqlite", max_messages=100)
    for _ in range(250):
        box.put("t", payload)
    assert box.depth == 100 and box.dropped == 150
    assert [r.seq for r in box.peek(3)] == [150, 151, 152]


def test_byte_budget_is_enforced_too(tmp_path):
    box = Outbox(tmp_path / "q.sqlite", max_messages=10_000, max_bytes=10_000)
    for _ in range(100):
        box.put("t", lambda seq: b"x" * 500)
    assert box.depth == 20 and box.dropped == 80


def test_concurrent_producers_never_share_a_number(tmp_path):
    box = Outbox(tmp_path / "q.sqlite")
    got: list[int] = []
    lock = threading.Lock()

    def produce() -> None:
        for _ in range(200):
            seq = box.put("t", payload)
            with lock:
                got.append(seq)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(800)) and box.depth == 800


def test_a_failing_builder_leaves_no_row_and_reuses_no_number(tmp_path):
    box = Outbox(tmp_path / "q.sqlite")
    box.put("t", payload)

    def broken(seq: int) -> bytes:
        raise ValueError("bug")

    with pytest.raises(ValueError):
        box.put("t", broken)
    assert box.depth == 1 and box.put("t", payload) == 1
