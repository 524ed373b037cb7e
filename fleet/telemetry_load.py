"""Sustained QoS 1 telemetry from many devices at the lowest CPU cost per message, for benchmarks.

``fleet.simulator`` plays whole devices (OTA answers, commands, going offline) on aiomqtt/paho, which
costs about 370 us of CPU per telemetry message here (profiled: asyncio futures and tasks per
publish, paho's MQTT 5 property objects, JSON). At 5,000 messages/s that is 1.9 of this machine's
2 cores, before the broker, the database and the fleet get any. This module does only the
telemetry part of a device, over the same protocol: each device has its own MQTT 5 session (its
own account, so the broker's ACL applies), and its messages are built by ``SimDevice.telemetry``
(the agent's schema, per-device sequence numbers). What is thinner is the MQTT client: CONNECT,
QoS 1 PUBLISH and PUBACK are written and read as bytes on one asyncio protocol per connection
(MQTT 5.0, sections 3.1, 3.3, 3.4), with no per-message task, future or property object.

A message counts as ``sent`` once the broker acknowledged it (PUBACK with a success code): from
then on the broker owns it, and a benchmark counting the database's rows by sequence number checks
that none was lost after that point. Messages refused by the broker (a reason code >= 0x80) are
counted apart; a connection that drops stops that device (counted), it is not reconnected.

    python -m edgeship.fleet.telemetry_load --fleet bench --broker 127.0.0.1:1883 \\
        --credentials devices.jsonl --telemetry-s 2 --duration 300 --seq-start 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeship.device_agent.topics import device_topic
from edgeship.errors import EdgeshipError, UsageError
from edgeship.fleet.simulator import Behaviour, SimDevice, Simulator, add_device_arguments, device_passwords

CONNECT, CONNACK, PUBLISH, PUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 12, 13, 14


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property length)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, username: str | None, password: str | None, keepalive: int) -> bytes:
    """An MQTT 5 CONNECT with clean start and no session kept after the connection (expiry 0)."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _string("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + varint(0) + _string(client_id)
    if username is not None:
        body += _string(username)
    if password is not None:
        body += _string(password)
    return bytes([CONNECT << 4]) + varint(len(body)) + body


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH (``topic`` already length-prefixed) without properties."""
    body_len = len(topic) + 2 + 1 + len(payload)
    return b"".join((b"\x32", varint(body_len), topic, struct.pack("!H", packet_id), b"\x00", payload))


def read_packets(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Whole packets at the front of ``buffer`` as (type, body), removed from it; a partial one stays."""
    packets: list[tuple[int, bytes]] = []
    while len(buffer) >= 2:
        length, multiplier, i = 0, 1, 1
        while True:
            if i >= len(buffer):
                return packets
            byte = buffer[i]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not byte & 0x80:
                break
            if i > 4:
                raise ValueError("malformed remaining length")
        if len(buffer) < i + length:
            return packets
        packets.append((buffer[0] >> 4, bytes(buffer[i : i + length])))
        del buffer[: i + length]
    return packets


