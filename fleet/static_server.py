"""A small read-only HTTP file server with byte ranges, for TUF metadata and model packages.

Devices treat the transport as untrusted (TUF verifies what they fetch), so any static
store or CDN works in production; this server is for development, tests and small
fleets. What it does:

* GET and HEAD of regular files under one root; other methods get 405.
* One byte range per request (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``): 206 with
  ``Content-Range``; 416 with ``Content-Range: bytes */<size>`` when it starts past the
  end. Multi-range, other units and malformed ranges are ignored (200, whole file), as
  RFC 9110 allows. ``If-Range`` with a different ETag also gets the whole file, so a
  resumed download never splices two versions of a file.
* ``Accept-Ranges: bytes``, ``Content-Length``, ``Last-Modified`` and a strong ``ETag``
  from the size and nanosecond mtime.
* 404 for directories (no listings), hidden names (any segment starting with ``.``:
  temporary files, the repository lock), ``..``, NUL, and symlinks resolving outside the root.
* No request logging.

Fault injection: a subclass of ``StaticFileHandler`` overrides ``open_resource`` (serve
other bytes for a path), ``write_chunk`` (cut, corrupt or delay the body) and
``chunk_size``; ``serve_directory(..., handler_class=...)`` runs it
(tests/fleet/faulty_server.py does exactly that).
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import hashlib
import io
import mimetypes
import os
import re
import stat
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


class RangeNotSatisfiable(Exception):
    """The requested range starts at or past the end of the file (HTTP 416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte positions a ``Range`` header asks for, within a file of ``size`` bytes.

    Returns None when the header is to be ignored (whole file, 200): other units,
    several ranges, syntax errors, ``last < first``. Raises ``RangeNotSatisfiable`` when
    the range starts at or past the end, or is an empty suffix (``bytes=-0``).
    """
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first_text, last_text = match.groups()
    try:
        first = int(first_text) if first_text else None
        last = int(last_text) if last_text else None
    except ValueError:  # more digits than int() accepts
        return None
    if first is None:
        if last is None:
            return None
        if last == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - last), size - 1
    if last is not None and last < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable
    return first, size - 1 if last is None else min(last, size - 1)


@dataclass
class Resource:
    """An open representation to send: its bytes, size, strong ETag, mtime and content type."""

    stream: BinaryIO
    size: int
    etag: str
    mtime: float
    content_type: str

    @classmethod
    def from_bytes(cls, data: bytes, content_type: str = "application/octet-stream") -> Resource:
        """A resource serving ``data`` (ETag from its SHA-256), for fault injection and tests."""
        return cls(io.BytesIO(data), len(data), f'"b-{hashlib.sha256(data).hexdigest()[:32]}"', 0.0, content_type)

    def close(self) -> None:
        self.stream.close()


class StaticHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its root directory and does not print tracebacks for dropped clients."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler_class: type[StaticFileHandler], root: str | os.PathLike[str]
    ) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"{root} is not a directory")
        super().__init__(address, handler_class)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # the client went away; nothing to report
        super().handle_error(request, client_address)


class StaticFileHandler(BaseHTTPRequestHandler):
    """Serves files under ``server.root``; the hooks ``open_resource``, ``write_chunk`` and ``chunk_size`` are for subclasses."""

    server: StaticHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "edgeship-static/1"
    chunk_size = 64 * 1024
    # Idle keep-alive connections give their thread back after this many seconds.
    timeout = 60

    # -- hooks -----------------------------------------------------------------------------

    def open_resource(self, rel_path: str) -> Resource | None:
        """Open the regular file at ``rel_path`` (already checked: relative, no hidden or ``..`` segment).

        Returns None (404) when it is missing, not a regular file, or resolves outside the root.
        """
        root = self.server.root
        real = os.path.realpath(os.path.join(root, *rel_path.split("/")))
        if os.path.commonpath([real, root]) != root:
            return None
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        stream = os.fdopen(fd, "rb")
        content_type = mimetypes.guess_type(rel_path)[0] or "application/octet-stream"
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        return Resource(stream, st.st_size, etag, st.st_mtime, content_type)

    def write_chunk(self, rel_path: str, chunk: bytes, offset: int, sent: int) -> None:
        """Send one piece of a response body: the file's bytes at ``offset``, after ``sent`` bytes of this body.

        Raise ``ConnectionError`` to drop the connection (the client sees a short body).
        """
        self.wfile.write(chunk)

    # -- HTTP ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _refuse_method(self) -> None:
        self._send_empty(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: a file server for fleets of devices would otherwise log every range request."""

    def _serve(self, *, send_body: bool) -> None:
        rel_path = url_to_relpath(self.path)
        resource = None if rel_path is None else self.open_resource(rel_path)
        if rel_path is None or resource is None:
            self._send_empty(HTTPStatus.NOT_FOUND)
            return
        try:
            self._send_resource(rel_path, resource, send_body=send_body)
        finally:
            resource.close()

    def _send_resource(self, rel_path: str, resource: Resource, *, send_body: bool) -> None:
        size = resource.size
        span: tuple[int, int] | None = None
        header = self.headers.get("Range")
        if header is not None and self._if_range_matches(resource):
            try:
                span = parse_range(header, size)
            except RangeNotSatisfiable:
                self._send_empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                return
        first, last = span if span is not None else (0, size - 1)
        length = last - first + 1
        self.send_response(HTTPStatus.PARTIAL_CONTENT if span is not None else HTTPStatus.OK)
        self.send_header("Content-Type", resource.content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", resource.etag)
        self.send_header("Last-Modified", email.utils.formatdate(resource.mtime, usegmt=True))
        if span is not None:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if not send_body or length == 0:
            return
        resource.stream.seek(first)
        sent = 0
        try:
            while sent < length:
                chunk = resource.stream.read(min(self.chunk_size, length - sent))
                if not chunk:  # the file shrank under us: the client gets a short body
                    self.close_connection = True
                    return
                self.write_chunk(rel_path, chunk, first + sent, sent)
                sent += len(chunk)
        except ConnectionError:
            self.close_connection = True

    def _if_range_matches(self, resource: Resource) -> bool:
        # Only strong ETags validate If-Range; a date (or anything else) means "send it all".
        condition = self.headers.get("If-Range")
        return condition is None or condition.strip() == resource.etag

    def _send_empty(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def url_to_relpath(url_path: str) -> str | None:
    """The relative file path a request target names, or None when it must get a 404.

    Strips the query and fragment, percent-decodes, collapses empty segments, and refuses
    NUL, backslashes, and any segment starting with ``.`` (``..``, hidden files). An
    empty path (the root directory) is refused too: there are no listings.
    """
    path = urllib.parse.urlsplit(url_path).path
    try:
        path = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "\x00" in path or "\\" in path:
        return None
    parts = [part for part in path.split("/") if part]
    if not parts or any(part.startswith(".") for part in parts):
        return None
    return "/".join(parts)


class StaticServer:
    """A running ``StaticHTTPServer`` in a daemon thread: ``url``, ``port``, ``stop()``; a context manager."""

    def __init__(self, httpd: StaticHTTPServer) -> None:
        self.httpd = httpd
        host, port = httpd.server_address[:2]
        self.host = str(host)
        self.port = int(port)
        self.url = f"http://{self.host}:{self.port}/"
        self.root = Path(httpd.root)
        self._thread = threading.Thread(target=httpd.serve_forever, name=f"static-server-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()

    def __enter__(self) -> StaticServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_directory(
    root: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    handler_class: type[StaticFileHandler] = StaticFileHandler,
) -> StaticServer:
    """Serve ``root`` read-only on ``host:port`` (port 0: a free port) from a daemon thread; returns the running server.

    Raises ``NotADirectoryError`` when ``root`` is not a directory and ``OSError`` when the
    address cannot be bound. IPv4 only.
    """
    return StaticServer(StaticHTTPServer((host, port), handler_class, root))


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeship.fleet.static_server DIR [--host H] [--port N]``: serve DIR until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m edgeship.fleet.static_server",
        description="Serve a directory read-only over HTTP with byte ranges.",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        server = serve_directory(args.directory, args.host, args.port)
    except OSError as exc:
        print(f"error: cannot serve {args.directory} on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(f"serving {server.root} at {server.url} (Ctrl-C to stop)", flush=True)
    with contextlib.suppress(KeyboardInterrupt), server:
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
