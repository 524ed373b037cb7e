"""Enrolling a device: a one-time token in, a device record and everything the agent needs out.

An admin creates an enrollment token (``create_enrollment_token``): random, shown once, stored as
its SHA-256, valid until it expires and for one device only, carrying the tags the device gets
and optionally the one target it may enroll as. ``enroll`` then, in one transaction:

1. claims the token (an ``UPDATE ... WHERE used_at IS NULL AND expires_at > now``, so of two
   devices racing with one token exactly one wins);
2. refuses an unknown target (suggesting near names), a target the token does not allow, a device
   id that exists, tags that contradict the token's;
3. inserts the device (the scheduler puts a device that enrolls mid-rollout and matches its
   selector into the running wave, so it gets the rollout's version);
4. gives the device a broker account: a random password appended to mosquitto's password file
   (``settings.broker.accounts_file``), then SIGHUP to the pid in ``settings.broker.pid_file`` so
   mosquitto re-reads it without a restart;
5. records it in the audit log.

A failure anywhere rolls everything back, the token included, so a device with a typo in its
request can try again with the same token. The returned bundle (``AgentBundle``) holds the
broker password in clear: it exists only in this response and in the agent's password file.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import logging
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from edgeship import targets
from edgeship.device_agent.topics import check_id
from edgeship.errors import AuthError, ConfigError, ConflictError, UsageError
from edgeship.fleet import audit, broker
from edgeship.fleet.auth import hash_token
from edgeship.fleet.context import FleetContext
from edgeship.fleet.dev_tls import write_private
from edgeship.fleet.models import Audit, Device, EnrollmentToken
from edgeship.runtime.durable import fsync_dir

log = logging.getLogger(__name__)

ENROLL_PREFIX = "ese_"
MAX_TOKEN_LIFETIME_S = 365 * 86400.0
TAG_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_TAGS = 32
_MAX_TAG_VALUE = 128


def check_tags(tags: Mapping[str, Any], where: str = "tags") -> dict[str, str]:
    """Return ``tags`` as a dict of strings; raise ``UsageError`` for a bad key or value.

    Keys: 1-64 letters, digits, ``_ . -`` (starting with a letter or digit); values: strings of at
    most 128 characters; at most 32 tags.
    """
    if not isinstance(tags, Mapping):
        raise UsageError(f"{where}: give tags as a mapping of key to value")
    if len(tags) > _MAX_TAGS:
        raise UsageError(f"{where}: at most {_MAX_TAGS} tags, got {len(tags)}")
    out: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
            raise UsageError(f"{where}: tag key {key!r}: use 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(value, str) or len(value) > _MAX_TAG_VALUE or not value:
            raise UsageError(f"{where}.{key}: a tag value is a non-empty string of at most {_MAX_TAG_VALUE} characters")
        out[key] = value
    return out


def known_target(name: str) -> str:
    """``name`` if ``edgeship.targets`` knows it; ``UsageError`` with the nearest names otherwise."""
    try:
        return targets.get(name).name
    except targets.UnknownTargetError as exc:
        raise UsageError(str(exc)) from None


def create_enrollment_token(
    ctx: FleetContext,
    *,
    actor: str,
    expires_s: float = 86400.0,
    tags: Mapping[str, Any] | None = None,
    target: str | None = None,
) -> tuple[EnrollmentToken, str]:
    """Create a one-time enrollment token valid for ``expires_s`` seconds; returns the row and the secret.

    Raises ``UsageError`` for a lifetime outside (0, 365 days], bad tags or an unknown target.
    """
    if not 0 < expires_s <= MAX_TOKEN_LIFETIME_S:
        raise UsageError(f"an enrollment token lives between 1 s and 365 days, not {expires_s:g} s")
    checked = check_tags(tags or {})
    target = known_target(target) if target is not None else None
    secret = ENROLL_PREFIX + secrets.token_urlsafe(32)
    now = ctx.now()
    with ctx.db.session() as session:
        row = EnrollmentToken(
            token_hash=hash_token(secret),
            target=target,
            tags=checked,
            created_at=now,
            expires_at=now + expires_s,
            created_by=actor[:64],
        )
        session.add(row)
        session.flush()
        audit.record(
            session,
            actor,
            "enrollment_token.create",
            f"enrollment_token:{row.id}",
            {"target": target, "tags": checked, "expires_at": row.expires_at},
            at=now,
        )
    return row, secret


def list_enrollment_tokens(ctx: FleetContext, *, include_used: bool = False) -> list[EnrollmentToken]:
    """Enrollment tokens, newest first (unused ones only unless ``include_used``)."""
    query = select(EnrollmentToken).order_by(EnrollmentToken.id.desc())
    if not include_used:
        query = query.where(EnrollmentToken.used_at.is_(None))
    with ctx.db.session(readonly=True) as session:
        return list(session.scalars(query))


def enrollment_token_to_json(row: EnrollmentToken) -> dict[str, Any]:
    return {
        "id": row.id,
        "target": row.target,
        "tags": row.tags,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "created_by": row.created_by,
        "used_at": row.used_at,
        "used_by": row.used_by,
    }


@dataclass(frozen=True)
class AgentBundle:
    """What ``edgeship agent enroll`` writes into the agent's configuration."""

    device_id: str
    fleet_id: str
    target: str
    tags: dict[str, str]
    broker: dict[str, Any]
    """``url`` (the broker as devices reach it), ``username``, ``password``, ``ca_pem`` (or None)."""
    updates: dict[str, Any]
    """``metadata_url``, ``targets_url``, ``root_json`` (text), ``signing_keys_pem`` (list of PEM texts)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "fleet_id": self.fleet_id,
            "target": self.target,
            "tags": self.tags,
            "broker": self.broker,
            "updates": self.updates,
        }


def enroll(
    ctx: FleetContext, token: str, device_id: str, target: str, tags: Mapping[str, Any] | None = None
) -> AgentBundle:
    """Enroll ``device_id`` as ``target`` with the one-time ``token``; returns the agent's bundle.

    Raises ``AuthError`` for an unknown, used or expired token; ``UsageError`` for a bad device id,
    an unknown target, a target the token does not allow, bad tags or tags that contradict the
    token's; ``ConflictError`` when the device id is enrolled already; ``ConfigError`` when the
    fleet has no broker accounts file configured. Nothing changes when it raises.
    """
    try:
        check_id("device id", device_id)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if device_id == ctx.settings.broker_username:
        raise UsageError(f"device id {device_id!r} is the fleet's own broker account; choose another id")
    target = known_target(target)
    requested = check_tags(tags or {})
    settings = ctx.settings
    accounts = settings.broker.accounts_file
    root_json = ctx.tuf.root_bytes().decode()
    signing_keys = [path.read_text() for path in settings.signing_keys]
    ca_pem = settings.broker.device_ca.read_text() if settings.broker.device_ca is not None else None
    password = secrets.token_urlsafe(24)
    now = ctx.now()
    account_added = False
    try:
        with ctx.db.session() as session:
            claimed = session.execute(
                update(EnrollmentToken)
                .where(
                    EnrollmentToken.token_hash == hash_token(token),
                    EnrollmentToken.used_at.is_(None),
                    EnrollmentToken.expires_at > now,
                )
                .values(used_at=now, used_by=device_id)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                raise _token_refusal(ctx, token, now)
            grant = session.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token)))
            assert grant is not None
            if grant.target is not None and grant.target != target:
                raise UsageError(f"this enrollment token is for target {grant.target}, not {target}")
            for key, value in requested.items():
                if key in grant.tags and grant.tags[key] != value:
                    raise UsageError(f"tag {key}={value} contradicts the token's {key}={grant.tags[key]}")
            merged = {**requested, **grant.tags}
            if session.get(Device, device_id) is not None:
                raise ConflictError(f"device {device_id!r} is enrolled already; choose another id or remove it first")
            device = Device(id=device_id, target=target, tags=merged, enrolled_at=now)
            session.add(device)
            session.flush()
            if accounts is None:
                raise ConfigError(
                    "broker.accounts_file is not set: the fleet cannot give devices broker accounts (fleet.yaml)"
                )
            _add_broker_account(accounts, device_id, password)
            account_added = True
            audit.record(
                session,
                f"enrollment:{grant.id}",
                "device.enroll",
                f"device:{device_id}",
                {"target": target, "tags": merged},
                at=now,
            )
    except BaseException as exc:
        if account_added and accounts is not None:
            with contextlib.suppress(Exception):
                _remove_broker_account(accounts, device_id)
        if isinstance(exc, IntegrityError):
            raise ConflictError(
                f"device {device_id!r} is enrolled already; choose another id or remove it first"
            ) from None
        raise
    _reload_broker(settings.broker.pid_file)
    return AgentBundle(
        device_id=device_id,
        fleet_id=settings.fleet_id,
        target=target,
        tags=merged,
        broker={"url": settings.broker.device_url, "username": device_id, "password": password, "ca_pem": ca_pem},
        updates={
            "metadata_url": settings.metadata_url,
            "targets_url": settings.targets_url,
            "root_json": root_json,
            "signing_keys_pem": signing_keys,
        },
    )


@dataclass(frozen=True)
class DeviceImport:
    """One row of a bulk import: a device id, its target and tags."""

    device_id: str
    target: str
    tags: dict[str, str]


def read_device_csv(path: Path) -> list[DeviceImport]:
    """Read ``device_id,target[,tags]`` rows (a header line naming the columns is required); ``tags`` is
    ``key=value`` pairs separated by ``;``. Raises ``UsageError`` naming the line for a bad row."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if not {"device_id", "target"} <= columns:
            raise UsageError(f"{path}: the first line must name the columns device_id,target[,tags]")
        out = []
        for line, row in enumerate(reader, start=2):
            tags: dict[str, str] = {}
            for pair in filter(None, (p.strip() for p in (row.get("tags") or "").split(";"))):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise UsageError(f"{path}:{line}: tag {pair!r} is not key=value")
                tags[key.strip()] = value.strip()
            out.append(DeviceImport((row.get("device_id") or "").strip(), (row.get("target") or "").strip(), tags))
    return out


