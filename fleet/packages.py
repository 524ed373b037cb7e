"""Pushing a model package to the fleet: verify it completely, store it, list it in TUF, record it.

``push_package`` is all or nothing. A package is refused with one ``PackageError`` line when its
signature is not by one of ``settings.signing_keys``, its manifest breaks the schema, a member's
size or hash differs from the manifest, its target is unknown to ``edgeship.targets`` (the
message suggests the nearest names), its format or precision is not one the target profile
runs, or its version is not above every version already pushed for the same
(name, target, precision) (the message names the current version). Nothing is stored, listed or
recorded then.

What is listed in TUF: the package at ``target_path_for(manifest)`` with ``package_custom``'s
``edgeship`` data plus ``requirements``, which the fleet and devices check before assigning or
installing::

    {"edgeship": {"name": ..., "version": ..., ..., "downgrade_from": [],
                  "requirements": {"target": "jetson-orin-nano", "format": "tensorrt-onnx",
                                   "runtime": {"name": "tensorrt", "version": "10.3"},
                                   "min_memory_mib": 4096}}}

``min_memory_mib`` is what the loaded model needs (about three times its artifact, plus the runtime),
not the device's size: a device refuses a package whose need exceeds its available memory.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgeship import targets
from edgeship.errors import ConflictError, NotFoundError, PackageError, UsageError, VersionRollbackError
from edgeship.fleet import audit
from edgeship.fleet.context import FleetContext
from edgeship.fleet.db import advisory_lock
from edgeship.fleet.models import Package
from edgeship.fleet.tuf_repo import package_custom, target_path_for
from edgeship.runtime.package import Manifest, VerifiedManifest, verify_package


def target_profile(name: str, *, what: str = "package") -> targets.TargetProfile:
    """The profile of target ``name``; raises ``PackageError`` with the nearest known names when there is none."""
    try:
        return targets.get(name)
    except targets.UnknownTargetError as exc:
        raise PackageError(f"{what}: {exc}") from None


MODEL_MEMORY_FACTOR = 3
"""A loaded model takes up to about this many times its artifact's size (weights, arena, runtime
buffers; ONNX Runtime and LiteRT measured 1.5-2.5x here), plus ``RUNTIME_MEMORY_MIB`` for the runtime."""
RUNTIME_MEMORY_MIB = 64


def package_requirements(manifest: Manifest, profile: targets.TargetProfile) -> dict[str, Any]:
    """What a device must have to run the package: target, format, runtime (name, version), and the memory
    the model needs when loaded (an estimate from the artifact's size, never more than the profile's budget)."""
    artifact = sum(
        f.size
        for f in manifest.files
        if f.path == manifest.artifact_path or f.path.startswith(manifest.artifact_path + "/")
    )
    need = RUNTIME_MEMORY_MIB + -(-MODEL_MEMORY_FACTOR * artifact // (1 << 20))
    if profile.memory_mib is not None:
        need = min(need, profile.memory_mib)
    return {
        "target": manifest.target,
        "format": manifest.format,
        "runtime": {"name": profile.runtime, "version": profile.runtime_version},
        "min_memory_mib": need,
    }


def tuf_custom(
    verified: VerifiedManifest, requirements: dict[str, Any], downgrade_from: Iterable[int] = ()
) -> dict[str, Any]:
    """The custom metadata of a package's TUF entry: ``package_custom`` with ``requirements`` in it."""
    custom = package_custom(verified, downgrade_from=downgrade_from)
    custom["edgeship"]["requirements"] = copy.deepcopy(requirements)
    return custom


def check_against_profile(manifest: Manifest, label: str) -> targets.TargetProfile:
    """Refuse (``PackageError``) a package whose target is unknown or whose format/precision its profile does not run."""
    profile = target_profile(manifest.target, what=label)
    if manifest.format != profile.format:
        raise PackageError(
            f"{label}: package {manifest.name} v{manifest.version} is {manifest.format}, but target "
            f"{profile.name} runs {profile.format}; compile it for {profile.name} again"
        )
    if manifest.precision not in profile.precisions:
        raise PackageError(
            f"{label}: precision {manifest.precision} is not one target {profile.name} runs "
            f"({', '.join(profile.precisions)})"
        )
    return profile


