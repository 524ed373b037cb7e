"""The static file server: ranges, HEAD, 416, refusal of anything outside the root, resumable downloads."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeship.fleet.static_server import (
    RangeNotSatisfiable,
    StaticServer,
    parse_range,
    serve_directory,
    url_to_relpath,
)
from tests.fleet.faulty_server import FaultyServer, serve_faulty

pytestmark = pytest.mark.py310

DATA = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes, every offset distinguishable


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "pkgs").mkdir(parents=True)
    (root / "pkgs" / "model.edgepkg").write_bytes(DATA)
    (root / "metadata").mkdir()
    (root / "metadata" / "timestamp.json").write_bytes(b'{"signed": {}}')
    (root / "empty.bin").write_bytes(b"")
    (root / ".lock").write_bytes(b"")
    (tmp_path / "secret.txt").write_bytes(b"outside the root")
    return root


@pytest.fixture
def server(site: Path) -> Iterator[StaticServer]:
    with serve_directory(site) as running:
        yield running


@pytest.fixture
def faulty(site: Path) -> Iterator[FaultyServer]:
    with serve_faulty(site) as running:
        yield running


def request(
    server: StaticServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


# -- parse_range: the pure part -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=10-", 100, (10, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),  # a suffix longer than the file is the whole file
        ("bytes=90-1000", 100, (90, 99)),  # the end is clamped
        ("bytes=99-99", 100, (99, 99)),
        (" bytes = 5 - 6 ", 100, (5, 6)),
        ("bytes=0-1,5-6", 100, None),  # several ranges: ignored, whole file
        ("items=0-1", 100, None),
        ("bytes=9-3", 100, None),  # last < first is invalid: ignored
        ("bytes=-", 100, None),
        ("bytes=abc", 100, None),
        ("bytes=" + "9" * 5000 + "-", 100, None),  # more digits than int() takes
    ],
)
def test_parse_range_forms(header: str, size: int, expected: tuple[int, int] | None):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=-5", 0)],
)
def test_parse_range_unsatisfiable(header: str, size: int):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


@given(size=st.integers(1, 10_000), first=st.integers(0, 20_000), last=st.integers(0, 20_000) | st.none())
def test_parse_range_agrees_with_slicing(size: int, first: int, last: int | None):
    header = f"bytes={first}-{'' if last is None else last}"
    data = bytes(i % 251 for i in range(size))
    if last is not None and last < first:  # an invalid range: the header is ignored
        assert parse_range(header, size) is None
        return
    if first >= size:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, size)
        return
    span = parse_range(header, size)
    assert span is not None
    stop = size if last is None else last + 1
    assert data[span[0] : span[1] + 1] == data[first:stop]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/pkgs/model.edgepkg", "pkgs/model.edgepkg"),
        ("/pkgs//model.edgepkg?x=1#frag", "pkgs/model.edgepkg"),
        ("/pkgs/%6dodel.edgepkg", "pkgs/model.edgepkg"),
        ("http://example.com/pkgs/model.edgepkg", "pkgs/model.edgepkg"),
        ("/", None),
        ("/../secret.txt", None),
        ("/pkgs/%2e%2e/%2e%2e/secret.txt", None),
        ("/pkgs/..%2f..%2fsecret.txt", None),
        ("/.lock", None),
        ("/pkgs/a%00b", None),
        ("/pkgs\\..\\secret.txt", None),
        ("/%ff", None),
    ],
)
def test_url_to_relpath(target: str, expected: str | None):
    assert url_to_relpath(target) == expected


# -- the server ---------------------------------------------------------------------------------


def test_full_get_sends_the_file_with_length_etag_and_accept_ranges(server: StaticServer):
    status, headers, body = request(server, "/pkgs/model.edgepkg")
    assert status == 200
    assert body == DATA
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Accept-Ranges"] == "bytes"
    assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+"', headers["ETag"]), "a strong ETag (no W/ prefix)"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Last-Modified"].endswith("GMT")
    assert request(server, "/metadata/timestamp.json")[1]["Content-Type"] == "application/json"


def test_head_sends_the_headers_of_get_without_a_body(server: StaticServer):
    _, get_headers, _ = request(server, "/pkgs/model.edgepkg")
    status, headers, body = request(server, "/pkgs/model.edgepkg", method="HEAD")
    assert status == 200 and body == b""
    for name in ("Content-Length", "ETag", "Accept-Ranges", "Content-Type"):
        assert headers[name] == get_headers[name]
    status, headers, body = request(server, "/pkgs/model.edgepkg", {"Range": "bytes=10-19"}, method="HEAD")
    assert (status, headers["Content-Length"], headers["Content-Range"], body) == (
        206,
        "10",
        f"bytes 10-19/{len(DATA)}",
        b"",
    )


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=100-199", 100, 199),
        ("bytes=10000-", 10000, len(DATA) - 1),
        ("bytes=-4", len(DATA) - 4, len(DATA) - 1),
        ("bytes=10240-99999", 10240, len(DATA) - 1),
    ],
)
def test_each_range_form_gets_206_with_content_range(server: StaticServer, header: str, first: int, last: int):
    status, headers, body = request(server, "/pkgs/model.edgepkg", {"Range": header})
    assert status == 206
    assert body == DATA[first : last + 1]
    assert headers["Content-Range"] == f"bytes {first}-{last}/{len(DATA)}"
    assert headers["Content-Length"] == str(last - first + 1)


@pytest.mark.parametrize("header", [f"bytes={len(DATA)}-", f"bytes={len(DATA) + 5}-{len(DATA) + 10}", "bytes=-0"])
def test_unsatisfiable_range_gets_416_with_the_size(server: StaticServer, header: str):
    status, headers, body = request(server, "/pkgs/model.edgepkg", {"Range": header})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert body == b""


def test_empty_file_and_ignored_ranges_get_the_whole_file(server: StaticServer):
    assert request(server, "/empty.bin")[0::2] == (200, b"")
    assert request(server, "/empty.bin", {"Range": "bytes=0-"})[0] == 416
    assert request(server, "/pkgs/model.edgepkg", {"Range": "bytes=0-1,5-6"})[0::2] == (200, DATA)


def test_if_range_with_another_etag_sends_the_whole_file(server: StaticServer):
    etag = request(server, "/pkgs/model.edgepkg", method="HEAD")[1]["ETag"]
    assert request(server, "/pkgs/model.edgepkg", {"Range": "bytes=5-", "If-Range": etag})[0::2] == (206, DATA[5:])
    stale = request(server, "/pkgs/model.edgepkg", {"Range": "bytes=5-", "If-Range": '"0-0"'})
    assert stale[0::2] == (200, DATA)
    dated = request(server, "/pkgs/model.edgepkg", {"Range": "bytes=5-", "If-Range": "Sat, 01 Jan 2000 00:00:00 GMT"})
    assert dated[0] == 200


def test_etag_changes_when_the_file_changes(server: StaticServer, site: Path):
    before = request(server, "/pkgs/model.edgepkg", method="HEAD")[1]["ETag"]
    path = site / "pkgs" / "model.edgepkg"
    path.write_bytes(DATA[::-1])
    st_before = path.stat()
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns + 1_000_000))
    assert request(server, "/pkgs/model.edgepkg", method="HEAD")[1]["ETag"] != before


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/pkgs",
        "/pkgs/",
        "/missing.bin",
        "/../secret.txt",
        "/pkgs/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/pkgs/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/.lock",
        "/link-out",
        "/pkgs/link-dir-out/secret.txt",
    ],
)
def test_traversal_symlinks_out_of_the_root_directories_and_hidden_files_are_404(
    server: StaticServer, site: Path, target: str
):
    (site / "link-out").symlink_to(site.parent / "secret.txt")
    (site / "pkgs" / "link-dir-out").symlink_to(site.parent)
    status, _, body = request(server, target)
    assert status == 404
    assert b"outside" not in body


def test_symlink_inside_the_root_is_served(server: StaticServer, site: Path):
    (site / "latest.edgepkg").symlink_to(site / "pkgs" / "model.edgepkg")
    assert request(server, "/latest.edgepkg")[0::2] == (200, DATA)


def test_writes_are_refused(server: StaticServer, site: Path):
    status, headers, _ = request(server, "/pkgs/model.edgepkg", method="PUT")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert request(server, "/pkgs/model.edgepkg", method="DELETE")[0] == 405
    assert (site / "pkgs" / "model.edgepkg").read_bytes() == DATA


def test_keep_alive_serves_several_requests_on_one_connection(server: StaticServer):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        for header, expected in (("bytes=0-9", DATA[:10]), ("bytes=-3", DATA[-3:]), (None, DATA)):
            conn.request("GET", "/pkgs/model.edgepkg", headers={"Range": header} if header else {})
            assert conn.getresponse().read() == expected
        conn.request("GET", "/missing")
        missing = conn.getresponse()
        assert (missing.status, missing.read()) == (404, b"")
        conn.request("GET", "/pkgs/model.edgepkg", headers={"Range": "bytes=5-6"})
        assert conn.getresponse().read() == DATA[5:7]
    finally:
        conn.close()


def test_resuming_a_cut_download_from_the_middle_gives_identical_bytes(faulty: FaultyServer):
    faulty.cut_after("model.edgepkg", 4000)
    conn = http.client.HTTPConnection(faulty.host, faulty.port, timeout=10)
    received = bytearray()
    conn.request("GET", "/pkgs/model.edgepkg")
    response = conn.getresponse()
    assert response.status == 200
    etag = response.headers["ETag"]
    with pytest.raises(http.client.IncompleteRead) as cut:
        response.read()
    received += cut.value.partial
    conn.close()
    assert len(received) == 4000
    status, headers, rest = request(
        faulty, "/pkgs/model.edgepkg", {"Range": f"bytes={len(received)}-", "If-Range": etag}
    )
    assert status == 206
    assert headers["Content-Range"] == f"bytes 4000-{len(DATA) - 1}/{len(DATA)}"
    assert bytes(received) + rest == DATA
    assert [(r.range, r.status) for r in faulty.requests] == [(None, 200), ("bytes=4000-", 206)]


def test_fault_injection_corrupts_throttles_and_serves_stale_bytes(faulty: FaultyServer):
    faulty.corrupt("model.edgepkg", 5000)
    body = request(faulty, "/pkgs/model.edgepkg")[2]
    assert len(body) == len(DATA) and body != DATA
    assert [i for i in range(len(DATA)) if body[i] != DATA[i]] == [5000]
    assert request(faulty, "/pkgs/model.edgepkg")[2] == DATA, "times=1: the next response is clean"

    faulty.corrupt("model.edgepkg", 5000, times=None)
    assert request(faulty, "/pkgs/model.edgepkg", {"Range": "bytes=0-99"})[2] == DATA[:100], "range not covering it"
    assert request(faulty, "/pkgs/model.edgepkg", {"Range": "bytes=4990-5010"})[2] != DATA[4990:5011]
    faulty.clear()

    faulty.throttle(200_000)
    assert request(faulty, "/pkgs/model.edgepkg")[2] == DATA
    faulty.throttle(None)

    faulty.serve_stale("metadata/timestamp.json", b'{"old": true}')
    assert request(faulty, "/metadata/timestamp.json")[2] == b'{"old": true}'
    assert request(faulty, "/metadata/timestamp.json", {"Range": "bytes=1-3"})[0::2] == (206, b'"ol')
    faulty.serve_stale("metadata/timestamp.json", None)
    assert request(faulty, "/metadata/timestamp.json")[2] == b'{"signed": {}}'


def test_stop_closes_the_port(site: Path):
    running = serve_directory(site)
    port = running.port
    assert running.url == f"http://127.0.0.1:{port}/"
    running.stop()
    running.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/")


def test_module_runs_as_a_command(site: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeship.fleet.static_server", str(site), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + proc.stderr.read() if proc.stderr else line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("GET", "/pkgs/model.edgepkg", headers={"Range": "bytes=-4"})
        assert conn.getresponse().read() == b"tail"
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
