"""Bounds-checked walk over protobuf wire format: ``ProtoReader`` yields the ``ProtoField`` of a message.

Nothing here knows a schema; the ONNX and Core ML checks walk their messages with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, NoReturn

from edgeship.errors import ArtifactError
from edgeship.runtime.artifact_checks.model_file import REBUILD, Buffer

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
MAX_STRING = 4096  # external-data keys and values are short; longer ones are damage


class ProtoField(NamedTuple):
    """One field of a protobuf message: ``value`` is the varint/fixed value, or the payload length."""

    number: int
    wire_type: int
    value: int
    start: int  # first byte of the payload (of the tag, for varints)
    end: int  # first byte after the field


class ProtoReader:
    """Bounds-checked walk over protobuf wire format in ``buf``; raises ``ArtifactError`` naming ``kind``."""

    def __init__(self, buf: Buffer, name: str, kind: str) -> None:
        self.buf = buf
        self.name = name
        self.kind = kind
        self.size = len(buf)

    def fail(self, what: str) -> NoReturn:
        raise ArtifactError(
            f"{self.name} is not a well-formed {self.kind}: {what}; the file is truncated, damaged or of another format; {REBUILD}"
        )

    def varint(self, pos: int, end: int, what: str) -> tuple[int, int]:
        """Return ``(value, next position)`` of the varint at ``pos`` (at most 10 bytes, 64 bits, before ``end``)."""
        buf = self.buf
        result = 0
        for i in range(10):
            if pos + i >= end:
                self.fail(f"a varint at byte {pos} in {what} runs past its end at byte {end}")
            byte = buf[pos + i]
            result |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                break
        # The tenth byte holds only bit 63: anything more is a longer varint or an overflow.
        if byte > 1 and i == 9:
            self.fail(f"a varint at byte {pos} in {what} is longer than 10 bytes or overflows 64 bits")
        return result, pos + i + 1

    def fields(self, start: int, end: int, what: str) -> Iterator[ProtoField]:
        """Yield the fields of the message in ``buf[start:end]``; raise unless they tile it exactly."""
        pos = start
        while pos < end:
            tag, after_tag = self.varint(pos, end, what)
            number, wire_type = tag >> 3, tag & 7
            if number == 0 or tag >= 1 << 32:
                self.fail(f"field number {number} at byte {pos} in {what} is invalid")
            if wire_type == VARINT:
                value, nxt = self.varint(after_tag, end, what)
                yield ProtoField(number, wire_type, value, pos, nxt)
                pos = nxt
                continue
            if wire_type == LENGTH_DELIMITED:
                value, payload = self.varint(after_tag, end, what)
                nxt = payload + value
            elif wire_type in (FIXED64, FIXED32):
                payload = after_tag
                nxt = payload + (8 if wire_type == FIXED64 else 4)
            else:
                self.fail(f"field {number} at byte {pos} in {what} has wire type {wire_type} (a group or undefined)")
            if nxt > end:
                self.fail(f"field {number} at byte {pos} in {what} ends at byte {nxt}, past the end at byte {end}")
            if wire_type != LENGTH_DELIMITED:
                value = int.from_bytes(self.buf[payload:nxt], "little")
            yield ProtoField(number, wire_type, value, payload, nxt)
            pos = nxt

    def expect(self, field: ProtoField, wire_type: int, what: str) -> None:
        if field.wire_type != wire_type:
            self.fail(f"{what} (field {field.number}) has wire type {field.wire_type}, expected {wire_type}")

    def text(self, field: ProtoField, what: str) -> str:
        self.expect(field, LENGTH_DELIMITED, what)
        if field.value > MAX_STRING:
            self.fail(f"{what} is {field.value} bytes long")
        try:
            return bytes(self.buf[field.start : field.end]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {field.start} is not UTF-8")
