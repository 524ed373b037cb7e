"""Build hostile tar archives by hand, with manifests signed by a key the test controls."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeship.runtime.package import sign_manifest


@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # header size when it should lie about the data


@dataclass
class Crafted:
    manifest: dict[str, Any]
    members: list[Member] = field(default_factory=list)


def manifest_for(contents: dict[str, bytes], **overrides: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "schema_version": 1,
        "name": "crafted",
        "version": 1,
        "target": "linux-x86_64",
        "format": "onnx",
        "precision": "fp32",
        "artifact": {"path": sorted(contents)[0]},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
        "provenance": {"recipe": None, "source_sha256": None, "tools": {}},
        "files": [
            {"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in sorted(contents.items())
        ],
    }
    manifest.update(overrides)
    return manifest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def write_tar(
    path: Path,
    manifest: dict[str, Any] | bytes,
    members: list[Member],
    key: Ed25519PrivateKey,
    *,
    signature: bytes | None = None,
    head: bool = True,
) -> Path:
    """Write manifest.json + manifest.sig (signed with ``key``) followed by ``members``, verbatim."""
    raw = manifest if isinstance(manifest, bytes) else manifest_bytes(manifest)
    sig = signature if signature is not None else sign_manifest(raw, [key])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        all_members = ([Member("manifest.json", raw), Member("manifest.sig", sig)] if head else []) + members
        for m in all_members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.linkname = m.linkname
            info.mode = 0o644
            if m.type == tarfile.REGTYPE:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    data = buf.getvalue()
    for m in all_members:
        if m.size is not None:
            data = _patch_size(data, m.name, m.size)
    path.write_bytes(data)
    return path


def _patch_size(data: bytes, name: str, size: int) -> bytes:
    """Rewrite the size field (and checksum) of the ustar header of member ``name``."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        info = tar.getmember(name)
        offset = info.offset
        if tar.pax_headers or info.pax_headers:
            # tarfile writes a pax header block before the ustar block only when needed.
            offset = info.offset_data - 512
    header = bytearray(data[offset : offset + 512])
    if size >= 8**11:
        header[124:136] = b"\x80" + size.to_bytes(11, "big")  # GNU base-256 for big sizes
    else:
        header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:offset] + bytes(header) + data[offset + 512 :]
