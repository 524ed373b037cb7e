"""Alembic migrations of the fleet database (``fleet.db.migrate`` applies them; docs/fleet.md says how to add one)."""