def push_package(ctx: FleetContext, path: Path, actor: str, *, label: str | None = None) -> Package:
    """Verify the package at ``path``, store it, list it in TUF and record it; returns the new row.

    ``label`` names the package in messages (default: the file name). Raises ``PackageError``
    (a subclass: signature, schema, integrity) for a package the fleet refuses,
    ``VersionRollbackError`` (a ``PackageError``) when the version is not above the current one,
    ``KeyFileError`` when the TUF targets key is not on this machine. On any error nothing is
    stored, listed or recorded.
    """
    label = label or Path(path).name
    try:
        verified = verify_package(path, trusted_keys=ctx.trusted_keys)
    except PackageError as exc:
        raise type(exc)(f"{label}: {exc}") from None
    manifest = verified.manifest
    profile = check_against_profile(manifest, label)
    requirements = package_requirements(manifest, profile)
    target_path = target_path_for(manifest)
    custom = tuf_custom(verified, requirements)
    size = Path(path).stat().st_size
    line = f"{manifest.name} v{manifest.version} for {manifest.target}/{manifest.precision}"
    with ctx.db.session(readonly=True) as session:
        _check_version(session, manifest, label)  # fail fast, before copying anything
    # The copy of record is written before the write transaction, so that SQLite's write lock is
    # held for one copy (the TUF one) and not two. The key names the manifest, so a concurrent push
    # of another build of the same version never overwrites this file.
    storage_key = f"{target_path.rsplit('.', 1)[0]}-{verified.digest[:16]}.edgepkg"
    ctx.storage.put(storage_key, Path(path))
    now = ctx.now()
    listed = False
    try:
        with ctx.db.session() as session:
            # Two pushes of one package line are decided one after the other (SQLite: the write lock).
            advisory_lock(session, f"package:{manifest.name}/{manifest.target}/{manifest.precision}")
            _check_version(session, manifest, label)
            row = Package(
                name=manifest.name,
                version=manifest.version,
                target=manifest.target,
                format=manifest.format,
                precision=manifest.precision,
                manifest_sha256=verified.digest,
                size=size,
                target_path=target_path,
                storage_key=storage_key,
                requirements=requirements,
                pushed_at=now,
                pushed_by=actor[:64],
            )
            session.add(row)
            session.flush()
            ctx.tuf.add_target(target_path, ctx.storage.path(storage_key) or Path(path), custom)
            listed = True
            audit.record(
                session,
                actor,
                "package.push",
                f"package:{row.id}",
                {
                    "name": row.name,
                    "version": row.version,
                    "target": row.target,
                    "precision": row.precision,
                    "manifest_sha256": row.manifest_sha256,
                    "signed_by": verified.signed_by,
                },
                at=now,
            )
    except BaseException as exc:
        # Undo in the reverse order: devices must never be offered a package the fleet has no record of.
        if listed:
            with contextlib.suppress(Exception):
                ctx.tuf.remove_target(target_path)
        with contextlib.suppress(Exception):
            _forget_stored(ctx, storage_key)
        if isinstance(exc, IntegrityError):
            raise ConflictError(f"{label}: {line} was pushed at the same moment by someone else") from None
        raise
    return row


def _check_version(session: Session, manifest: Manifest, label: str) -> None:
    current = current_version(session, manifest.name, manifest.target, manifest.precision)
    if current is not None and manifest.version <= current:
        raise VersionRollbackError(
            f"{label}: {manifest.name} v{manifest.version} for {manifest.target}/{manifest.precision} is not "
            f"above the current version {current}; build it with version {current + 1} or higher"
        )


def _forget_stored(ctx: FleetContext, storage_key: str) -> None:
    """Delete a stored file after a failed push, unless a recorded package uses it (the same build, pushed
    by someone else at the same moment)."""
    with ctx.db.session(readonly=True) as session:
        if session.scalar(select(Package.id).where(Package.storage_key == storage_key)) is not None:
            return
    ctx.storage.delete(storage_key)


def current_version(session: Session, name: str, target: str, precision: str) -> int | None:
    """The highest version pushed of (name, target, precision), or None."""
    value = session.scalar(
        select(func.max(Package.version)).where(
            Package.name == name, Package.target == target, Package.precision == precision
        )
    )
    return None if value is None else int(value)


