"""Whether a package the fleet offers is genuine, fresh and listed: python-tuf's ngclient on the device.

The agent downloads packages itself (HTTP Range resume); this module gives it the two
TUF decisions around that download:

* ``UpdateTrust.lookup(path)`` refreshes the fleet's signed metadata (root -> timestamp ->
  snapshot -> targets, with ngclient's expiry, rollback, freeze and mix-and-match checks)
  and returns the signed length, hashes, custom data and download URL of one target.
* ``verify_file(offered, path)`` checks a downloaded file against that entry.

Every ``lookup`` builds a fresh ngclient ``Updater`` from the provisioned root and the
metadata cache in ``metadata_dir``. An ``Updater`` fixes its reference time and its
trusted set when it is created; one kept for the agent's lifetime would keep failing once
the metadata it holds expired. A fresh one per lookup means a device that was offline
past the metadata's expiry recovers on its own as soon as the fleet refreshes its
timestamp (aktualizr users report devices wedged until a reboot in that case).

python-tuf's exceptions become edgeship's (``MetadataExpiredError``, ``MetadataRollbackError``,
``TargetNotListedError``, ``TargetMismatchError``, ``DownloadError``, ``UpdateTrustError``),
each with a one-line message saying what was wrong and what the operator does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from edgeship._version import __version__
from edgeship.errors import (
    DownloadError,
    MetadataExpiredError,
    MetadataRollbackError,
    TargetMismatchError,
    TargetNotListedError,
    UpdateError,
    UpdateTrustError,
)
from edgeship.runtime.durable import fsync_dir, fsync_file


@dataclass(frozen=True)
class OfferedTarget:
    """A target as the fleet's verified targets metadata lists it.

    ``length`` and ``hashes`` (algorithm -> hex digest) are what the downloaded file must
    match; ``custom`` is the signed custom data (``{}`` when absent); ``url`` is where to
    download it: the targets base URL plus the path ngclient would use (hash-prefixed file
    name when the root says ``consistent_snapshot``).
    """

    path: str
    length: int
    hashes: dict[str, str]
    custom: dict[str, Any]
    url: str

    @property
    def edgeship(self) -> dict[str, Any]:
        """The ``edgeship`` part of the custom data (name, version, target, ..., downgrade_from), or ``{}``."""
        value = self.custom.get("edgeship", {})
        return value if isinstance(value, dict) else {}


class UpdateTrust:
    """The device's view of one fleet's TUF repository.

    ``metadata_dir`` is the device's metadata cache (created when missing; it must persist
    across restarts, since it holds the newest metadata the device trusts), ``metadata_url``
    and ``targets_url`` the repository's base URLs, ``root`` the root metadata the device was
    provisioned with. Lookups from several threads are serialised (ngclient supports one
    user of a cache directory at a time).
    """

    def __init__(self, metadata_dir: Path, metadata_url: str, targets_url: str, root: bytes) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.metadata_url = _with_slash(metadata_url)
        self.targets_url = _with_slash(targets_url)
        self._root = bytes(root)
        self._lock = threading.Lock()

    def lookup(self, target_path: str) -> OfferedTarget:
        """Refresh the fleet's metadata and return the signed entry of ``target_path``.

        Raises ``MetadataExpiredError`` (some metadata expired), ``MetadataRollbackError``
        (the server offers metadata older than what the device already trusts),
        ``TargetNotListedError``, ``DownloadError`` (network, HTTP status),
        ``UpdateTrustError`` (bad signatures, malformed metadata, a bad provisioned root) and
        ``UpdateError`` (the metadata cache cannot be written).
        """
        with self._lock, self._translated():
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            updater = self._updater()
            try:
                updater.refresh()
                info = updater.get_targetinfo(target_path)
            finally:
                _sync_cache(self.metadata_dir)
            # The root ngclient ended up trusting decides the URL form, as in Updater.download_target.
            consistent = bool(updater._trusted_set.root.consistent_snapshot)
            prefix = updater.config.prefix_targets_with_hash
        if info is None:
            raise TargetNotListedError(
                f"{target_path!r} is not listed in the fleet's signed targets metadata at {self.metadata_url}; "
                "publish it to the fleet's TUF repository before offering it to devices"
            )
        custom = info.custom
        return OfferedTarget(
            path=info.path,
            length=info.length,
            hashes=dict(info.hashes),
            custom=dict(custom) if isinstance(custom, dict) else {},
            url=self.targets_url + _served_path(info, consistent and prefix),
        )

    def _updater(self) -> Updater:
        try:
            return Updater(
                str(self.metadata_dir),
                self.metadata_url,
                target_base_url=self.targets_url,
                config=UpdaterConfig(app_user_agent=f"edgeship-agent/{__version__}"),
                bootstrap=self._root,
            )
        except tuf_errors.RepositoryError as exc:
            raise UpdateTrustError(
                f"the root metadata this device was provisioned with is not valid TUF root metadata ({exc}); "
                "re-provision the device with the fleet's root.json"
            ) from None

    @staticmethod
    def verify_file(offered: OfferedTarget, path: Path) -> None:
        """The module-level ``verify_file``, reachable from an ``UpdateTrust``."""
        verify_file(offered, path)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn python-tuf's exceptions into edgeship's, with the action for the operator."""
        url = self.metadata_url
        try:
            yield
        except tuf_errors.ExpiredMetadataError as exc:
            raise MetadataExpiredError(
                f"the fleet's update metadata has expired ({exc}); the fleet must re-sign it "
                "(TufRepository.refresh_timestamp); the device retries on its next check"
            ) from None
        except tuf_errors.BadVersionNumberError as exc:
            raise MetadataRollbackError(
                f"{url} serves update metadata older than what this device already trusts ({exc}): "
                "a replayed or stale mirror; point the device at a server with the repository's current metadata"
            ) from None
        except tuf_errors.UnsignedMetadataError as exc:
            raise UpdateTrustError(
                f"update metadata from {url} is not signed by the keys this device trusts ({exc}); "
                "publish metadata signed with the repository's keys (after a key change, publish the new root)"
            ) from None
        except tuf_errors.RepositoryError as exc:
            raise UpdateTrustError(
                f"update metadata from {url} failed verification ({exc or type(exc).__name__}); "
                "check that the server serves the TUF repository unmodified"
            ) from None
        except (tuf_errors.DownloadError, urllib3.exceptions.HTTPError, ConnectionError) as exc:
            # python-tuf 7.0.1's Urllib3Fetcher wraps errors raised while connecting, but a
            # connection dropped mid-body escapes as urllib3's ProtocolError.
            raise DownloadError(
                f"could not download update metadata from {url} ({_describe(exc)}); "
                "check the device's network and the fleet's file server"
            ) from None
        except OSError as exc:
            raise UpdateError(
                f"cannot write the update metadata cache {self.metadata_dir} ({exc.strerror or exc}); "
                "free disk space or fix its permissions"
            ) from None


