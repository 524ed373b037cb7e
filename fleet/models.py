"""The fleet manager's database: SQLAlchemy 2 models, for SQLite (one machine) and PostgreSQL (several).

Schema changes go through Alembic (``fleet/migrations/``); ``fleet.db.migrate`` applies them.
Every table is written by code in one module, named in the table's docstring:

* devices, enrollment_tokens: ``fleet.enrollment`` (and ``fleet.ingest`` for the device's live state)
* api_tokens: ``fleet.auth``
* packages: ``fleet.packages``
* rollouts, rollout_devices, device_quarantine: ``fleet.scheduler`` (plans from ``fleet.rollout_logic``)
* events, telemetry: ``fleet.ingest``
* alerts: ``fleet.alerts``
* telemetry_minute, telemetry_hour, maintenance_leases: ``fleet.retention``
* audit: every module that changes something on behalf of a person or a token

Timestamps are UTC seconds since the epoch (float): the protocol's unit, cheap to compare
in SQL, the same on both databases.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Device(Base):
    """An enrolled device: identity and tags (enrollment) and its latest reported state (ingest)."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(64))
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enrolled_at: Mapped[float] = mapped_column(Float)
    # Live state, from the status/telemetry/events topics.
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model_slot: Mapped[str | None] = mapped_column(String(1), nullable=True)
    model_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ota_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ota_deployment: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=-1)
    seq_gaps: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    latest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The last telemetry's numbers (latency, errors, system, drift), for lists and gates."""

    __table_args__ = (Index("ix_devices_target", "target"),)


class EnrollmentToken(Base):
    """A one-time token that lets a device enroll (stored hashed; the tags and target it grants)."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    target: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64))
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ApiToken(Base):
    """A token for the API and the CLI: ``read`` or ``admin``; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Package(Base):
    """A pushed, verified model package: its identity, where it is stored, its TUF target path."""

    __tablename__ = "packages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    target: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(32))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    target_path: Mapped[str] = mapped_column(String(512), unique=True)
    storage_key: Mapped[str] = mapped_column(String(512))
    requirements: Mapped[dict[str, Any]] = mapped_column(default=dict)
    pushed_at: Mapped[float] = mapped_column(Float)
    pushed_by: Mapped[str] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint("name", "target", "precision", "version", name="uq_package_identity"),)


class Rollout(Base):
    """A rollout of one package to the devices its selector matches, in waves, with gates.

    ``lease_owner``/``lease_until``: the scheduler process working on it (a lease, so that any
    number of fleet processes may run and a killed one is replaced after the lease expires).
    ``revision`` is bumped by every state change (optimistic concurrency).
    """

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    package_id: Mapped[int] = mapped_column(ForeignKey("packages.id"))
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)
    waves: Mapped[list[Any]] = mapped_column(default=list)
    soak_s: Mapped[float] = mapped_column(Float, default=0.0)
    max_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    device_timeout_s: Mapped[float] = mapped_column(Float, default=900.0)
    gates: Mapped[dict[str, Any]] = mapped_column(default=dict)
    deploy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """What each deploy command carries besides the target (validation, shadow, health)."""
    require_approval: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(32), default="pending")
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    wave_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    wave_done_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    halt_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    gate_values: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[float] = mapped_column(Float)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_rollouts_state", "state"),)


class RolloutDevice(Base):
    """One device in one rollout: its wave, the deployment id commanded, how it ended."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32), default="pending")
    deployment_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    previous_package_id: Mapped[int | None] = mapped_column(ForeignKey("packages.id"), nullable=True)
    commanded_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    """When the command was last published (it is published again, same deployment id, if nothing is heard)."""
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    revert_deployment_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)

    __table_args__ = (Index("ix_rollout_devices_wave", "rollout_id", "wave", "state"),)


class DeviceQuarantine(Base):
    """A package version the fleet must never assign to a device again (its wave was rolled back)."""

    __tablename__ = "device_quarantine"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    package_id: Mapped[int] = mapped_column(ForeignKey("packages.id"), primary_key=True)
    rollout_id: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id"), nullable=True)
    at: Mapped[float] = mapped_column(Float)


class Event(Base):
    """An event a device sent (protocol ``event`` messages), kept as a time series."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    event: Mapped[str] = mapped_column(String(32))
    deployment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        # A redelivered message (QoS 1 is at least once) is the same (device, seq): stored once.
        UniqueConstraint("device_id", "seq", name="uq_events_device_seq"),
        Index("ix_events_device_ts", "device_id", "ts"),
        Index("ix_events_deployment", "deployment_id"),
    )