@dataclass
class Counts:
    sent: int = 0
    """Acknowledged by the broker."""
    refused: int = 0
    unacknowledged: int = 0
    connected: int = 0
    connect_failed: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    """The first ten problems, as examples (the counts above say how many)."""

    def error(self, why: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(why)


class _Session(asyncio.Protocol):
    """One device's connection: CONNECT, then QoS 1 PUBLISHes; PUBACKs settle ``inflight``."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.inflight: set[int] = set()
        self.drained = asyncio.Event()
        self.drained.set()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            packets = read_packets(self.buffer)
        except ValueError as exc:
            self._fail(str(exc))
            return
        for kind, body in packets:
            if kind == PUBACK:
                packet_id = (body[0] << 8) | body[1]
                if packet_id in self.inflight:
                    self.inflight.discard(packet_id)
                    if len(body) > 2 and body[2] >= 0x80:
                        self.counts.refused += 1
                    else:
                        self.counts.sent += 1
                    if not self.inflight:
                        self.drained.set()
            elif kind == CONNACK and not self.connack.done():
                self.connack.set_result(body[1] if len(body) > 1 else 0x80)
            elif kind == DISCONNECT:
                self._fail(f"broker disconnected (reason {body[0] if body else 0:#x})")

    def _fail(self, why: str) -> None:
        self.counts.error(why)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connack.done():
            self.connack.set_result(0x80)
        self.drained.set()


class TelemetryLoad:
    """``devices`` (id -> password) each sending telemetry every ``interval_s`` for ``duration_s``."""

    def __init__(
        self,
        fleet: str,
        host: str,
        port: int,
        devices: dict[str, str | None],
        *,
        interval_s: float,
        duration_s: float,
        seq_start: int = 0,
        keepalive: int = 600,
        connect_concurrency: int = 200,
    ) -> None:
        if interval_s <= 0 or duration_s <= 0:
            raise UsageError("--telemetry-s and --duration must be > 0")
        self.fleet, self.host, self.port = fleet, host, port
        self.interval_s, self.duration_s, self.keepalive = interval_s, duration_s, keepalive
        self.counts = Counts()
        # The payloads: SimDevice.telemetry (the agent's schema and sequence numbers), not checked per message.
        self._sim = Simulator(fleet, host, port, [], behaviour=Behaviour(telemetry_s=interval_s), strict=False)
        self.devices = {d: SimDevice(self._sim, d, p, self._sim.behaviour, seq=seq_start) for d, p in devices.items()}
        self._slots = asyncio.Semaphore(connect_concurrency)
        self._sessions: dict[str, _Session] = {}

    async def _connect(self, device: SimDevice) -> _Session | None:
        loop = asyncio.get_running_loop()
        async with self._slots:
            try:
                _, session = await loop.create_connection(lambda: _Session(self.counts), self.host, self.port)
            except OSError as exc:
                self.counts.connect_failed += 1
                self.counts.error(f"{device.id}: {exc}")
                return None
            assert session.transport is not None
            username = device.id if device.password is not None else None
            session.transport.write(connect_packet(device.id, username, device.password, self.keepalive))
            reason = await asyncio.wait_for(session.connack, 60)
        if reason != 0:
            self.counts.connect_failed += 1
            self.counts.error(f"{device.id}: CONNACK reason {reason:#x}")
            return None
        self.counts.connected += 1
        return session

    async def connect(self) -> None:
        """Open every device's session (``connect_concurrency`` at a time)."""
        sessions = await asyncio.gather(*(self._connect(d) for d in self.devices.values()))
        self._sessions = {d: s for d, s in zip(self.devices, sessions, strict=True) if s is not None}

    async def _device(self, device: SimDevice, session: _Session, stop_at: float) -> None:
        topic = _string(device_topic(self.fleet, device.id, "telemetry"))
        packet_id = 0
        rng = random.Random(device.id)
        next_at = time.monotonic() + rng.uniform(0, self.interval_s)
        while True:
            now = time.monotonic()
            if next_at >= stop_at or session.lost:
                break
            if next_at > now:
                await asyncio.sleep(next_at - now)
            if session.lost or session.transport is None:
                break
            packet_id = packet_id % 65535 + 1
            while packet_id in session.inflight:  # 65,535 unacknowledged: the broker is far behind
                await asyncio.sleep(0.01)
            session.inflight.add(packet_id)
            session.drained.clear()
            session.transport.write(publish_packet(topic, packet_id, device.telemetry()))
            next_at += self.interval_s
        if session.lost:
            self.counts.dropped += 1

    async def run(self, stop: asyncio.Event | None = None) -> Counts:
        """Send for ``duration_s`` (or until ``stop``), wait up to 60 s for the last PUBACKs, disconnect."""
        stop_at = time.monotonic() + self.duration_s
        tasks = [asyncio.create_task(self._device(self.devices[d], s, stop_at)) for d, s in self._sessions.items()]
        waiter: asyncio.Future[Any] = asyncio.create_task((stop or asyncio.Event()).wait())
        sending: asyncio.Future[Any] = asyncio.gather(*tasks)
        await asyncio.wait([waiter, sending], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(asyncio.gather(*(s.drained.wait() for s in self._sessions.values())), 60)
        except TimeoutError:
            pass
        for session in self._sessions.values():
            self.counts.unacknowledged += len(session.inflight)
            if session.transport is not None and not session.lost:
                session.transport.write(bytes([DISCONNECT << 4, 0]))
                session.transport.close()
        return self.counts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edgeship.fleet.telemetry_load",
        description="Sustained QoS 1 telemetry from many device sessions (benchmarks); prints JSON lines.",
    )
    add_device_arguments(p)
    p.add_argument("--telemetry-s", type=float, default=2.0, help="each device's interval between messages")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of sending, from when all are connected")
    p.add_argument("--seq-start", type=int, default=0, help="first sequence number (above an earlier run's)")
    return p


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.broker.rpartition(":")
    devices = device_passwords(args)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < len(devices) + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, len(devices) + 1000), hard))
    load = TelemetryLoad(
        args.fleet,
        host or "127.0.0.1",
        int(port),
        devices,
        interval_s=args.telemetry_s,
        duration_s=args.duration,
        seq_start=args.seq_start,
    )
    started = time.monotonic()
    await load.connect()
    print(
        json.dumps(
            {"event": "started", "devices": load.counts.connected, "connect_s": round(time.monotonic() - started, 2)}
        ),
        flush=True,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    counts = await load.run(stop)
    print(json.dumps({"event": "stopped", **{k: v for k, v in vars(counts).items()}}), flush=True)
    if counts.connect_failed or counts.dropped or counts.refused or counts.unacknowledged:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_main(args))
    except EdgeshipError as exc:  # a bad --credentials file or option: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
