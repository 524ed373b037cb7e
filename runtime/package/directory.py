"""Verifying an unpacked package directory (what ``unpack_package`` wrote), in place."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgeship.errors import IntegrityError, PackageError, PackageFormatError, SizeLimitError, UnsafeMemberError
from edgeship.runtime.package.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edgeship.runtime.package.reader import CHUNK
from edgeship.runtime.package.signing import TrustedKeys
from edgeship.runtime.package.verify import DEFAULT_LIMITS, Limits, VerifiedManifest, check_manifest


def verify_directory(
    directory: str | os.PathLike[str],
    *,
    trusted_keys: TrustedKeys | None = None,
    check_signature: bool = True,
    last_installed_version: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedManifest:
    """Verify a package that ``unpack_package`` unpacked: signature, schema, caps, and every file's
    size and SHA-256 on disk. Files that the manifest does not list, and links, are refused.

    Raises a ``PackageError`` subclass naming the first problem found.
    """
    root = Path(directory)
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
    verified = check_manifest(
        head[0],
        head[1],
        trusted_keys=trusted_keys,
        check_signature=check_signature,
        last_installed_version=last_installed_version,
        limits=limits,
    )
    listed = {f.path for f in verified.manifest.files} | {MANIFEST_NAME, SIGNATURE_NAME}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel not in listed:
                raise IntegrityError(f"{rel} in {root} is not listed in the manifest; the directory was altered")
    for entry in verified.manifest.files:
        path = root / entry.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise IntegrityError(f"{entry.path} listed in the manifest is missing from {root}") from None
        if not os.path.isfile(path) or os.path.islink(path):
            raise UnsafeMemberError(f"{entry.path} in {root} is not a regular file")
        if st.st_size != entry.size:
            raise IntegrityError(f"{entry.path} is {st.st_size} bytes on disk but {entry.size} in the manifest")
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise PackageError(f"cannot read {entry.path} in {root}: {exc.strerror}") from None
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(
                f"{entry.path} in {root} does not match its SHA-256 in the manifest: the file was altered"
            )
    return verified
