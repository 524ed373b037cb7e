"""A static file server that misbehaves on request: cut connections, flipped bytes, slow bodies, stale files.

Built on ``edgeship.fleet.static_server`` through its handler hooks, so everything else
(ranges, ETags, 404s) is the real server. Importable by any test::

    from tests.fleet.faulty_server import serve_faulty

    with serve_faulty(repo_dir) as server:
        server.cut_after(".edgepkg", 10_000)          # next response for it stops after 10,000 body bytes
        server.corrupt(".edgepkg", 123)                # next response covering file offset 123 flips that byte
        server.throttle(50_000)                        # every body at about 50 kB/s (None: full speed)
        server.serve_stale("metadata/timestamp.json", old_bytes)  # replay old metadata until cleared
        ...
        assert server.requests[-1].range == "bytes=10000-"

Path suffixes match the request's file path (``metadata/timestamp.json``,
``pkg/x/v3.edgepkg`` or the hash-prefixed name); ``times=None`` keeps a fault forever.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from edgeship.fleet.static_server import (
    Resource,
    StaticFileHandler,
    StaticHTTPServer,
    StaticServer,
)


@dataclass
class _Fault:
    suffix: str
    value: int
    remaining: int | None  # None: every time

    def matches(self, rel_path: str) -> bool:
        return rel_path.endswith(self.suffix) and (self.remaining is None or self.remaining > 0)

    def use(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it: method, request path, Range and If-Range headers, status sent."""

    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int


class Faults:
    """The faults a ``FaultyServer`` applies; thread-safe, shared by all handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cuts: list[_Fault] = []
        self.corruptions: list[_Fault] = []
        self.bytes_per_s: int | None = None
        self.stale: dict[str, bytes] = {}
        self.requests: list[RequestRecord] = []


class FaultyHandler(StaticFileHandler):
    server: FaultyHTTPServer

    @property  # type: ignore[override]
    def chunk_size(self) -> int:
        rate = self.server.faults.bytes_per_s
        # Small chunks when throttled, so the delay is spread over the body.
        return 64 * 1024 if rate is None else max(1, min(64 * 1024, rate // 20))

    def open_resource(self, rel_path: str) -> Resource | None:
        with self.server.faults.lock:
            stale = self.server.faults.stale.get(rel_path)
        if stale is not None:
            return Resource.from_bytes(stale, "application/json")
        return super().open_resource(rel_path)

    def write_chunk(self, rel_path: str, chunk: bytes, offset: int, sent: int) -> None:
        faults = self.server.faults
        cut_at: int | None = None
        with faults.lock:
            for fault in faults.corruptions:
                if fault.matches(rel_path) and offset <= fault.value < offset + len(chunk):
                    index = fault.value - offset
                    chunk = chunk[:index] + bytes([chunk[index] ^ 0xFF]) + chunk[index + 1 :]
                    fault.use()
            for fault in faults.cuts:
                if fault.matches(rel_path) and sent + len(chunk) > fault.value:
                    cut_at = fault.value - sent
                    fault.use()
                    break
            rate = faults.bytes_per_s
        if cut_at is not None:
            if cut_at > 0:
                self.wfile.write(chunk[:cut_at])
            raise ConnectionAbortedError(f"fault injected: cut {rel_path} after {sent + cut_at} body bytes")
        if rate is not None:
            time.sleep(len(chunk) / rate)
        self.wfile.write(chunk)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        record = RequestRecord(
            self.command, self.path, self.headers.get("Range"), self.headers.get("If-Range"), int(code)
        )
        with self.server.faults.lock:
            self.server.faults.requests.append(record)


class FaultyHTTPServer(StaticHTTPServer):
    def __init__(self, address: tuple[str, int], root: str | os.PathLike[str]) -> None:
        self.faults = Faults()
        super().__init__(address, FaultyHandler, root)


class FaultyServer(StaticServer):
    """A running static server whose responses can be cut, corrupted, slowed or replaced."""

    httpd: FaultyHTTPServer

    @property
    def faults(self) -> Faults:
        return self.httpd.faults

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request answered so far, oldest first (a copy)."""
        with self.faults.lock:
            return list(self.faults.requests)

    def cut_after(self, path_suffix: str, nbytes: int, *, times: int | None = 1) -> None:
        """Drop the connection after ``nbytes`` body bytes of the next ``times`` responses for a matching path."""
        with self.faults.lock:
            self.faults.cuts.append(_Fault(path_suffix, nbytes, times))

    def corrupt(self, path_suffix: str, offset: int, *, times: int | None = 1) -> None:
        """Flip (xor 0xFF) the byte at file ``offset`` in the next ``times`` responses for a matching path that cover it."""
        with self.faults.lock:
            self.faults.corruptions.append(_Fault(path_suffix, offset, times))

    def throttle(self, bytes_per_s: int | None) -> None:
        """Send every body at about ``bytes_per_s`` (sleeping per chunk); None restores full speed."""
        with self.faults.lock:
            self.faults.bytes_per_s = bytes_per_s

    def serve_stale(self, path: str, data: bytes | None) -> None:
        """Serve ``data`` for ``path`` (relative to the root, e.g. ``metadata/timestamp.json``) until cleared with None."""
        with self.faults.lock:
            if data is None:
                self.faults.stale.pop(path.lstrip("/"), None)
            else:
                self.faults.stale[path.lstrip("/")] = data

    def clear(self) -> None:
        """Remove every fault (the request log is kept)."""
        with self.faults.lock:
            self.faults.cuts.clear()
            self.faults.corruptions.clear()
            self.faults.bytes_per_s = None
            self.faults.stale.clear()

    def __enter__(self) -> FaultyServer:
        return self


def serve_faulty(root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0) -> FaultyServer:
    """Serve ``root`` like ``serve_directory``, with fault injection; stop it with ``.stop()`` or a ``with`` block."""
    return FaultyServer(FaultyHTTPServer((host, port), root))
