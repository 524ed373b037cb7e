"""The benchmarks' thin telemetry load (``fleet.telemetry_load``): its MQTT 5 bytes against a real
mosquitto and paho, the agent's message schema, sequence numbers without gaps, and the broker's
account checks applying to it."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from edgeship.device_agent import protocol
from edgeship.fleet.broker import Mosquitto
from edgeship.fleet.telemetry_load import PUBLISH, TelemetryLoad, publish_packet, read_packets, varint
from tests.brokers import Probe, SecureBroker


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.data())
def test_packets_split_anywhere_are_read_back_whole_and_in_order(payloads, data):
    stream = b"".join(publish_packet(b"\x00\x01t", i + 1, p) for i, p in enumerate(payloads))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    buffer, got = bytearray(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        buffer += stream[start:end]
        got += read_packets(buffer)
    assert not buffer
    assert [kind for kind, _ in got] == [PUBLISH] * len(payloads)
    assert [body[len(b"\x00\x01t") + 3 :] for _, body in got] == payloads  # after packet id and properties


def test_varint_is_mqtts_variable_byte_integer():
    assert [varint(n) for n in (0, 127, 128, 16_383, 16_384, 268_435_455)] == [
        b"\x00",
        b"\x7f",
        b"\x80\x01",
        b"\xff\x7f",
        b"\x80\x80\x01",
        b"\xff\xff\xff\x7f",
    ]


def test_every_acknowledged_message_reaches_a_subscriber_in_the_agents_schema(mosquitto: Mosquitto) -> None:
    assert mosquitto.port is not None
    devices = {f"d{i}": None for i in range(20)}
    with Probe("127.0.0.1", mosquitto.port) as probe:
        probe.connect()
        probe.subscribe("edgeship/v1/f1/+/telemetry")

        async def run() -> int:
            load = TelemetryLoad("f1", "127.0.0.1", mosquitto.port, devices, interval_s=0.05, duration_s=2.0)
            await load.connect()
            counts = await load.run()
            assert (counts.connected, counts.refused, counts.unacknowledged, counts.dropped) == (20, 0, 0, 0)
            return counts.sent

        sent = asyncio.run(run())
        assert sent >= 20 * 30  # about 40 per device in 2 s
        received = probe.wait_for(sent)
    seqs: dict[str, list[int]] = {}
    for message in received:
        parsed = protocol.parse(message.payload, ("telemetry",))
        assert message.topic == f"edgeship/v1/f1/{parsed['device']}/telemetry"
        seqs.setdefault(parsed["device"], []).append(parsed["seq"])
    assert set(seqs) == set(devices)
    assert all(sorted(s) == list(range(len(s))) for s in seqs.values())


def test_a_device_with_a_wrong_password_is_refused_and_counted(secure_broker: SecureBroker) -> None:
    port = secure_broker.broker.port
    assert port is not None
    devices = {"dev-1": secure_broker.passwords["dev-1"], "dev-2": "not-its-password"}

    async def run() -> tuple[int, int, list[str]]:
        load = TelemetryLoad("f1", "127.0.0.1", port, devices, interval_s=0.1, duration_s=0.5)
        await load.connect()
        counts = await load.run()
        return counts.connected, counts.connect_failed, counts.errors

    connected, failed, errors = asyncio.run(run())
    assert (connected, failed) == (1, 1)
    assert errors == ["dev-2: CONNACK reason 0x87"]  # MQTT 5: not authorized (mosquitto, wrong password)


def test_a_credentials_file_that_is_not_one_says_which_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "credentials.jsonl"
    bad.write_text('{"device_id": "d1", "password": "x"}\n\nnot json\n')
    for module in ("edgeship.fleet.telemetry_load", "edgeship.fleet.simulator"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--fleet", "f1", "--credentials", str(bad)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0 and result.stderr.strip().splitlines() == [
            f"error: {bad}, line 3: not a device's credentials (a JSON object with device_id, as "
            "'edgeship fleet import-devices --out' writes them)"
        ], (module, result.stderr)
