"""Retention: per-minute and per-hour telemetry roll-ups, maintenance leases, and an index on telemetry.ts.

Creating ``ix_telemetry_ts`` reads the whole telemetry table once (PostgreSQL blocks writes to it
meanwhile: a few seconds per million rows).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROLLUPS = ("telemetry_minute", "telemetry_hour")


def upgrade() -> None:
    op.create_table(
        "maintenance_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    for table in _ROLLUPS:
        op.create_table(
            table,
            sa.Column("device_id", sa.String(length=64), nullable=False),
            sa.Column("bucket", sa.Float(), nullable=False),
            sa.Column("n", sa.Integer(), nullable=False),
            sa.Column("requests", sa.BigInteger(), nullable=False),
            sa.Column("errors", sa.BigInteger(), nullable=False),
            sa.Column("p99_sum", sa.Float(), nullable=False),
            sa.Column("p99_n", sa.Integer(), nullable=False),
            sa.Column("p99_max", sa.Float(), nullable=True),
            sa.Column("drift_max", sa.Float(), nullable=True),
            sa.Column("cpu_sum", sa.Float(), nullable=False),
            sa.Column("cpu_n", sa.Integer(), nullable=False),
            sa.Column("cpu_max", sa.Float(), nullable=True),
            sa.Column("rss_sum", sa.Float(), nullable=False),
            sa.Column("rss_n", sa.Integer(), nullable=False),
            sa.Column("rss_max", sa.Float(), nullable=True),
            sa.Column("temperature_sum", sa.Float(), nullable=False),
            sa.Column("temperature_n", sa.Integer(), nullable=False),
            sa.Column("temperature_max", sa.Float(), nullable=True),
            sa.PrimaryKeyConstraint("device_id", "bucket"),
        )
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(f"ix_{table}_bucket", ["bucket"], unique=False)
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_ts", ["ts"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_ts")
    for table in _ROLLUPS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_bucket")
        op.drop_table(table)
    op.drop_table("maintenance_leases")
