"""Where pushed packages are kept: a small interface, and a local directory behind it.

The store is the fleet's copy of record of every package it accepted (the TUF repository
holds the copy it serves). Keys are relative POSIX paths (``digits/linux-x86_64/fp32/v3.edgepkg``);
an object store (S3, GCS) fits the same four calls, which is why nothing else in the fleet
touches the directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from edgeship.errors import NotFoundError, UsageError
from edgeship.fleet.tuf_repo import check_target_path
from edgeship.runtime.durable import fsync_dir, fsync_file


class PackageStorage(ABC):
    """A keyed store of package files. Keys are relative POSIX paths without ``..`` or hidden segments."""

    @abstractmethod
    def put(self, key: str, file: Path) -> str:
        """Store a copy of ``file`` under ``key`` (replacing what was there) and return the key.

        The copy is complete or absent, never partial. Raises ``UsageError`` for a bad key or an
        unreadable file.
        """

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open the stored file for reading; raises ``NotFoundError`` when nothing is stored under ``key``."""

    @abstractmethod
    def path(self, key: str) -> Path | None:
        """A local file path of the stored file, or None for a store without one (then use ``open``)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove what is stored under ``key``; a missing key is not an error."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether something is stored under ``key``."""


class LocalStorage(PackageStorage):
    """Packages as files under ``root`` (created if missing), written durably: temp file, fsync, rename, fsync dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        check_target_path(key)
        return self.root / key

    def put(self, key: str, file: Path) -> str:
        dest = self._file(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    source = open(file, "rb")  # noqa: SIM115 - closed by the with below
                except OSError as exc:
                    raise UsageError(f"cannot read {file}: {exc.strerror}") from None
                with source:
                    shutil.copyfileobj(source, out, 1 << 20)
                os.fchmod(out.fileno(), 0o644)
                out.flush()
                fsync_file(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(dest.parent)
        return key

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._file(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"no package is stored under {key!r}") from None

    def path(self, key: str) -> Path | None:
        return self._file(key)

    def delete(self, key: str) -> None:
        target = self._file(key)
        try:
            target.unlink()
        except FileNotFoundError:
            return
        fsync_dir(target.parent)

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"


__all__ = ["LocalStorage", "PackageStorage"]
