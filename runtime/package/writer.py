"""Writing model packages: hash the contents, sign the manifest, write a deterministic tar atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeship.errors import UsageError
from edgeship.runtime.package.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest
from edgeship.runtime.package.reader import CHUNK, fsync_dir, verify_package
from edgeship.runtime.package.signing import TrustedKeys, sign_manifest

Contents = Mapping[str, "bytes | Path"]
"""Package members by path: the bytes themselves, or a path to a regular file to copy."""


def collect_directory(directory: Path, prefix: str) -> dict[str, Path]:
    """Map every regular file under ``directory`` to ``<prefix>/<relative path>``.

    For artifacts that are directories (``.mlpackage``). Raises ``UsageError`` on
    symlinks or special files, which a package cannot hold.
    """
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    out: dict[str, Path] = {}
    for root, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if (Path(root) / d).is_symlink()]:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                raise UsageError(f"{path} is a symbolic link or special file; a package holds only regular files")
            out[f"{prefix}/{path.relative_to(directory).as_posix()}"] = path
    if not out:
        raise UsageError(f"{directory} holds no files")
    return out


def write_package(
    out_path: str | os.PathLike[str],
    draft: Manifest,
    contents: Contents,
    signing_keys: Sequence[Ed25519PrivateKey],
) -> Manifest:
    """Write a signed package to ``out_path`` and return its final manifest.

    ``draft`` supplies every manifest field except ``files``, which is computed from
    ``contents``. The tar is written to a temporary file beside ``out_path``, read back
    and verified with the signing keys, then renamed over ``out_path``, so a failure
    never leaves a partial package. Raises ``ManifestError`` when the draft is invalid,
    ``UsageError`` for unreadable contents or an unwritable destination.
    """
    files = tuple(_file_entry(path, data) for path, data in sorted(contents.items()))
    manifest = dataclasses.replace(draft, files=files)
    manifest_bytes = manifest.to_bytes()  # validates against the schema
    signature = sign_manifest(manifest_bytes, signing_keys)

    out = Path(out_path)
    if not out.parent.is_dir():
        raise UsageError(f"output directory {out.parent} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise UsageError(f"cannot write to {out.parent}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST_NAME, manifest_bytes)
            _add(tar, SIGNATURE_NAME, signature)
            for entry in files:
                _add(tar, entry.path, contents[entry.path])
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        verify_package(tmp, trusted_keys=TrustedKeys.of(k.public_key() for k in signing_keys))
        tmp.chmod(0o644)  # mkstemp makes it 0600; packages are published, not secret
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as exc:
        raise UsageError(f"cannot write package {out}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def _file_entry(path: str, data: bytes | Path) -> FileEntry:
    if isinstance(data, bytes):
        return FileEntry(path, len(data), hashlib.sha256(data).hexdigest())
    digest = hashlib.sha256()
    size = 0
    try:
        with open(data, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise UsageError(f"cannot read {data} for package member {path!r}: {exc.strerror}") from None
    return FileEntry(path, size, digest.hexdigest())


def _add(tar: tarfile.TarFile, name: str, data: bytes | Path) -> None:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.mtime = 0  # deterministic: the same inputs give the same bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if isinstance(data, bytes):
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.size = data.stat().st_size
        with open(data, "rb") as f:
            tar.addfile(info, f)
