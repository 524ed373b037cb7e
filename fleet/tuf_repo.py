"""The fleet's TUF repository on a file system: the signed metadata that tells devices which packages are genuine.

Layout under ``directory`` (what a static HTTP server or CDN serves, exactly as python-tuf's
ngclient fetches it):

* ``metadata/<v>.root.json`` for every root version (devices walk them one by one);
* ``metadata/timestamp.json``;
* ``metadata/<v>.snapshot.json`` and ``metadata/<v>.targets.json`` with consistent snapshots
  (``snapshot.json``/``targets.json`` without);
* ``targets/<dir>/<sha256>.<name>`` with consistent snapshots (``targets/<path>`` without).

Keys live in ``keys_dir`` as ``<role>.pem`` (PKCS#8 PEM, mode 0600), one ed25519 key per
top-level role. In production the root and targets keys stay offline; an operation that needs
a key that is absent raises ``KeyFileError`` naming it (see docs/update-trust.md).

State is read from the metadata files, so any number of processes may open the same
repository. Every change happens under an exclusive ``flock`` on ``directory/.lock`` and is
published in the order a client reads it backwards (target file, targets, snapshot, then
timestamp last), each file written atomically (temporary file, fsync, rename, fsync of the
directory). Old metadata versions stay on disk: a device in the middle of an update may
still fetch them.

Snapshot and timestamp list the versions of the metadata they point to, not their hashes or
lengths (python-tuf's ``Repository`` default): signatures already bind the versions, and a
replayed older file then fails on its version, which devices report as a rollback.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.repository import Repository

from edgeship.errors import KeyFileError, UsageError
from edgeship.runtime.durable import fsync_dir, write_atomic
from edgeship.runtime.package.manifest import Manifest
from edgeship.runtime.package.reader import read_manifest
from edgeship.runtime.package.signing import TrustedKeys, load_private_key
from edgeship.runtime.package.verify import VerifiedManifest

TOP_LEVEL_ROLES = ("root", "targets", "snapshot", "timestamp")
ROTATABLE_ROLES = ("targets", "snapshot", "timestamp")
_ROOT_FILE = re.compile(r"([1-9][0-9]*)\.root\.json")
_LOCK_NAME = ".lock"
_SIGNED_TYPES: dict[str, type[Root] | type[Targets] | type[Snapshot] | type[Timestamp]] = {
    "root": Root,
    "targets": Targets,
    "snapshot": Snapshot,
    "timestamp": Timestamp,
}


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed.

    Short for the online roles (timestamp, snapshot: re-signed automatically by
    ``refresh_timestamp``), long for the offline ones (root, targets: re-signed by hand).
    Every period must be positive; raises ``UsageError`` otherwise.
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def __post_init__(self) -> None:
        for role in TOP_LEVEL_ROLES:
            period = getattr(self, role)
            if not isinstance(period, timedelta) or period <= timedelta(0):
                raise UsageError(f"expiry for {role} must be a positive timedelta, got {period!r}")

    def of(self, role: str) -> timedelta:
        """The validity period of ``role`` (one of the four top-level roles)."""
        period: timedelta = getattr(self, role)
        return period


def target_path_for(manifest: Manifest) -> str:
    """The conventional TUF target path of a package: ``<name>/<target>/<precision>/v<version>.edgepkg``."""
    return f"{manifest.name}/{manifest.target}/{manifest.precision}/v{manifest.version}.edgepkg"


def package_custom(verified_manifest: VerifiedManifest, *, downgrade_from: Iterable[int] = ()) -> dict[str, Any]:
    """The edgeship custom metadata of a package's TUF target entry, built from its verified manifest.

    Returns ``{"edgeship": {"name", "version", "target", "format", "precision",
    "manifest_sha256", "size", "downgrade_from"}}`` where ``manifest_sha256`` is the SHA-256 of
    the exact manifest bytes, ``size`` the unpacked size in bytes (sum of the manifest's member
    sizes) and ``downgrade_from`` the sorted device versions allowed to move *down* to this
    package (the fleet's signed permission for a rollback). Raises ``UsageError`` when a
    ``downgrade_from`` entry is not an integer above the package's version.
    """
    manifest = verified_manifest.manifest
    versions: set[int] = set()
    for value in downgrade_from:
        if isinstance(value, bool) or not isinstance(value, int) or value <= manifest.version:
            raise UsageError(
                f"downgrade_from lists the device versions that may move down to version {manifest.version} "
                f"of {manifest.name}; {value!r} is not an integer above {manifest.version}"
            )
        versions.add(value)
    return {
        "edgeship": {
            "name": manifest.name,
            "version": manifest.version,
            "target": manifest.target,
            "format": manifest.format,
            "precision": manifest.precision,
            "manifest_sha256": hashlib.sha256(verified_manifest.raw).hexdigest(),
            "size": manifest.total_size,
            "downgrade_from": sorted(versions),
        }
    }


def check_target_path(target_path: str) -> None:
    """Raise ``UsageError`` unless ``target_path`` is a relative POSIX path a static server will serve.

    Refused: empty, leading ``/``, ``\\``, control characters, empty segments, and segments
    starting with ``.`` (``.``, ``..`` and hidden files, which the static server never serves).
    """
    if not target_path or len(target_path.encode("utf-8", "surrogatepass")) > 1024:
        raise UsageError(f"target path {target_path!r} is empty or longer than 1024 bytes")
    if target_path.startswith("/") or "\\" in target_path or any(ord(c) < 0x20 or c == "\x7f" for c in target_path):
        raise UsageError(f"target path {target_path!r} must be relative, without '\\' or control characters")
    for segment in target_path.split("/"):
        if not segment or segment.startswith("."):
            raise UsageError(f"target path {target_path!r} has an empty segment or one starting with '.'")


class TufRepository:
    """A TUF repository in ``directory`` with its signing keys in ``keys_dir``. Build one with ``create`` or ``open``."""

    def __init__(self, directory: Path, *, keys_dir: Path, expiry: Expiry = Expiry()) -> None:
        self.directory = Path(directory)
        self.keys_dir = Path(keys_dir)
        self.expiry = expiry
        self.metadata_dir = self.directory / "metadata"
        self.targets_dir = self.directory / "targets"

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        keys_dir: Path,
        expiry: Expiry = Expiry(),
        consistent_snapshot: bool = True,
    ) -> TufRepository:
        """Create a new repository: one fresh ed25519 key per top-level role and version 1 of every role.

        Writes ``keys_dir/<role>.pem`` (mode 0600) and ``directory/metadata/1.root.json``,
        targets, snapshot and timestamp. Raises ``UsageError`` when ``directory`` already holds
        a repository or ``keys_dir`` already holds a role key (keys are never overwritten).
        """
        repo = cls(directory, keys_dir=keys_dir, expiry=expiry)
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        if repo._root_versions():
            raise UsageError(f"{directory} already holds a TUF repository; open it with TufRepository.open")
        repo.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for role in TOP_LEVEL_ROLES:
            if repo._key_path(role).exists():
                raise UsageError(
                    f"{repo._key_path(role)} already exists; keys are never overwritten (use another keys_dir)"
                )
        signers = {role: repo._write_new_key(role, repo._key_path(role)) for role in TOP_LEVEL_ROLES}
        with repo._locked(exclusive=True, state={}) as store:
            store.signers.update({role: [signer] for role, signer in signers.items()})
            with store.edit_root() as root:
                root.consistent_snapshot = consistent_snapshot
                for role, signer in signers.items():
                    root.add_key(signer.public_key, role)
            for role in ("targets", "snapshot", "timestamp"):
                with store.edit(role):
                    pass
        return repo

    @classmethod
    def open(cls, directory: Path, *, keys_dir: Path, expiry: Expiry = Expiry()) -> TufRepository:
        """Open an existing repository; the current state is read from its metadata files.

        ``expiry`` applies to the versions this process signs (it is not stored in the
        repository). Raises ``UsageError`` when ``directory`` holds no readable repository.
        """
        repo = cls(directory, keys_dir=keys_dir, expiry=expiry)
        with repo._locked(exclusive=False):
            pass
        return repo

    # -- reading ---------------------------------------------------------------------------

    def root_bytes(self) -> bytes:
        """The bytes of the newest root metadata: what a device is provisioned with as its trust anchor."""
        with self._locked(exclusive=False):
            versions = self._root_versions()
            return (self.metadata_dir / f"{max(versions)}.root.json").read_bytes()

    def version(self, role: str) -> int:
        """The current (published) version of a top-level role's metadata."""
        with self._locked(exclusive=False) as store:
            return int(store.current(_check_role(role)).signed.version)

    def expires(self, role: str) -> datetime:
        """When the current version of a top-level role's metadata expires (UTC)."""
        with self._locked(exclusive=False) as store:
            expires: datetime = store.current(_check_role(role)).signed.expires
            return expires

    def list_targets(self) -> dict[str, TargetFile]:
        """Every target the current targets metadata lists, by target path."""
        with self._locked(exclusive=False) as store:
            targets: Targets = store.current("targets").signed
            return dict(targets.targets)

    @property
    def consistent_snapshot(self) -> bool:
        """Whether metadata and target files are published under versioned / hash-prefixed names."""
        with self._locked(exclusive=False) as store:
            return _consistent(store.current("root").signed)

    # -- targets ---------------------------------------------------------------------------

    def add_target(self, target_path: str, file: Path, custom: dict[str, Any] | None = None) -> TargetFile:
        """Copy ``file`` into the repository and list it as ``target_path`` (replacing an earlier entry).

        Publishes new targets, snapshot and timestamp versions (needs the targets, snapshot
        and timestamp keys). The file is hashed while it is copied, so the listed hash is
        the hash of the bytes served. Returns the new entry. Raises ``UsageError`` for a bad
        target path, an unreadable file or custom data that is not JSON, ``KeyFileError``
        when a key is missing.
        """
        check_target_path(target_path)
        _check_custom(custom)
        with self._locked(exclusive=True) as store:
            store.require("targets", "snapshot", "timestamp")
            consistent = _consistent(store.current("root").signed)
            length, sha256 = self._copy_in(Path(file), target_path, consistent)
            fields: dict[str, Any] = {} if custom is None else {"custom": copy.deepcopy(custom)}
            info = TargetFile(length, {"sha256": sha256}, target_path, fields)
            with store.edit_targets() as targets:
                targets.targets[target_path] = info
            store.publish()
        return info

    def add_package(
        self, package: Path, *, trusted_keys: TrustedKeys, downgrade_from: Iterable[int] = ()
    ) -> TargetFile:
        """List a signed model package under its conventional path with its edgeship custom metadata.

        Reads and verifies the package's manifest against ``trusted_keys`` (a ``PackageError``
        when it is not a package signed by one of them), then ``add_target(target_path_for(...),
        package, package_custom(...))``. Returns the new entry.
        """
        verified = read_manifest(package, trusted_keys=trusted_keys)
        custom = package_custom(verified, downgrade_from=downgrade_from)
        return self.add_target(target_path_for(verified.manifest), package, custom)

    def set_custom(self, target_path: str, custom: dict[str, Any]) -> None:
        """Replace the custom metadata of a listed target; publishes new targets, snapshot and timestamp versions.

        Raises ``UsageError`` when the target is not listed or ``custom`` is not JSON data.
        """
        _check_custom(custom)
        with self._locked(exclusive=True) as store:
            store.require("targets", "snapshot", "timestamp")
            with store.edit_targets() as targets:
                info = _listed(targets, target_path)
                info.unrecognized_fields["custom"] = copy.deepcopy(custom)
            store.publish()

    def remove_target(self, target_path: str) -> None:
        """Stop listing ``target_path`` and delete its file; publishes new targets, snapshot and timestamp versions.

        Raises ``UsageError`` when the target is not listed.
        """
        with self._locked(exclusive=True) as store:
            store.require("targets", "snapshot", "timestamp")
            consistent = _consistent(store.current("root").signed)
            with store.edit_targets() as targets:
                info = _listed(targets, target_path)
                del targets.targets[target_path]
            store.publish()
            # Deleted only after devices can no longer be pointed at it.
            stored = self._target_file(target_path, info.hashes["sha256"], consistent)
            with contextlib.suppress(FileNotFoundError):
                stored.unlink()
                fsync_dir(stored.parent)

    # -- keeping metadata fresh ---------------------------------------------------------------

    def refresh_timestamp(self, *, within: timedelta | None = None) -> bool:
        """Re-sign the timestamp if it expires within ``within`` (always when ``within`` is None).

        Snapshot and targets are re-signed first when they would expire before the new
        timestamp does (or within ``within``): a fresh timestamp pointing at expiring metadata
        would still leave devices with expired metadata. Returns True when a new timestamp
        version was published. Needs the timestamp key, plus the snapshot or targets key
        when those are re-signed (``KeyFileError`` naming the missing key otherwise).
        """
        if within is not None and within < timedelta(0):
            raise UsageError(f"within must not be negative, got {within!r}")
        with self._locked(exclusive=True) as store:
            now = datetime.now(timezone.utc)
            margin = max(self.expiry.timestamp, within or timedelta(0))
            if store.current("targets").signed.expires <= now + margin:
                with store.edit_targets():
                    pass
            if store.current("snapshot").signed.expires <= now + margin:
                store.do_snapshot(force=True)
            else:
                store.do_snapshot()
            timestamp_due = within is None or store.current("timestamp").signed.expires <= now + within
            published, _ = store.do_timestamp(force=timestamp_due)
            return published

    def renew_root(self) -> None:
        """Publish a new root version with a fresh expiry, same keys (needs the offline root key)."""
        with self._locked(exclusive=True) as store, store.edit_root():
            pass

    def rotate_key(self, role: str) -> str:
        """Replace the key of ``targets``, ``snapshot`` or ``timestamp`` and publish a root that trusts the new one.

        Order: the new key is written as ``<role>.pem.new``; a new version of the role is
        published signed by the old and the new key (valid under either root); then the new
        root (signed by the root key) replaces the old key by the new one; then the key file
        takes its place. A device holding any older root follows the chain of roots and
        keeps verifying. Returns the new key id. Raises ``UsageError`` for ``root`` (root
        rotation is an offline ceremony) or an unknown role, ``KeyFileError`` when the root key
        is missing.
        """
        if role not in ROTATABLE_ROLES:
            raise UsageError(f"rotate_key rotates one of {', '.join(ROTATABLE_ROLES)}, not {role!r}")
        with self._locked(exclusive=True) as store:
            root: Root = store.current("root").signed
            # Fail before touching anything when a key the publication needs is absent.
            store.require("root", *(r for r in ("snapshot", "timestamp") if r != role))
            old_keyids = list(root.roles[role].keyids)
            old_signers = store.signers_if_present(role)
            pending = self._key_path(role).with_name(f"{role}.pem.new")
            pending.unlink(missing_ok=True)
            new_signer = self._write_new_key(role, pending)
            store.signers[role] = [new_signer, *old_signers]
            with store.edit(role):
                pass
            store.publish()
            with store.edit_root() as new_root:
                for keyid in old_keyids:
                    new_root.revoke_key(keyid, role)
                new_root.add_key(new_signer.public_key, role)
            os.replace(pending, self._key_path(role))
            fsync_dir(self.keys_dir)
            return str(new_signer.public_key.keyid)

    # -- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool, state: dict[str, Metadata[Any]] | None = None) -> Iterator[_Store]:
        """Hold the repository lock and yield a store over the current state (read from disk unless given)."""
        if not self.metadata_dir.is_dir():
            raise UsageError(
                f"{self.directory} is not a TUF repository (no metadata/); create one with TufRepository.create"
            )
        fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield _Store(self, self._read_state() if state is None else state)
        finally:
            os.close(fd)  # releases the lock

    def _root_versions(self) -> list[int]:
        versions = []
        for name in os.listdir(self.metadata_dir):
            match = _ROOT_FILE.fullmatch(name)
            if match:
                versions.append(int(match.group(1)))
        return sorted(versions)

    def _read_state(self) -> dict[str, Metadata[Any]]:
        """The published metadata: newest root, then timestamp -> snapshot -> targets as a client follows them."""
        versions = self._root_versions()
        if not versions:
            raise UsageError(f"{self.directory} is not a TUF repository (no metadata/1.root.json); create one first")
        state: dict[str, Metadata[Any]] = {"root": self._read_md(f"{versions[-1]}.root.json", "root")}
        consistent = _consistent(state["root"].signed)
        state["timestamp"] = self._read_md("timestamp.json", "timestamp")
        snapshot_version = state["timestamp"].signed.snapshot_meta.version
        state["snapshot"] = self._read_md(_metadata_name("snapshot", snapshot_version, consistent), "snapshot")
        targets_meta = state["snapshot"].signed.meta.get("targets.json")
        if targets_meta is None:
            raise UsageError(f"{self.metadata_dir}: snapshot lists no targets.json; restore the metadata from a backup")
        state["targets"] = self._read_md(_metadata_name("targets", targets_meta.version, consistent), "targets")
        return state

    def _read_md(self, name: str, role: str) -> Metadata[Any]:
        path = self.metadata_dir / name
        try:
            md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise UsageError(f"{path} is missing; the repository is incomplete (restore it from a backup)") from None
        except RepositoryError as exc:
            raise UsageError(f"{path} is not valid TUF metadata ({exc}); restore it from a backup") from None
        if md.signed.type != role:
            raise UsageError(f"{path} holds {md.signed.type} metadata, not {role}; restore it from a backup")
        return md

    def _key_path(self, role: str) -> Path:
        return self.keys_dir / f"{role}.pem"

    def _write_new_key(self, role: str, path: Path) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(signer.private_bytes)
            stream.flush()
            os.fsync(stream.fileno())
        fsync_dir(path.parent)
        return signer

    def _load_signer(self, role: str, root: Root) -> CryptoSigner | None:
        """The signer for ``role`` whose key the root lists, or None when no such key file is here.

        ``<role>.pem.new`` is a key a rotation wrote but had not yet moved into place when it
        was interrupted: when the root already lists it, it is moved into place now.
        """
        wanted = set(root.roles[role].keyids)
        main = self._key_path(role)
        for path in (main, main.with_name(f"{role}.pem.new")):
            if not path.exists():
                continue
            key = load_private_key(path)
            signer = CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))
            if signer.public_key.keyid in wanted:
                if path != main:
                    os.replace(path, main)
                    fsync_dir(self.keys_dir)
                return signer
        return None

    def _target_file(self, target_path: str, sha256: str, consistent: bool) -> Path:
        if not consistent:
            return self.targets_dir / target_path
        dirname, _, basename = target_path.rpartition("/")
        return self.targets_dir / dirname / f"{sha256}.{basename}"

    def _copy_in(self, source: Path, target_path: str, consistent: bool) -> tuple[int, str]:
        """Copy ``source`` to its served name while hashing it; returns (length, sha256 hex)."""
        folder = self._target_file(target_path, "", consistent).parent
        folder.mkdir(parents=True, exist_ok=True)
        digest, length = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    src = source.open("rb")
                except OSError as exc:
                    raise UsageError(f"cannot read {source}: {exc.strerror}; give an existing file") from None
                with src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
                        length += len(chunk)
                os.fchmod(out.fileno(), 0o644)
                out.flush()
                os.fsync(out.fileno())
            final = self._target_file(target_path, digest.hexdigest(), consistent)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(final.parent)
        return length, digest.hexdigest()