def enroll_many(
    ctx: FleetContext, devices: Sequence[DeviceImport], *, actor: str, reload: bool = True
) -> list[AgentBundle]:
    """Enroll many devices at once (an operator's import, no enrollment tokens); returns their bundles.

    What ``enroll`` does per device, done once for all: every row is checked first (id, target, tags,
    duplicates in the list and in the registry; ``UsageError``/``ConflictError`` naming the first bad
    row, nothing changed), then one transaction inserts the devices and their audit rows, the
    password file is rewritten once with every new account (the same per-device ``$7$`` hashes and
    the same ``%u`` ACL: each device reaches only its own topics) and the broker is reloaded once.
    Enrolling 10,000 devices one by one rewrites the password file 10,000 times (quadratic) and
    reloads mosquitto 10,000 times; this costs one PBKDF2 hash per device (docs/fleet.md has the
    measured times). Raises ``ConfigError`` without ``broker.accounts_file``.
    """
    settings = ctx.settings
    accounts = settings.broker.accounts_file
    if accounts is None:
        raise ConfigError("broker.accounts_file is not set: the fleet cannot give devices broker accounts (fleet.yaml)")
    checked: list[DeviceImport] = []
    seen: set[str] = set()
    for i, row in enumerate(devices):
        where = f"device {i + 1} ({row.device_id!r})"
        try:
            check_id("device id", row.device_id)
        except ConfigError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if row.device_id == settings.broker_username:
            raise UsageError(f"{where}: that is the fleet's own broker account; choose another id")
        if row.device_id in seen:
            raise UsageError(f"{where}: listed twice")
        seen.add(row.device_id)
        checked.append(DeviceImport(row.device_id, known_target(row.target), check_tags(row.tags, f"{where} tags")))
    if not checked:
        return []
    ids = [row.device_id for row in checked]
    root_json = ctx.tuf.root_bytes().decode()
    signing_keys = [path.read_text() for path in settings.signing_keys]
    ca_pem = settings.broker.device_ca.read_text() if settings.broker.device_ca is not None else None
    passwords = {device_id: secrets.token_urlsafe(24) for device_id in ids}
    now = ctx.now()
    lines = [broker.password_line(device_id, passwords[device_id]) for device_id in ids]
    with _accounts_lock(accounts):
        try:
            existing = accounts.read_text()
        except FileNotFoundError:
            existing = ""
        with ctx.db.session() as session:
            taken: list[str] = []
            for start in range(0, len(ids), 1000):
                taken += session.scalars(select(Device.id).where(Device.id.in_(ids[start : start + 1000]))).all()
            if taken:
                raise ConflictError(
                    f"{len(taken)} of these devices are enrolled already (first: {sorted(taken)[0]!r}); "
                    "remove them from the list or from the fleet"
                )
            session.execute(
                insert(Device),
                [{"id": r.device_id, "target": r.target, "tags": r.tags, "enrolled_at": now} for r in checked],
            )
            session.execute(
                insert(Audit),
                [
                    {
                        "at": now,
                        "actor": actor[:64],
                        "action": "device.enroll",
                        "subject": f"device:{r.device_id}",
                        "details": {"target": r.target, "tags": r.tags, "import": True},
                    }
                    for r in checked
                ],
            )
            new = set(ids)
            # Leftovers of an import or enrollment that failed after writing the file are replaced.
            kept = [line for line in existing.splitlines() if line and line.split(":", 1)[0] not in new]
            write_private(accounts, ("\n".join(kept + lines) + "\n").encode())
            fsync_dir(accounts.parent)
            try:
                session.commit()
            except BaseException:
                write_private(accounts, existing.encode())
                raise
    if reload:
        _reload_broker(settings.broker.pid_file)
    updates = {
        "metadata_url": settings.metadata_url,
        "targets_url": settings.targets_url,
        "root_json": root_json,
        "signing_keys_pem": signing_keys,
    }
    return [
        AgentBundle(
            device_id=r.device_id,
            fleet_id=settings.fleet_id,
            target=r.target,
            tags=r.tags,
            broker={
                "url": settings.broker.device_url,
                "username": r.device_id,
                "password": passwords[r.device_id],
                "ca_pem": ca_pem,
            },
            updates=updates,
        )
        for r in checked
    ]


