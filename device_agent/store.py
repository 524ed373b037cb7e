"""The model store: two slots (A/B), the active pointer, and the OTA journal, in one durable file.

Layout of the agent's data directory::

    state.json        active slot, what each slot holds, committed versions, quarantine,
                      recent deployment ids, and the journal of the deployment in progress
    slots/A/ slots/B/ unpacked, verified packages (``unpack_package`` output)
    downloads/        partial and complete package downloads
    tuf/              the fleet's TUF metadata the device trusts (python-tuf's cache)
    outbox.sqlite     telemetry and events waiting for the broker
    agent.lock        held by the running agent (one agent per data directory)
    running           present while an agent runs; found at start = the last stop was unclean

The active pointer and the journal live in the same file on purpose: ``state.json`` is
replaced atomically (write a temporary file, fsync it, rename it over, fsync the
directory), so the journal and the pointer can never disagree after a power cut.
Every change of state is written before the work it announces is done.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeship.device_agent import protocol
from edgeship.device_agent.ota import Deployment
from edgeship.errors import EdgeshipError
from edgeship.runtime.durable import write_atomic

SLOTS = ("A", "B")
STATE_SCHEMA = 1
MAX_SEEN = 256


class StateFileError(EdgeshipError):
    """state.json is unreadable or damaged; the agent rebuilds it from the slots."""


@dataclass(frozen=True)
class SlotRecord:
    """What a slot holds: the package's identity and the digest of the manifest verified at install."""

    name: str
    version: int
    digest: str
    target: str
    format: str
    precision: str
    installed_at: float
    deployment_id: str | None = None

    def model_ref(self, slot: str) -> dict[str, Any]:
        """The protocol's ``model`` object for this slot."""
        return protocol.model_ref(self, slot)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "target": self.target,
            "format": self.format,
            "precision": self.precision,
            "installed_at": self.installed_at,
            "deployment_id": self.deployment_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlotRecord:
        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            digest=str(data["digest"]),
            target=str(data["target"]),
            format=str(data["format"]),
            precision=str(data["precision"]),
            installed_at=float(data["installed_at"]),
            deployment_id=data.get("deployment_id"),
        )


@dataclass(frozen=True)
class QuarantineEntry:
    """A model version rolled back on this device: never installed again unless the fleet clears it."""

    name: str
    version: int
    deployment_id: str | None
    reason: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "deployment_id": self.deployment_id,
            "reason": self.reason,
            "at": self.at,
        }


@dataclass(frozen=True)
class AgentState:
    """Everything the agent must remember across restarts; immutable, replaced as a whole."""

    active: str | None = None
    slots: dict[str, SlotRecord | None] = field(default_factory=lambda: dict.fromkeys(SLOTS))
    committed: dict[str, int] = field(default_factory=dict)
    quarantine: tuple[QuarantineEntry, ...] = ()
    seen: tuple[str, ...] = ()
    ota: Deployment | None = None

    @property
    def active_record(self) -> SlotRecord | None:
        return self.slots.get(self.active) if self.active is not None else None

    def inactive_slot(self) -> str:
        """The slot a new package is staged in: the one that is not active."""
        return "B" if self.active == "A" else "A"

    def is_quarantined(self, name: str, version: int) -> QuarantineEntry | None:
        return next((q for q in self.quarantine if q.name == name and q.version == version), None)

    def has_seen(self, deployment_id: str) -> bool:
        return deployment_id in self.seen

    def remember(self, deployment_id: str) -> AgentState:
        """Record a deployment id (for idempotency); keeps the most recent ``MAX_SEEN``."""
        if deployment_id in self.seen:
            return self
        return replace(self, seen=(*self.seen, deployment_id)[-MAX_SEEN:])

    def with_slot(self, slot: str, record: SlotRecord | None) -> AgentState:
        return replace(self, slots={**self.slots, slot: record})

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "active": self.active,
            "slots": {s: (r.to_json() if r is not None else None) for s, r in self.slots.items()},
            "committed": dict(self.committed),
            "quarantine": [q.to_json() for q in self.quarantine],
            "seen": list(self.seen),
            "ota": self.ota.to_json() if self.ota is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentState:
        if data.get("schema") != STATE_SCHEMA:
            raise StateFileError(f"state.json has schema {data.get('schema')!r}, expected {STATE_SCHEMA}")
        active = data.get("active")
        if active is not None and active not in SLOTS:
            raise StateFileError(f"state.json names active slot {active!r}")
        slots_in = data.get("slots") or {}
        slots: dict[str, SlotRecord | None] = {}
        for slot in SLOTS:
            raw = slots_in.get(slot)
            slots[slot] = SlotRecord.from_json(raw) if raw else None
        return cls(
            active=active,
            slots=slots,
            committed={str(k): int(v) for k, v in (data.get("committed") or {}).items()},
            quarantine=tuple(
                QuarantineEntry(
                    str(q["name"]), int(q["version"]), q.get("deployment_id"), str(q.get("reason", "")), float(q["at"])
                )
                for q in data.get("quarantine") or []
            ),
            seen=tuple(str(s) for s in data.get("seen") or []),
            ota=Deployment.from_json(data["ota"]) if data.get("ota") else None,
        )


class StateStore:
    """Reads and durably replaces ``state.json`` in the agent's data directory.

    ``on_save`` (optional) is called with each state after it is durable; the daemon uses it
    to publish transitions only once they are on disk.
    """

    def __init__(self, data_dir: Path, on_save: Callable[[AgentState], None] | None = None) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "state.json"
        self.on_save = on_save

    def slot_dir(self, slot: str) -> Path:
        return self.data_dir / "slots" / slot

    @property
    def downloads(self) -> Path:
        return self.data_dir / "downloads"

    def prepare(self) -> None:
        """Create the directory layout (idempotent)."""
        for path in (self.data_dir, self.data_dir / "slots", self.downloads, self.data_dir / "tuf"):
            path.mkdir(parents=True, exist_ok=True)

    def load(self) -> AgentState:
        """The saved state; a fresh state when none was ever saved. Raises ``StateFileError`` when damaged."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        except OSError as exc:
            raise StateFileError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return AgentState.from_json(data)
        except StateFileError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise StateFileError(f"{self.path} is damaged ({exc})") from None

    def save(self, state: AgentState) -> None:
        """Replace ``state.json`` durably (temp file, fsync, rename, fsync directory)."""
        data = json.dumps(state.to_json(), indent=1, sort_keys=True).encode()
        write_atomic(self.path, data)
        if self.on_save is not None:
            self.on_save(state)


def now() -> float:
    return time.time()


def boot_id() -> str | None:
    """The kernel's boot id (Linux), to tell a power cut or reboot from a crash of the agent alone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
