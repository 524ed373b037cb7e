"""Durable file-system writes: what survives a power cut is either the old state or the new one.

One helper for every part of edgeship that keeps state on a device: unpacking a package
(``package/reader.py``), the TensorRT engine cache (``backends/engine_cache.py``) and the
device agent's journal. The rules it follows (ext4, XFS and F2FS with default options):

* A file's data reaches the disk only after ``fsync`` on the file; a new name (create,
  rename, unlink) only after ``fsync`` on the directory holding it.
* ``rename`` within one file system replaces the target atomically: readers and a crash
  see the old file or the new one, never a mix. So a file is written under a temporary
  name in the same directory, fsynced, renamed over the target, and the directory fsynced.
* A tree is deleted by first renaming it to a hidden sibling: a crash in the middle of
  the deletion leaves a half-deleted tree only under that hidden name, never under the
  original one, and the next ``remove_tree`` of the same path removes such leftovers.

Some file systems cannot fsync a directory (they report EINVAL or ENOTSUP); that is
ignored. Any other error (EIO, ENOSPC) is raised as ``OSError``: callers turn it into
their own error type, since only they know what was being written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from pathlib import Path

# fsync on a directory is not supported everywhere (some FUSE and network file systems).
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
_REMOVING = ".removing-"


def fsync_file(target: int | str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to disk: ``target`` is an open file descriptor or a path.

    Raises ``OSError`` when the file cannot be opened or the flush fails (EIO, ENOSPC).
    """
    if isinstance(target, int):
        os.fsync(target)
        return
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names in directory ``path`` (files created, renamed or removed there) durable.

    A file system that cannot fsync directories is ignored; a directory that cannot be
    opened raises ``OSError``, and so does a failed flush (EIO).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permission bits ``mode``.

    Writes a hidden temporary file in the same directory, fsyncs it, renames it over
    ``path`` and fsyncs the directory: after a crash ``path`` holds the old contents or
    the new, never a mix. The temporary file is removed on failure. Raises ``OSError``
    (disk full, read-only file system, missing directory).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete the directory tree (or file, or link) at ``path`` so that a crash never leaves half of it there.

    The tree is renamed to a hidden sibling (``.<name>.removing-<random>``), the parent
    directory fsynced, and only then deleted; leftovers of an earlier interrupted
    ``remove_tree`` of the same path are deleted too. A missing ``path`` is not an error.
    Links are removed, never followed. Raises ``OSError`` when the rename or the deletion fails.
    """
    target = Path(path)
    parent = target.parent
    prefix = f".{target.name}{_REMOVING}"
    doomed = parent / f"{prefix}{secrets.token_hex(4)}"
    try:
        os.rename(target, doomed)
    except FileNotFoundError:
        pass
    else:
        fsync_dir(parent)
    try:
        leftovers = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for item in leftovers:
        _delete(item)


def _delete(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path)