class _Store(Repository):
    """python-tuf's ``Repository`` over one locked snapshot of a ``TufRepository``'s state.

    ``open`` hands out copies of the current metadata, ``close`` bumps the version, sets the
    expiry, signs with the role's keys and writes the file; ``do_snapshot``/``do_timestamp``
    come from python-tuf.
    """

    def __init__(self, repo: TufRepository, state: dict[str, Metadata[Any]]) -> None:
        self._repo = repo
        self._state = state
        self.signers: dict[str, list[Signer]] = {}

    def current(self, role: str) -> Metadata[Any]:
        return self._state[role]

    def open(self, role: str) -> Metadata[Any]:
        if role not in self._state:
            md: Metadata[Any] = Metadata(_SIGNED_TYPES[role]())
            md.signed.version = 0  # close() bumps it to 1
            return md
        return copy.deepcopy(self._state[role])

    def close(self, role: str, md: Metadata[Any]) -> None:
        md.signed.version += 1
        md.signed.expires = datetime.now(timezone.utc) + self._repo.expiry.of(role)
        signers = self.signers[role] if role in self.signers else [self.signer(role, md.signed)]
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        consistent = _consistent(md.signed if role == "root" else self._state["root"].signed)
        write_atomic(self._repo.metadata_dir / _metadata_name(role, md.signed.version, consistent), md.to_bytes())
        self._state[role] = md

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": MetaFile(self._state["targets"].signed.version)}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(self._state["snapshot"].signed.version)

    def publish(self) -> None:
        """Point snapshot and timestamp at the current targets (new versions of both when it changed)."""
        self.do_snapshot()
        self.do_timestamp()

    def signer(self, role: str, root: Root | None = None) -> Signer:
        """The signer of ``role`` from the keys directory; raises ``KeyFileError`` when its key is absent."""
        if role in self.signers:
            return self.signers[role][0]
        root = root if isinstance(root, Root) else self._state["root"].signed
        loaded = self._repo._load_signer(role, root)
        if loaded is None:
            keyid = root.roles[role].keyids[0] if root.roles[role].keyids else "?"
            raise KeyFileError(
                f"the {role} key (key id {keyid[:16]}) is not in {self._repo.keys_dir} as {role}.pem; "
                f"bring the {role} key there (it may be kept offline) and retry"
            )
        self.signers[role] = [loaded]
        return loaded

    def require(self, *roles: str) -> None:
        """Load the signers of ``roles`` now; raises ``KeyFileError`` naming the first missing key."""
        for role in roles:
            self.signer(role)

    def signers_if_present(self, role: str) -> list[Signer]:
        try:
            return [self.signer(role)]
        except KeyFileError:
            return []


