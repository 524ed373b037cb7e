"""The trusted core of package verification: a pure function of bytes, keys and state.

Invariants kept here (the rest of edgeship relies on them and never re-implements them):

1. The signature is checked over the exact ``manifest.json`` bytes *before* they are
   parsed, so a parser bug cannot be reached by an unsigned manifest (unless the caller
   turns the signature check off explicitly, as ``edgeship pkg inspect`` without a key does).
2. A manifest is trusted only if it matches the schema and its paths are safe and
   do not collide (``manifest.check_manifest_json``).
3. Size caps are enforced from the signed sizes, before any member is read.
4. The package version is newer than the version the device last installed.

Nothing in this module touches files or the network. Every function names what it raises.
Freshness and expiry of what a fleet offers are the job of its TUF metadata, not of this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeship.errors import SizeLimitError, UsageError, VersionRollbackError
from edgeship.runtime.package.manifest import Manifest
from edgeship.runtime.package.signing import TrustedKeys, verify_signature

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Caps a reader enforces; every one is checked before the bytes it bounds are read."""

    max_total_bytes: int = 2 * GiB
    max_member_bytes: int = 2 * GiB
    max_members: int = 10_000
    max_manifest_bytes: int = 4 * MiB
    max_signature_bytes: int = 64 * 1024


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest that passed every check; ``signed_by`` is the key id that verified, or None if unchecked."""

    manifest: Manifest
    raw: bytes
    signature: bytes
    signed_by: str | None


def check_manifest(
    manifest_bytes: bytes,
    signature_bytes: bytes,
    *,
    trusted_keys: TrustedKeys | None,
    check_signature: bool = True,
    last_installed_version: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedManifest:
    """Decide whether a manifest can be trusted; return it parsed, or raise.

    Raises ``SignatureError``/``UntrustedKeyError`` (signature), ``ManifestError`` (schema,
    paths), ``SizeLimitError`` (caps), ``VersionRollbackError`` (not newer than
    ``last_installed_version``), ``UsageError`` (signature check asked for without keys).
    """
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise SizeLimitError(
            f"manifest.json is {len(manifest_bytes)} bytes, over the {limits.max_manifest_bytes}-byte cap"
        )
    signed_by: str | None = None
    if check_signature:
        if trusted_keys is None:
            raise UsageError(
                "no trusted public keys given; pass the publisher's key, or disable the signature check explicitly"
            )
        signed_by = verify_signature(manifest_bytes, signature_bytes, trusted_keys)
    manifest = Manifest.from_bytes(manifest_bytes)
    check_limits(manifest, limits)
    if last_installed_version is not None and manifest.version <= last_installed_version:
        raise VersionRollbackError(
            f"package {manifest.name} version {manifest.version} is not newer than the installed version "
            f"{last_installed_version}; versions only move forward (build a package with a higher version)"
        )
    return VerifiedManifest(manifest, manifest_bytes, signature_bytes, signed_by)


def check_limits(manifest: Manifest, limits: Limits) -> None:
    """Raise ``SizeLimitError`` if the manifest's member count or sizes exceed ``limits``."""
    if len(manifest.files) > limits.max_members:
        raise SizeLimitError(f"package lists {len(manifest.files)} members, over the cap of {limits.max_members}")
    for entry in manifest.files:
        if entry.size > limits.max_member_bytes:
            raise SizeLimitError(
                f"member {entry.path!r} is {_human(entry.size)}, over the per-member cap of {_human(limits.max_member_bytes)}"
            )
    total = manifest.total_size
    if total > limits.max_total_bytes:
        raise SizeLimitError(
            f"package expands to {_human(total)}, over the cap of {_human(limits.max_total_bytes)}; "
            "raise the cap only if you expect a model this large"
        )


def _human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
