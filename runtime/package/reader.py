"""Reading model packages: verify before trusting, stream, and unpack without surprises.

The package is an uncompressed tar. ``manifest.json`` and ``manifest.sig`` come first,
so the manifest is verified (``verify.PackageTrust``) before any other member is read.
Every other member must then be a regular file that the manifest lists, with the listed
size and SHA-256 (``verify.MemberLedger`` decides); anything else is refused with a
``PackageError`` subclass. This module only reads tar headers and bytes and writes files.

Python's ``tarfile`` is used only to parse headers; this module never calls its
``extract*`` methods (their safety filters need Python 3.12, devices run 3.10).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from edgeship.errors import (
    PackageError,
    PackageFormatError,
    SizeLimitError,
    UnpackError,
    UnsafeMemberError,
)
from edgeship.runtime.durable import fsync_dir, fsync_file
from edgeship.runtime.package.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry
from edgeship.runtime.package.signing import TrustedKeys
from edgeship.runtime.package.verify import DEFAULT_LIMITS, Limits, MemberLedger, PackageTrust, VerifiedManifest

__all__ = ["CHUNK", "Progress", "fsync_dir", "read_manifest", "unpack_package", "verify_package"]

CHUNK = 1 << 20
Progress = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while members stream."""

# What tarfile raises on malformed input, besides its own TarError.
# OSError too: on Python 3.10 tarfile seeks to offset -1 on an archive of only zero blocks.
_PARSE_ERRORS = (tarfile.TarError, EOFError, ValueError, UnicodeError, OverflowError, IndexError, OSError)


