"""Bounds-checked reads from a FlatBuffer: ``FlatBufferReader`` and the ``FlatTable`` and ``FlatVector`` it hands out.

Nothing here knows a schema; the TFLite check (``tflite.py``) walks the model with these.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple, NoReturn

from edgeship.errors import ArtifactError
from edgeship.runtime.artifact_checks.model_file import REBUILD, Buffer

U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_VTABLE_HEAD = struct.Struct("<HH")
_INT_CHUNK = 1 << 14  # vector elements unpacked at a time: bounds the memory of an index scan
_MAX_UOFFSET = 1 << 31  # FlatBuffers are at most 2 GiB; a larger offset is damage

_What = str | tuple[object, ...]
"""What a read is about, for the error message: a string, or parts joined by spaces.

Messages are built only when a check fails: the walk visits every tensor and operator,
and formatting a label for each read would cost more than the read.
"""


def _label(what: _What) -> str:
    if isinstance(what, str):
        return what
    parts = (_label(part) if isinstance(part, tuple) else str(part) for part in what)
    return " ".join(part for part in parts if part)


class FlatBufferReader:
    """Bounds-checked, alignment-checked reads from a FlatBuffer held in ``buf``.

    Every method raises ``ArtifactError`` (``"<name> is truncated or damaged: <what> ..."``)
    instead of reading outside the buffer. Alignment is required as the FlatBuffers
    verifier requires it. Table visits and unpacked vector elements are charged against
    a budget of a quarter of the buffer size (plus a constant): a well-formed FlatBuffer
    cannot need more, since each table and element occupies four bytes of its own, so
    running out means tables alias each other and walking them would take quadratic time.
    """

    def __init__(self, buf: Buffer, name: str) -> None:
        self.buf = buf
        self.name = name
        self.size = len(buf)
        self._budget = self.size // 4 + 1024

    def fail(self, what: _What, problem: str) -> NoReturn:
        raise ArtifactError(f"{self.name} is truncated or damaged: {_label(what) or 'the model'} {problem}; {REBUILD}")

    def charge(self, units: int) -> None:
        self._budget -= units
        if self._budget < 0:
            self.fail("its tables", f"refer to the same bytes over and over (over {self.size // 4 + 1024} references)")

    def read(self, fmt: struct.Struct, pos: int, what: _What) -> int:
        """Return the little-endian integer of format ``fmt`` at ``pos`` (inside the buffer and aligned)."""
        if pos < 0 or pos + fmt.size > self.size:
            self.fail(what, f"at byte {pos} lies outside the {self.size}-byte file")
        if pos % fmt.size:
            self.fail(what, f"at byte {pos} is not {fmt.size}-byte aligned")
        value: int = fmt.unpack_from(self.buf, pos)[0]
        return value

    def follow(self, pos: int, what: _What) -> int:
        """Return the position the (non-zero, forward) ``uoffset`` stored at ``pos`` points to."""
        offset = self.read(U32, pos, (what, "offset"))
        if offset == 0 or offset >= _MAX_UOFFSET:
            self.fail(what, f"offset at byte {pos} is {offset}")
        return pos + offset

    def table(self, pos: int, what: _What) -> FlatTable:
        """Return the table at ``pos`` once it and its vtable are inside the file and consistent."""
        self.charge(1)
        vtable = pos - self.read(_I32, pos, (what, "table"))
        if vtable < 0 or vtable + 4 > self.size or vtable % 2:
            self.fail(what, f"vtable at byte {vtable} lies outside the {self.size}-byte file or is misaligned")
        vtable_size, table_size = _VTABLE_HEAD.unpack_from(self.buf, vtable)
        if vtable_size < 4 or vtable_size % 2 or vtable + vtable_size > self.size:
            self.fail(what, f"vtable at byte {vtable} has size {vtable_size}")
        if table_size < 4:
            self.fail(what, f"table at byte {pos} claims an inline size of {table_size} bytes")
        if pos + table_size > self.size:
            self.fail(what, f"table at byte {pos} ends at byte {pos + table_size} of a {self.size}-byte file")
        return FlatTable(self, pos, vtable, vtable_size, table_size, what)

    def vector(self, pos: int, elem_size: int, what: _What) -> FlatVector:
        """Return the vector whose length field is at ``pos``, once all of it is inside the file."""
        length = self.read(U32, pos, (what, "vector length"))
        end = pos + 4 + length * elem_size
        if end > self.size:
            self.fail(what, f"vector ends at byte {end} of a {self.size}-byte file")
        return FlatVector(self, pos + 4, length, elem_size, what)

    def string(self, pos: int, what: _What) -> None:
        """Check the string whose length field is at ``pos``: inside the file and NUL-terminated."""
        chars = self.vector(pos, 1, what)
        end = chars.start + chars.length
        if end >= self.size or self.buf[end] != 0:
            self.fail(what, f"string at byte {pos} is not NUL-terminated inside the file")


class FlatVector(NamedTuple):
    """A vector known to lie inside the file: ``length`` elements of ``elem_size`` bytes from ``start``."""

    reader: FlatBufferReader
    start: int
    length: int
    elem_size: int
    what: _What

    def table(self, index: int) -> FlatTable:
        """Return table ``index`` of a vector of tables."""
        what = (self.what, index)
        return self.reader.table(self.reader.follow(self.start + 4 * index, what), what)

    def tables(self) -> Iterator[FlatTable]:
        for index in range(self.length):
            yield self.table(index)

    def check_indices(self, low: int, high: int, what: _What, constant: bytearray | None = None) -> None:
        """Raise unless every element of this int32 vector is in ``[low, high)`` and, when
        ``constant`` is given, names no tensor that ``constant`` flags (non-negative elements only).
        """
        reader = self.reader
        reader.charge(self.length)
        for first in range(0, self.length, _INT_CHUNK):
            count = min(_INT_CHUNK, self.length - first)
            values = struct.unpack_from(f"<{count}i", reader.buf, self.start + 4 * first)
            if min(values) < low or max(values) >= high:
                bad = next(value for value in values if not low <= value < high)
                reader.fail(what, f"{bad} is out of range [{low}, {high})")
            if constant is not None:
                for value in values:
                    if value >= 0 and constant[value]:
                        reader.fail(what, f"{value} is a constant (its buffer holds data), which cannot be written")


class FlatTable(NamedTuple):
    """A table whose vtable was checked; each field read checks the field against the table size."""

    reader: FlatBufferReader
    pos: int
    vtable: int
    vtable_size: int
    table_size: int
    what: _What

    def field(self, index: int, size: int, name: str) -> int | None:
        """Return the position of field ``index`` (``size`` bytes, aligned), or None when absent."""
        entry = 4 + 2 * index
        if entry >= self.vtable_size:
            return None
        offset: int = _U16.unpack_from(self.reader.buf, self.vtable + entry)[0]
        if offset == 0:
            return None
        if offset < 4 or offset + size > self.table_size:
            self.reader.fail((self.what, name), f"at offset {offset} lies outside its {self.table_size}-byte table")
        pos = self.pos + offset
        if pos % size:
            self.reader.fail((self.what, name), f"at byte {pos} is not {size}-byte aligned")
        return pos

    def u32(self, index: int, name: str, default: int = 0) -> int:
        pos = self.field(index, 4, name)
        return default if pos is None else self.reader.read(U32, pos, (self.what, name))

    def u64(self, index: int, name: str, default: int = 0) -> int:
        pos = self.field(index, 8, name)
        return default if pos is None else self.reader.read(_U64, pos, (self.what, name))

    def vector(self, index: int, elem_size: int, name: str) -> FlatVector | None:
        pos = self.field(index, 4, name)
        if pos is None:
            return None
        what = (self.what, name)
        return self.reader.vector(self.reader.follow(pos, what), elem_size, what)

    def required_vector(self, index: int, elem_size: int, name: str) -> FlatVector:
        vector = self.vector(index, elem_size, name)
        if vector is None:
            self.reader.fail(self.what, f"has no {name} vector")
        return vector

    def table(self, index: int, name: str) -> FlatTable | None:
        pos = self.field(index, 4, name)
        if pos is None:
            return None
        what = (self.what, name)
        return self.reader.table(self.reader.follow(pos, what), what)

    def string(self, index: int, name: str) -> None:
        pos = self.field(index, 4, name)
        if pos is not None:
            what = (self.what, name)
            self.reader.string(self.reader.follow(pos, what), what)