def get_package(ctx: FleetContext, package_id: int) -> Package:
    """The package with id ``package_id``; raises ``NotFoundError``."""
    with ctx.db.session(readonly=True) as session:
        row = session.get(Package, package_id)
    if row is None:
        raise NotFoundError(f"there is no package with id {package_id} (list them with GET /api/v1/packages)")
    return row


def list_packages(
    ctx: FleetContext,
    *,
    name: str | None = None,
    target: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Package], int]:
    """Packages newest first, filtered by name and target; returns (page, total matching)."""
    query = select(Package)
    count = select(func.count()).select_from(Package)
    for column, value in ((Package.name, name), (Package.target, target)):
        if value is not None:
            query = query.where(column == value)
            count = count.where(column == value)
    with ctx.db.session(readonly=True) as session:
        total = int(session.scalar(count) or 0)
        rows = list(session.scalars(query.order_by(Package.id.desc()).limit(limit).offset(offset)))
    return rows, total


def find_package(session: Session, name: str, version: int, target: str, precision: str | None = None) -> Package:
    """The package ``name`` v``version`` for ``target`` (and ``precision``, needed when several were pushed).

    Raises ``NotFoundError`` (saying which versions exist) or ``UsageError`` when the precision is
    ambiguous.
    """
    query = select(Package).where(Package.name == name, Package.version == version, Package.target == target)
    if precision is not None:
        query = query.where(Package.precision == precision)
    rows = list(session.scalars(query))
    if not rows:
        versions = sorted(
            {
                f"v{v}/{p}"
                for v, p in session.execute(
                    select(Package.version, Package.precision).where(Package.name == name, Package.target == target)
                )
            }
        )
        have = (
            f"; pushed for {target}: {', '.join(versions)}"
            if versions
            else f"; nothing named {name} is pushed for {target}"
        )
        wanted = f"{name}:{version}@{target}" + (f"/{precision}" if precision else "")
        raise NotFoundError(f"package {wanted} is not pushed{have}")
    if len(rows) > 1:
        raise UsageError(
            f"{name} v{version} for {target} exists in several precisions ({', '.join(sorted(r.precision for r in rows))}); "
            f"name one: {name}:{version}@{target}/<precision>"
        )
    return rows[0]


def allow_downgrade(ctx: FleetContext, package: Package, from_versions: Iterable[int]) -> list[int]:
    """Add ``from_versions`` to the package's signed ``downgrade_from`` (devices on those versions may move down to it).

    Keeps the rest of its TUF custom metadata (requirements included); publishes new targets,
    snapshot and timestamp versions (needs the targets key). Returns the new list. Raises
    ``UsageError`` for a version not above the package's, ``NotFoundError`` when it is not listed.
    """
    listed = ctx.tuf.list_targets().get(package.target_path)
    if listed is None:
        raise NotFoundError(f"package {package.target_path} is not listed in the TUF repository")
    custom = copy.deepcopy(listed.custom or {})
    meta = custom.setdefault("edgeship", {})
    versions = set(meta.get("downgrade_from", []))
    for value in from_versions:
        if isinstance(value, bool) or not isinstance(value, int) or value <= package.version:
            raise UsageError(
                f"downgrade_from of {package.target_path} takes versions above {package.version}, not {value!r}"
            )
        versions.add(value)
    meta["downgrade_from"] = sorted(versions)
    ctx.tuf.set_custom(package.target_path, custom)
    return meta["downgrade_from"]


def package_to_json(row: Package) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "version": row.version,
        "target": row.target,
        "format": row.format,
        "precision": row.precision,
        "manifest_sha256": row.manifest_sha256,
        "size": row.size,
        "target_path": row.target_path,
        "requirements": row.requirements,
        "pushed_at": row.pushed_at,
        "pushed_by": row.pushed_by,
    }


__all__ = [
    "allow_downgrade",
    "check_against_profile",
    "current_version",
    "find_package",
    "get_package",
    "list_packages",
    "package_requirements",
    "package_to_json",
    "push_package",
    "target_profile",
    "tuf_custom",
]
