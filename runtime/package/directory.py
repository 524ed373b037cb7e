"""Verifying an unpacked package directory (what ``unpack_package`` wrote), in place.

This module only reads the directory; what is trusted is decided by ``verify.PackageTrust``
and its ``MemberLedger``, exactly as for a package archive.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from edgeship.errors import PackageError, PackageFormatError, SizeLimitError, UnsafeMemberError
from edgeship.runtime.package.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edgeship.runtime.package.reader import CHUNK
from edgeship.runtime.package.signing import TrustedKeys
from edgeship.runtime.package.verify import DEFAULT_LIMITS, Limits, MemberLedger, PackageTrust, VerifiedManifest

_HEAD = frozenset({MANIFEST_NAME, SIGNATURE_NAME})


def verify_directory(
    directory: str | os.PathLike[str],
    *,
    trusted_keys: TrustedKeys | None = None,
    check_signature: bool = True,
    last_installed_version: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    manifest_digest: str | None = None,
    rehash: bool = False,
) -> VerifiedManifest:
    """Verify a package that ``unpack_package`` unpacked: signature, schema, caps, and every file's
    size and SHA-256 on disk. Files that the manifest does not list, and links, are refused.

    With ``manifest_digest`` (``VerifiedManifest.digest`` recorded when the slot was
    installed) the directory is opened cheaply: ``manifest.json`` must hash to that digest,
    the signature, schema and caps are checked, and every listed file must exist as a
    regular file of its listed size with nothing unlisted beside it, but file contents are
    not hashed (``rehash=True`` hashes them too). Without it, everything is hashed.

    Raises a ``PackageError`` subclass naming the first problem found (``IntegrityError``
    when the manifest is not the pinned one), ``UsageError`` for a malformed digest.
    """
    root = Path(directory)
    trust = PackageTrust(
        trusted_keys,
        check_signature=check_signature,
        last_installed_version=last_installed_version,
        limits=limits,
        manifest_digest=manifest_digest,
    )
    if not root.is_dir():
        raise PackageError(f"{root} is not a directory")
    head = []
    for name, cap in ((MANIFEST_NAME, limits.max_manifest_bytes), (SIGNATURE_NAME, limits.max_signature_bytes)):
        path = root / name
        if path.is_symlink() or not path.is_file():
            raise PackageFormatError(f"{root} is not an unpacked edgeship package: {name} is missing")
        try:
            if path.stat().st_size > cap:
                raise SizeLimitError(f"{path} is over the {cap}-byte cap")
            head.append(path.read_bytes())
        except OSError as exc:
            raise PackageError(f"cannot read {path}: {exc.strerror}") from None
    verified = trust.manifest(head[0], head[1])
    hashing = manifest_digest is None or rehash
    ledger = trust.members(verified, directory=str(root), sizes_only=not hashing)
    admitted = _admit_tree(root, ledger)
    if hashing:
        for rel in admitted:
            ledger.confirm(rel, _sha256(root, rel))
    ledger.finish()
    return verified


def _admit_tree(root: Path, ledger: MemberLedger) -> list[str]:
    """Admit every file under ``root`` (but the manifest and its signature) to ``ledger``; return their paths.

    Raises ``UnsafeMemberError`` for a listed path that is not a regular file (a link, a
    FIFO, a directory), and whatever the ledger raises (unlisted, wrong size).
    """
    admitted = []
    for dirpath, dirnames, filenames in os.walk(root):
        # os.walk lists links to directories among dirnames and does not follow them; a real
        # directory matters only where the manifest lists a file of that name.
        linked_or_listed = [
            d
            for d in dirnames
            if os.path.islink(os.path.join(dirpath, d)) or ledger.lists(Path(dirpath, d).relative_to(root).as_posix())
        ]
        for name in sorted(filenames + linked_or_listed):
            full = os.path.join(dirpath, name)
            rel = Path(full).relative_to(root).as_posix()
            if rel in _HEAD:
                continue
            try:
                st = os.lstat(full)
            except OSError as exc:
                raise PackageError(f"cannot read {rel} in {root}: {exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                ledger.lookup(rel)  # an unlisted one is "not listed", as any other stray file
                raise UnsafeMemberError(f"{rel} in {root} is not a regular file")
            ledger.admit(rel, st.st_size)
            admitted.append(rel)
    return admitted


def _sha256(root: Path, rel: str) -> str:
    digest = hashlib.sha256()
    try:
        # O_NOFOLLOW: a file swapped for a link after the walk is refused, not followed.
        fd = os.open(root / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise PackageError(f"cannot read {rel} in {root}: {exc.strerror}") from None
    return digest.hexdigest()