def _check_role(role: str) -> str:
    if role not in TOP_LEVEL_ROLES:
        raise UsageError(f"role must be one of {', '.join(TOP_LEVEL_ROLES)}, not {role!r}")
    return role


def _consistent(root: Root) -> bool:
    return bool(root.consistent_snapshot)


def _metadata_name(role: str, version: int, consistent: bool) -> str:
    if role == "root":
        return f"{version}.root.json"
    if role == "timestamp" or not consistent:
        return f"{role}.json"
    return f"{version}.{role}.json"


def _listed(targets: Targets, target_path: str) -> TargetFile:
    info = targets.targets.get(target_path)
    if info is None:
        raise UsageError(f"target {target_path!r} is not listed in the repository; add it first")
    return info


def _check_custom(custom: dict[str, Any] | None) -> None:
    if custom is None:
        return
    if not isinstance(custom, dict):
        raise UsageError(f"custom metadata must be a JSON object (dict), got {type(custom).__name__}")
    try:
        json.dumps(custom, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"custom metadata is not plain JSON data ({exc}); use dicts, lists, str, int, float, bool, None"
        ) from None


__all__ = [
    "ROTATABLE_ROLES",
    "TOP_LEVEL_ROLES",
    "Expiry",
    "TufRepository",
    "check_target_path",
    "package_custom",
    "target_path_for",
]