def verify_file(offered: OfferedTarget, path: Path) -> None:
    """Check that the file at ``path`` has the signed length and every signed hash of ``offered``.

    Same semantics as python-tuf's ``TargetFile.verify_length_and_hashes`` (it does the
    check), streaming the file. Raises ``TargetMismatchError`` on a wrong length or hash,
    ``UpdateError`` when the file cannot be read.
    """
    info = TargetFile(offered.length, dict(offered.hashes), offered.path)
    try:
        with open(path, "rb") as stream:
            info.verify_length_and_hashes(stream)
    except tuf_errors.LengthOrHashMismatchError as exc:
        raise TargetMismatchError(
            f"{path} does not match the fleet's signed metadata for {offered.path} ({exc}); "
            "delete it and download the package again"
        ) from None
    except OSError as exc:
        raise UpdateError(
            f"cannot read the downloaded package {path} ({exc.strerror or exc}); download it again"
        ) from None


def _served_path(info: TargetFile, hash_prefixed: bool) -> str:
    """The path under the targets URL, built as ``Updater.download_target`` builds it."""
    if not hash_prefixed:
        return info.path
    dirname, sep, basename = info.path.rpartition("/")
    return f"{dirname}{sep}{next(iter(info.hashes.values()))}.{basename}"


def _describe(exc: BaseException) -> str:
    parts = [str(exc) or type(exc).__name__]
    cause = exc.__cause__
    if cause is not None and str(cause):
        parts.append(str(cause))
    return ": ".join(parts).replace("\n", " ")


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


__all__ = ["OfferedTarget", "UpdateTrust", "verify_file"]


def _sync_cache(directory: Path) -> None:
    """Make python-tuf's metadata cache durable (ngclient writes it without fsync).

    After a power cut the device must still hold the newest metadata versions it accepted,
    or a replay of older metadata would pass its next check (TUF's rollback protection
    rests on them). The cache is a few small files; this costs a few fsyncs per lookup.
    """
    for path in [directory, *(p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink())]:
        for item in path.iterdir():
            if item.is_file() and not item.is_symlink():
                with contextlib.suppress(OSError):
                    fsync_file(item)
        with contextlib.suppress(OSError):
            fsync_dir(path)