class Telemetry(Base):
    """One telemetry message's numbers, kept as a time series (raw; rolled up by the retention job)."""

    __tablename__ = "telemetry"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    ts: Mapped[float] = mapped_column(Float)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    requests: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    drift_psi: Mapped[float | None] = mapped_column(Float, nullable=True)
    cpu_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    rss_mib: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
        Index("ix_telemetry_device_ts", "device_id", "ts"),
        # Retention (rows older than a cutoff) and alerts (drift in the last minutes) select by time alone.
        Index("ix_telemetry_ts", "ts"),
    )


class Audit(Base):
    """Who did what, when: every change made through the API, the CLI or the scheduler."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (Index("ix_audit_at", "at"),)


class Alert(Base):
    """A condition someone should look at: a device offline, drift over the threshold, a halted rollout.

    ``kind`` is ``device_offline``, ``drift`` or ``rollout_halted``; ``subject`` names what it is
    about (``device/<id>``, ``rollout/<id>``). Opened when the condition starts, resolved
    (``resolved_at`` set) when it clears; at most one open alert per (kind, subject), which a
    partial unique index enforces on both databases.
    """

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(256))
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    opened_at: Mapped[float] = mapped_column(Float)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index(
            "uq_alerts_open",
            "kind",
            "subject",
            unique=True,
            sqlite_where=text("resolved_at IS NULL"),
            postgresql_where=text("resolved_at IS NULL"),
        ),
        Index("ix_alerts_resolved_at", "resolved_at"),
    )


class _TelemetryRollup:
    """Raw telemetry of one device in one time bucket, summed (``fleet.retention`` adds batches into it).

    Sums and counts, not means, so that batches and late messages add up exactly; ``mean(name)``
    gives a mean. Maxima ignore missing values.
    """

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[float] = mapped_column(Float, primary_key=True)
    """The bucket's start (UTC seconds, a multiple of its length)."""
    n: Mapped[int] = mapped_column(Integer)
    """Telemetry messages rolled up into it."""
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    p99_sum: Mapped[float] = mapped_column(Float, default=0.0)
    p99_n: Mapped[int] = mapped_column(Integer, default=0)
    p99_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    drift_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    cpu_sum: Mapped[float] = mapped_column(Float, default=0.0)
    cpu_n: Mapped[int] = mapped_column(Integer, default=0)
    cpu_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    rss_sum: Mapped[float] = mapped_column(Float, default=0.0)
    rss_n: Mapped[int] = mapped_column(Integer, default=0)
    rss_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_sum: Mapped[float] = mapped_column(Float, default=0.0)
    temperature_n: Mapped[int] = mapped_column(Integer, default=0)
    temperature_max: Mapped[float | None] = mapped_column(Float, nullable=True)

    def mean(self, name: str) -> float | None:
        """The mean of ``p99``, ``cpu``, ``rss`` or ``temperature`` over the messages that had it."""
        n = getattr(self, f"{name}_n")
        return getattr(self, f"{name}_sum") / n if n else None


class TelemetryMinute(_TelemetryRollup, Base):
    """Telemetry per device per minute, kept after the raw rows are deleted (``retention.minute``)."""

    __tablename__ = "telemetry_minute"
    __table_args__ = (Index("ix_telemetry_minute_bucket", "bucket"),)


class TelemetryHour(_TelemetryRollup, Base):
    """Telemetry per device per hour (``retention.hour``)."""

    __tablename__ = "telemetry_hour"
    __table_args__ = (Index("ix_telemetry_hour_bucket", "bucket"),)


class MaintenanceLease(Base):
    """Which fleet process runs a maintenance job (``retention``) until when: one at a time, taken over
    when the holder dies (the lease expires)."""

    __tablename__ = "maintenance_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    until: Mapped[float] = mapped_column(Float)