def read_manifest(
    path: str | os.PathLike[str],
    *,
    trusted_keys: TrustedKeys | None = None,
    check_signature: bool = True,
    last_installed_version: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedManifest:
    """Read and verify only the manifest of a package (fast: member data is not read or hashed).

    Raises a ``PackageError`` subclass when the file is not a package or the manifest is not trusted.
    """
    trust = PackageTrust(
        trusted_keys, check_signature=check_signature, last_installed_version=last_installed_version, limits=limits
    )
    with _open_tar(path) as tar:
        return _read_head(tar, path, trust)


def verify_package(
    path: str | os.PathLike[str],
    *,
    trusted_keys: TrustedKeys | None = None,
    check_signature: bool = True,
    last_installed_version: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
) -> VerifiedManifest:
    """Verify a whole package (signature, schema, caps, every member's size and hash) without writing anything.

    Raises a ``PackageError`` subclass naming the first problem found.
    """
    trust = PackageTrust(
        trusted_keys, check_signature=check_signature, last_installed_version=last_installed_version, limits=limits
    )
    with _open_tar(path) as tar:
        verified = _read_head(tar, path, trust)
        for _entry, chunks in _members(tar, verified, trust.members(verified), progress):
            for _ in chunks:
                pass
    return verified


def unpack_package(
    path: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    trusted_keys: TrustedKeys | None = None,
    check_signature: bool = True,
    last_installed_version: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
    durable: bool = True,
    manifest_digest: str | None = None,
) -> VerifiedManifest:
    """Verify a package and unpack it into ``dest``, all or nothing.

    ``dest`` must not exist (or be an empty directory). Files are written into a hidden
    staging directory beside ``dest`` (``.<dest name>.partial-*``) and renamed into place
    only after every member verified; on any error the staging directory is removed and
    ``dest`` is left as it was. ``manifest.json`` and ``manifest.sig`` are written too, so
    the directory can be verified again later. With ``durable`` (the default) files and
    directories are fsynced before the rename, so a power cut leaves either the whole
    package or no ``dest`` at all (a staging directory left by the cut is removed by the
    next unpack to the same ``dest``). ``manifest_digest`` refuses (``IntegrityError``) a
    package whose manifest is not the one with that ``VerifiedManifest.digest``. Raises a
    ``PackageError`` subclass (``UnpackError`` for destination problems such as a full disk).
    """
    dest_path = Path(dest)
    _check_destination(dest_path)
    trust = PackageTrust(
        trusted_keys,
        check_signature=check_signature,
        last_installed_version=last_installed_version,
        limits=limits,
        manifest_digest=manifest_digest,
    )
    with _open_tar(path) as tar:
        verified = _read_head(tar, path, trust)
        manifest = verified.manifest
        _check_free_space(dest_path.parent, manifest.total_size)
        _remove_stale_partials(dest_path)
        try:
            staging = Path(tempfile.mkdtemp(prefix=_partial_prefix(dest_path), dir=dest_path.parent))
            staging.chmod(0o755)  # mkdtemp makes it 0700; the model may be read by another user
        except OSError as exc:
            raise UnpackError(f"cannot create a directory in {dest_path.parent}: {exc.strerror}") from None
        try:
            _write_file(staging / MANIFEST_NAME, [verified.raw], durable)
            _write_file(staging / SIGNATURE_NAME, [verified.signature], durable)
            for entry, chunks in _members(tar, verified, trust.members(verified), progress):
                target = staging / entry.path
                _make_dirs(target.parent, staging)
                _write_file(target, chunks, durable)
            if durable:
                _fsync_tree_dirs(staging)
            try:
                os.rename(staging, dest_path)
            except OSError as exc:
                raise UnpackError(f"cannot move the unpacked package to {dest_path}: {exc.strerror}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if durable:
            try:
                fsync_dir(dest_path.parent)
            except OSError as exc:
                # The rename may not survive a power cut: undo it rather than report a half-durable install.
                shutil.rmtree(dest_path, ignore_errors=True)
                raise _unpack_error(exc, dest_path.parent) from None
    return verified


class _BoundedReads(io.RawIOBase):
    """A file wrapper that refuses any single read larger than ``cap``.

    tarfile reads a pax extended header or a GNU long name in one ``read()`` of the size
    its header claims, before edgeship sees the member. Member data is read in chunks of
    at most ``CHUNK`` bytes, so a larger read can only be hostile metadata.
    """

    def __init__(self, raw: BinaryIO, cap: int) -> None:
        super().__init__()
        self._raw, self._cap = raw, cap

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self._cap:
            raise PackageFormatError(
                f"a tar header asks to read {size} bytes of metadata, over the {self._cap}-byte cap"
            )
        return self._raw.read(size)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


@contextmanager
def _open_tar(path: str | os.PathLike[str]) -> Iterator[tarfile.TarFile]:
    try:
        fileobj: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError:
        raise PackageError(f"package {path} does not exist") from None
    except IsADirectoryError:
        raise PackageFormatError(f"{path} is a directory, not a package file") from None
    except OSError as exc:
        raise PackageError(f"cannot read package {path}: {exc.strerror}") from None
    try:
        try:
            bounded = _BoundedReads(fileobj, max(CHUNK, DEFAULT_LIMITS.max_manifest_bytes))
            tar = tarfile.open(fileobj=bounded, mode="r:")  # noqa: SIM115 - the with below closes it
        except _PARSE_ERRORS:
            raise PackageFormatError(
                f"{path} is not an edgeship package (not an uncompressed tar archive, or empty/truncated)"
            ) from None
        with tar:
            yield tar
    finally:
        fileobj.close()


def _next(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except _PARSE_ERRORS as exc:
        raise PackageFormatError(f"package archive is damaged or truncated ({exc})") from None


def _read_small(tar: tarfile.TarFile, info: tarfile.TarInfo, cap: int) -> bytes:
    if info.size > cap:
        raise SizeLimitError(f"{info.name} is {info.size} bytes, over the {cap}-byte cap")
    try:
        f = tar.extractfile(info)
        data = f.read() if f is not None else b""
    except _PARSE_ERRORS as exc:
        raise PackageFormatError(f"package is truncated inside {info.name} ({exc})") from None
    if len(data) != info.size:
        raise PackageFormatError(f"package is truncated inside {info.name}")
    return data


def _read_head(tar: tarfile.TarFile, path: str | os.PathLike[str], trust: PackageTrust) -> VerifiedManifest:
    head: list[bytes] = []
    limits = trust.limits
    for expected, cap in ((MANIFEST_NAME, limits.max_manifest_bytes), (SIGNATURE_NAME, limits.max_signature_bytes)):
        try:
            info = _next(tar)
        except PackageFormatError as exc:
            raise PackageFormatError(f"{path} is not an edgeship package: {exc}") from None
        if info is None or info.name != expected:
            found = "the end of the archive" if info is None else repr(info.name)
            raise PackageFormatError(
                f"{path} is not an edgeship package: expected {expected} as member {len(head) + 1}, found {found}"
            )
        _check_member_type(info)
        head.append(_read_small(tar, info, cap))
    return trust.manifest(head[0], head[1])


def _check_member_type(info: tarfile.TarInfo) -> None:
    kind = None
    if info.issym():
        kind = f"a symbolic link (to {info.linkname!r})"
    elif info.islnk():
        kind = f"a hard link (to {info.linkname!r})"
    elif info.ischr() or info.isblk():
        kind = "a device node"
    elif info.isfifo():
        kind = "a FIFO"
    elif info.isdir():
        kind = "a directory entry"
    elif not info.isreg() or info.issparse():
        kind = "not a regular file"
    if kind is not None:
        raise UnsafeMemberError(f"member {info.name!r} is {kind}; packages may hold only regular files")


def _members(
    tar: tarfile.TarFile, verified: VerifiedManifest, ledger: MemberLedger, progress: Progress | None
) -> Iterator[tuple[FileEntry, Iterator[bytes]]]:
    """Yield each remaining member with an iterator over its verified chunks.

    The ledger decides: each header is admitted before its data is read, and the chunk
    iterator confirms the hash after the last chunk (raising ``IntegrityError`` if it
    differs), so a consumer that writes chunks must treat its output as unverified until
    the iterator is exhausted (``unpack_package`` writes into a staging directory for this
    reason). After the last member, ``finish`` refuses a package with a missing member.
    """
    total = verified.manifest.total_size
    done = 0
    while True:
        info = _next(tar)
        if info is None:
            break
        _check_member_type(info)
        entry = ledger.admit(info.name, info.size)
        chunks = _verified_chunks(tar, info, entry, ledger)
        if progress is None:
            yield entry, chunks
        else:
            start = done

            def reporting(chunks: Iterator[bytes] = chunks, start: int = start) -> Iterator[bytes]:
                got = 0
                for chunk in chunks:
                    got += len(chunk)
                    progress(start + got, total)
                    yield chunk

            yield entry, reporting()
        done += entry.size
    ledger.finish()


def _verified_chunks(
    tar: tarfile.TarFile, info: tarfile.TarInfo, entry: FileEntry, ledger: MemberLedger
) -> Iterator[bytes]:
    digest = hashlib.sha256()
    remaining = entry.size
    try:
        f = tar.extractfile(info)
        if f is None:
            raise PackageFormatError(f"member {info.name!r} has no data")
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise PackageFormatError(f"package is truncated inside member {info.name!r}")
            remaining -= len(chunk)
            digest.update(chunk)
            yield chunk
    except _PARSE_ERRORS as exc:
        raise PackageFormatError(f"package is truncated or damaged inside member {info.name!r} ({exc})") from None
    ledger.confirm(entry.path, digest.hexdigest())


def _check_destination(dest: Path) -> None:
    if dest.is_symlink():
        raise UnpackError(f"destination {dest} is a symbolic link; give a real directory path")
    if dest.exists():
        if not dest.is_dir():
            raise UnpackError(f"destination {dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise UnpackError(f"destination {dest} is not empty; give a new or empty directory")
    if not dest.parent.is_dir():
        raise UnpackError(f"the parent of {dest} does not exist; create it first")


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}.partial-"


def _remove_stale_partials(dest: Path) -> None:
    """Remove staging directories a crash or power cut left beside ``dest`` (never anything else)."""
    prefix = _partial_prefix(dest)
    try:
        stale = [p for p in dest.parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def _check_free_space(directory: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < needed:
        raise UnpackError(
            f"not enough free space in {directory}: the package needs {needed // (1 << 20) + 1} MiB, "
            f"{free // (1 << 20)} MiB are free; free some space and retry"
        )


def _make_dirs(directory: Path, root: Path) -> None:
    # Paths were validated (no '..', no absolute paths) and only this function creates
    # directories inside the fresh staging root, so no component can be a symlink.
    rel = directory.relative_to(root)
    current = root
    for part in rel.parts:
        current = current / part
        try:
            current.mkdir(mode=0o755)
        except FileExistsError:
            if not current.is_dir() or current.is_symlink():
                raise UnsafeMemberError(f"{current.relative_to(root)} is both a file and a directory") from None
        except OSError as exc:
            raise _unpack_error(exc, current) from None


def _write_file(target: Path, chunks: Iterator[bytes] | list[bytes], durable: bool) -> None:
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        raise UnsafeMemberError(f"{target.name} would overwrite another member") from None
    except OSError as exc:
        raise _unpack_error(exc, target) from None
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if durable:
                fsync_file(f.fileno())
    except OSError as exc:  # also a delayed ENOSPC or EIO reported by close()
        raise _unpack_error(exc, target) from None


def _unpack_error(exc: OSError, where: Path) -> UnpackError:
    if exc.errno == 28:  # ENOSPC
        return UnpackError(f"disk full while writing {where}; free some space and retry (nothing was installed)")
    return UnpackError(f"cannot write {where}: {exc.strerror or exc}")


def _fsync_tree_dirs(root: Path) -> None:
    try:
        for dirpath, _dirnames, _filenames in os.walk(root):
            fsync_dir(dirpath)
    except OSError as exc:
        raise _unpack_error(exc, root) from None