def _token_refusal(ctx: FleetContext, token: str, now: float) -> AuthError:
    with ctx.db.session(readonly=True) as session:
        row = session.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token)))
    if row is None:
        return AuthError("the enrollment token is not valid (unknown or mistyped); ask an admin for a new one")
    if row.used_at is not None:
        return AuthError(f"the enrollment token was used already (by {row.used_by}); a token enrolls one device")
    return AuthError("the enrollment token has expired; ask an admin for a new one")


# --------------------------------------------------------------------------- broker accounts


@contextlib.contextmanager
def _accounts_lock(accounts: Path) -> Iterator[None]:
    # Two fleet processes on the broker's host must not both read-modify-write the file.
    fd = os.open(accounts.parent / f".{accounts.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _add_broker_account(accounts: Path, device_id: str, password: str) -> None:
    """Append ``device_id`` to mosquitto's password file (replacing a line left by an enrollment that failed).

    The device row does not exist (the caller checked it in its transaction), so an account with
    this name can only be the leftover of an enrollment that failed after writing it.
    """
    with _accounts_lock(accounts):
        try:
            lines = accounts.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        kept = [line for line in lines if line.split(":", 1)[0] != device_id]
        kept.append(broker.password_line(device_id, password))
        write_private(accounts, ("\n".join(kept) + "\n").encode())
        fsync_dir(accounts.parent)


def _remove_broker_account(accounts: Path, device_id: str) -> None:
    with _accounts_lock(accounts):
        lines = accounts.read_text().splitlines()
        kept = [line for line in lines if line.split(":", 1)[0] != device_id]
        write_private(accounts, ("\n".join(kept) + "\n").encode())


RELOAD_FOLLOW_UP_S = 1.0
"""Enrollment signals the broker again this long after the last account it wrote (see ``_reload_broker``)."""

_follow_ups: dict[Path, threading.Timer] = {}
_follow_ups_lock = threading.Lock()


def _reload_broker(pid_file: Path | None) -> None:
    """SIGHUP the broker so it re-reads the accounts file (no restart, no dropped connections).

    mosquitto clears its reload flag when a reload ends, so a SIGHUP that lands while it is still
    reloading for an earlier enrollment is lost, and that reload may have read the file before
    this account was in it. So the broker is signalled again ``RELOAD_FOLLOW_UP_S`` after the last
    account written (one timer per pid file, pushed back by each enrollment): a reload in progress
    then began after the write and reads it. The timer is not a daemon, so a CLI import waits for
    it before exiting. Without a pid file configured, or when the broker is not running, the
    account takes effect at the broker's next (re)start; a device retries its connection until then.
    """
    if pid_file is None:
        log.warning("broker.pid_file is not set: reload mosquitto yourself so that new device accounts work")
        return
    if not _signal_broker(pid_file):
        return
    with _follow_ups_lock:
        pending = _follow_ups.get(pid_file)
        if pending is not None:
            pending.cancel()
        timer = threading.Timer(RELOAD_FOLLOW_UP_S, _follow_up, (pid_file,))
        timer.name = f"edgeship-broker-reload {pid_file}"
        _follow_ups[pid_file] = timer
        timer.start()


def _follow_up(pid_file: Path) -> None:
    with _follow_ups_lock:
        if _follow_ups.get(pid_file) is threading.current_thread():
            del _follow_ups[pid_file]
    _signal_broker(pid_file)


def _signal_broker(pid_file: Path) -> bool:
    """SIGHUP the mosquitto named in ``pid_file``; False (with a warning) if it cannot be signalled."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        log.warning("cannot read the broker's pid from %s (%s): new device accounts wait for a reload", pid_file, exc)
        return False
    # A stale pid file may name a process that is not mosquitto any more: SIGHUP would end it.
    comm = Path(f"/proc/{pid}/comm")
    if comm.parent.exists():
        try:
            name = comm.read_text().strip()
        except OSError:
            name = ""
        if "mosquitto" not in name:
            log.warning("pid %d in %s is not mosquitto (%r): not signalled", pid, pid_file, name)
            return False
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        log.warning("cannot signal the broker (pid %d): %s; new device accounts wait for a reload", pid, exc)
        return False
    return True


__all__ = [
    "AgentBundle",
    "check_tags",
    "DeviceImport",
    "create_enrollment_token",
    "enroll",
    "enroll_many",
    "enrollment_token_to_json",
    "known_target",
    "list_enrollment_tokens",
    "read_device_csv",
]
