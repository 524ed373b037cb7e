"""The trusted core of package verification: a pure function of bytes, keys and state.

``PackageTrust`` decides whether a manifest can be trusted and, through the ledger it
hands out per package (``MemberLedger``), whether the files that arrive for it are
exactly the files it lists. Reading an archive (``reader.py``), checking an unpacked
directory (``directory.py``) and the device agent call it; none of them re-implements a
piece of it. Invariants kept here (the rest of edgeship relies on them):

1. The signature is checked over the exact ``manifest.json`` bytes *before* they are
   parsed, so a parser bug cannot be reached by an unsigned manifest (unless the caller
   turns the signature check off explicitly, as ``edgeship pkg inspect`` without a key does).
2. A manifest is trusted only if it matches the schema and its paths are safe and
   do not collide (``manifest.check_manifest_json``).
3. Size caps are enforced from the signed sizes, before any member is read.
4. The package version is newer than the version the device last installed.
5. A manifest pinned by digest (an installed slot) is byte-identical to the one that was
   verified at install time.
6. A package is accepted only when every listed file arrived exactly once, with its
   listed size and SHA-256, and nothing else arrived. File contents go unhashed only for
   a manifest pinned by digest (the hashes were checked when that slot was installed).

Nothing in this module touches files or the network. Every method names what it raises.
Freshness and expiry of what a fleet offers are the job of its TUF metadata, not of this module.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from edgeship.errors import (
    IntegrityError,
    ManifestError,
    SizeLimitError,
    UnsafeMemberError,
    UsageError,
    VersionRollbackError,
)
from edgeship.runtime.package.manifest import FileEntry, Manifest, validate_member_path
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

    @property
    def digest(self) -> str:
        """SHA-256 (lowercase hex) of the exact ``manifest.json`` bytes: pin an installed slot with it."""
        return hashlib.sha256(self.raw).hexdigest()


def check_manifest(
    manifest_bytes: bytes,
    signature_bytes: bytes,
    *,
    trusted_keys: TrustedKeys | None,
    check_signature: bool = True,
    last_installed_version: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedManifest:
    """Decide whether a manifest can be trusted; return it parsed, or raise (``PackageTrust.manifest``).

    Raises ``SignatureError``/``UntrustedKeyError`` (signature), ``ManifestError`` (schema,
    paths), ``SizeLimitError`` (caps), ``VersionRollbackError`` (not newer than
    ``last_installed_version``), ``UsageError`` (signature check asked for without keys).
    """
    trust = PackageTrust(
        trusted_keys, check_signature=check_signature, last_installed_version=last_installed_version, limits=limits
    )
    return trust.manifest(manifest_bytes, signature_bytes)


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class PackageTrust:
    """What a device trusts, and the decisions made from it: pure, no I/O.

    Built from the trusted keys (``None`` only with ``check_signature=False``), the version
    last installed (``None``: no rollback check), the caps, and optionally the digest of
    the manifest an installed slot was verified with (``manifest_digest``). ``manifest``
    checks one manifest; ``members`` returns the ledger that checks the files arriving for it.
    """

    def __init__(
        self,
        trusted_keys: TrustedKeys | None,
        *,
        check_signature: bool = True,
        last_installed_version: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
        manifest_digest: str | None = None,
    ) -> None:
        """Raises ``UsageError`` when ``manifest_digest`` is not 64 lowercase hex digits."""
        if manifest_digest is not None and not _HEX_DIGEST.fullmatch(manifest_digest):
            raise UsageError(
                f"manifest digest {manifest_digest!r} is not a SHA-256 in lowercase hex (64 digits); "
                "pass VerifiedManifest.digest as recorded at install time"
            )
        self.trusted_keys = trusted_keys
        self.check_signature = check_signature
        self.last_installed_version = last_installed_version
        self.limits = limits
        self.manifest_digest = manifest_digest

    def manifest(self, manifest_bytes: bytes, signature_bytes: bytes) -> VerifiedManifest:
        """Check the manifest bytes and their signature; return the manifest parsed, or raise.

        Order: size cap, pinned digest, signature over the raw bytes, schema, caps, version.
        Raises ``SizeLimitError`` (caps), ``IntegrityError`` (not the pinned manifest),
        ``SignatureError``/``UntrustedKeyError`` (signature), ``ManifestError`` (schema,
        paths), ``VersionRollbackError`` (not newer than ``last_installed_version``),
        ``UsageError`` (signature check asked for without keys).
        """
        limits = self.limits
        if len(manifest_bytes) > limits.max_manifest_bytes:
            raise SizeLimitError(
                f"manifest.json is {len(manifest_bytes)} bytes, over the {limits.max_manifest_bytes}-byte cap"
            )
        if self.manifest_digest is not None:
            actual = hashlib.sha256(manifest_bytes).hexdigest()
            if actual != self.manifest_digest:
                raise IntegrityError(
                    f"manifest.json changed since the slot was installed (SHA-256 {actual[:16]}..., pinned "
                    f"{self.manifest_digest[:16]}...); reinstall the package"
                )
        signed_by: str | None = None
        if self.check_signature:
            if self.trusted_keys is None:
                raise UsageError(
                    "no trusted public keys given; pass the publisher's key, or disable the signature check explicitly"
                )
            signed_by = verify_signature(manifest_bytes, signature_bytes, self.trusted_keys)
        manifest = Manifest.from_bytes(manifest_bytes)
        check_limits(manifest, limits)
        last = self.last_installed_version
        if last is not None and manifest.version <= last:
            raise VersionRollbackError(
                f"package {manifest.name} version {manifest.version} is not newer than the installed version "
                f"{last}; versions only move forward (build a package with a higher version)"
            )
        return VerifiedManifest(manifest, manifest_bytes, signature_bytes, signed_by)

    def members(
        self, verified: VerifiedManifest, *, directory: str | None = None, sizes_only: bool = False
    ) -> MemberLedger:
        """A fresh ledger of the files listed by ``verified`` (see ``MemberLedger``).

        ``directory`` names the unpacked directory the files are read from, for messages
        (None: members of a package archive). ``sizes_only`` accepts files without their
        hashes; it is allowed only for a manifest pinned by digest, whose hashes were
        checked at install time, and raises ``UsageError`` otherwise.
        """
        if sizes_only and verified.digest != self.manifest_digest:
            raise UsageError("file contents may go unhashed only for a manifest pinned by its digest")
        return MemberLedger(verified.manifest, directory=directory, hashes=not sizes_only)


class MemberLedger:
    """Checks the files that arrive for one verified manifest; pure, no I/O.

    A reader calls ``admit(path, size)`` when a file appears (before reading its data),
    ``confirm(path, sha256_hex)`` once it has hashed the data, and ``finish()`` at the
    end. The package is accepted only if ``finish`` returns: every listed file was
    admitted once with its listed size and confirmed with its listed hash (unless the
    ledger checks sizes only), and nothing unlisted arrived. After any refusal the ledger
    stays refused: every later call raises ``IntegrityError``.
    """

    def __init__(self, manifest: Manifest, *, directory: str | None = None, hashes: bool = True) -> None:
        self._expected = {f.path: f for f in manifest.files}
        self._directory = directory
        self._hashes = hashes
        self._admitted: set[str] = set()
        self._confirmed: set[str] = set()
        self._refused: str | None = None
        self._finished = False

    def admit(self, path: str, size: int) -> FileEntry:
        """Accept that file ``path`` of ``size`` bytes arrived; return its manifest entry.

        Raises ``UnsafeMemberError`` for an unsafe path or a second copy of a file, and
        ``IntegrityError`` for a file the manifest does not list or of another size.
        """
        self._check_open()
        try:
            return self._admit(path, size)
        except (UnsafeMemberError, IntegrityError) as exc:
            self._refused = str(exc)
            raise

    def _admit(self, path: str, size: int) -> FileEntry:
        try:
            validate_member_path(path)
        except ManifestError as exc:
            raise UnsafeMemberError(f"unsafe member name: {exc}") from None
        if path in self._admitted:
            raise UnsafeMemberError(f"member {path!r} appears twice; a second copy could replace a verified file")
        entry = self.lookup(path)
        if size != entry.size:
            if self._directory is None:
                raise IntegrityError(f"member {path!r} is {size} bytes in the archive but {entry.size} in the manifest")
            raise IntegrityError(f"{path} is {size} bytes on disk but {entry.size} in the manifest")
        self._admitted.add(path)
        return entry

    def lists(self, path: str) -> bool:
        """Whether the manifest lists ``path`` (a question only: nothing is admitted or refused)."""
        return path in self._expected

    def lookup(self, path: str) -> FileEntry:
        """The manifest entry of ``path``; raises ``IntegrityError`` (and refuses the package) if it is not listed."""
        entry = self._expected.get(path)
        if entry is None:
            if self._directory is None:
                message = f"member {path!r} is not listed in the manifest; the package was altered"
            else:
                message = f"{path} in {self._directory} is not listed in the manifest; the directory was altered"
            self._refused = message
            raise IntegrityError(message)
        return entry

    def confirm(self, path: str, sha256_hex: str) -> None:
        """Accept the SHA-256 (lowercase hex) of admitted file ``path``'s data.

        Raises ``IntegrityError`` when it differs from the manifest, and ``UsageError`` for a
        file not admitted yet or confirmed already (a reader bug; the ledger refuses the package).
        """
        self._check_open()
        if path not in self._admitted or path in self._confirmed:
            self._refused = f"confirm({path!r}) out of order"
            state = "was already confirmed" if path in self._confirmed else "was not admitted"
            raise UsageError(f"member {path!r} {state}; a reader must admit each file once, then confirm it once")
        entry = self._expected[path]
        if sha256_hex != entry.sha256:
            if self._directory is None:
                message = (
                    f"member {path!r} does not match its SHA-256 in the manifest: the file was altered or corrupted"
                )
            else:
                message = (
                    f"{path} in {self._directory} does not match its SHA-256 in the manifest: the file was altered"
                )
            self._refused = message
            raise IntegrityError(message)
        self._confirmed.add(path)

    def finish(self) -> None:
        """Accept the package, or raise: ``IntegrityError`` when a listed file is missing or unhashed."""
        self._check_open()
        missing = sorted(set(self._expected) - self._admitted)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            if self._directory is None:
                message = f"member {missing[0]!r}{more} listed in the manifest is missing; the package is truncated or corrupt"
            else:
                message = f"{missing[0]}{more} listed in the manifest is missing from {self._directory}"
            self._refused = message
            raise IntegrityError(message)
        if self._hashes:
            unhashed = sorted(self._admitted - self._confirmed)
            if unhashed:
                self._refused = f"{unhashed[0]!r} was not hashed"
                raise IntegrityError(
                    f"member {unhashed[0]!r} arrived but its SHA-256 was never checked; the package is not accepted"
                )
        self._finished = True

    def _check_open(self) -> None:
        if self._finished:
            raise UsageError("this ledger already accepted its package; use a new ledger for another pass")
        if self._refused is not None:
            raise IntegrityError(f"this package was already refused ({self._refused}); start over with a new ledger")


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
