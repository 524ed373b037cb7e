"""Resumable package downloads over HTTP(S): Range requests, a bandwidth cap, a hard length limit.

The file grows in ``<name>.part`` beside its destination. A restart (or a new attempt)
continues from the bytes already on disk with ``Range: bytes=N-``; a server that ignores
the Range header (200 instead of 206) makes the download start over. Never more than the
expected length (from the fleet's signed TUF metadata) is written, so a hostile or broken
server cannot fill the disk. The complete file is fsynced and renamed to its destination;
whether its bytes are the right ones is decided afterwards, by the TUF hashes.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edgeship.errors import DownloadError, UpdateError
from edgeship.runtime.durable import fsync_dir

CHUNK = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

Progress = Callable[[int, int], None]


class DownloadInterrupted(UpdateError):
    """The download was stopped on purpose (agent stopping, deployment cancelled); it resumes later."""


def download(
    url: str,
    dest: Path,
    *,
    length: int,
    timeout: float = 30.0,
    bandwidth_bytes_s: float | None = None,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    user_agent: str = "edgeship-agent",
) -> Path:
    """Download ``url`` into ``dest`` (``length`` bytes exactly), resuming ``dest.part`` if present.

    Raises ``DownloadError`` for network errors, HTTP errors and a response of the wrong
    length, ``DownloadInterrupted`` when ``stop`` is set. Returns ``dest``.
    """
    if dest.exists() and dest.stat().st_size == length:
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > length:
        part.unlink()
        have = 0
    if have < length:
        have = _fetch(url, part, have, length, timeout, bandwidth_bytes_s, stop, progress, user_agent)
    if have != length:
        raise DownloadError(f"download of {url} ended at {have} of {length} bytes; it resumes on the next attempt")
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _fetch(
    url: str,
    part: Path,
    have: int,
    length: int,
    timeout: float,
    bandwidth: float | None,
    stop: threading.Event | None,
    progress: Progress | None,
    user_agent: str,
) -> int:
    headers = {"User-Agent": user_agent}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Our partial file is at least as long as the server's: start over.
            part.unlink(missing_ok=True)
            return _fetch(url, part, 0, length, timeout, bandwidth, stop, progress, user_agent)
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url}: {reason}") from None
    with response:
        status = response.status
        mode = "ab"
        if have and status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is None or int(match.group(1)) != have:
                raise DownloadError(f"{url} answered a Range request with a wrong Content-Range; retry later")
        elif status == 200:
            have, mode = 0, "wb"
        else:
            raise DownloadError(f"download of {url} failed: unexpected HTTP {status}")
        started, sent_since = time.monotonic(), 0
        try:
            with open(part, mode) as out:
                while have < length:
                    if stop is not None and stop.is_set():
                        raise DownloadInterrupted(f"download of {url} interrupted at {have} of {length} bytes")
                    chunk = response.read(min(CHUNK, length - have))
                    if not chunk:
                        break
                    out.write(chunk)
                    have += len(chunk)
                    sent_since += len(chunk)
                    if progress is not None:
                        progress(have, length)
                    if bandwidth:
                        ahead = sent_since / bandwidth - (time.monotonic() - started)
                        if ahead > 0:
                            if stop is not None:
                                stop.wait(ahead)
                            else:
                                time.sleep(ahead)
                if have == length and response.read(1):
                    raise DownloadError(
                        f"{url} sends more than the {length} bytes the fleet's metadata lists; refusing the rest"
                    )
        except (OSError, urllib.error.URLError) as exc:
            if isinstance(exc, OSError) and exc.errno == 28:
                raise DownloadError(f"disk full while downloading {url} into {part.parent}; free some space") from None
            raise DownloadError(
                f"download of {url} broke off at {have} of {length} bytes ({exc}); it resumes"
            ) from None
    return have
