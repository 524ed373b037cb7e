"""The scheduler: advances rollouts, exactly once, from any number of fleet processes.

Every ``tick`` the scheduler looks at the rollouts that need work and *leases* each one before
touching it: an ``UPDATE ... WHERE lease expired or ours`` that only one process can win (the
same statement works on SQLite and PostgreSQL). The lease holder then, in one transaction:

1. starts a pending rollout, adds devices that enrolled since and match its selector;
2. asks ``rollout_logic.decide`` what to do with the current wave and records it: devices to
   command (state ``commanded``, a deterministic deployment id ``r<rollout>-<device>``), devices
   timed out, the wave done, the wave judged against its gates;
3. halts a wave that breaches a gate and rolls it back (state ``rolling_back``): the previous
   package is re-published with the fleet's signed permission to go down to it
   (TUF ``downgrade_from``), the wave's devices that committed are commanded to install it, and
   the new version is quarantined for them;
4. bumps the rollout's ``revision``; commits.

Only after the commit are the commands published over MQTT. A process killed between the commit
and the publish leaves devices ``commanded`` that never heard of it: any process re-sends a
command nobody answered after ``resend_after_s``, with the same deployment id, which the agent
executes at most once. So a device is never commanded twice to different versions, and a wave is
advanced exactly once.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from edgeship.device_agent import protocol
from edgeship.fleet import rollout_logic as logic
from edgeship.fleet.ingest import TERMINAL_OTA
from edgeship.fleet.models import Audit, Device, DeviceQuarantine, Package, Rollout, RolloutDevice, Telemetry

log = logging.getLogger("edgeship.fleet.scheduler")

WORK_STATES = ("pending", "running", "rolling_back")


@dataclass(frozen=True)
class Command:
    """A deploy command to publish once the transaction that decided it is committed."""

    device_id: str
    deployment_id: str
    target_path: str
    options: dict[str, Any]
    expiry_s: int


Publish = Callable[[Sequence[Command]], None]
Sessions = Callable[[], AbstractContextManager[Session]]
"""Opens a session as a context manager (``fleet.db.Database.session``, or a sessionmaker)."""


def deployment_id(rollout_id: int, device_id: str, revert: bool = False) -> str:
    return f"r{rollout_id}-{'revert-' if revert else ''}{device_id}"[:64]


class Scheduler:
    """Runs ``tick`` periodically (the service's thread); ``owner`` names this process in leases."""

    def __init__(
        self,
        session_factory: Sessions,
        publish: Publish,
        *,
        repo: Any,
        owner: str | None = None,
        lease_s: float = 15.0,
        resend_after_s: float = 30.0,
        early_check_s: float = 5.0,
        compatible: Callable[[str], Sequence[str]] = lambda target: (),
    ) -> None:
        self.session_factory = session_factory
        self.publish = publish
        self.repo = repo
        self.owner = owner or f"fleet-{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s
        self.resend_after_s = resend_after_s
        self.early_check_s = early_check_s
        self._watched: dict[int, float] = {}
        self.compatible = compatible

    # ----------------------------------------------------------------- the tick

    def tick(self, now: float | None = None) -> int:
        """Work on every rollout that needs it and that this process can lease; returns how many it advanced."""
        now = time.time() if now is None else now
        with self.session_factory() as session:
            ids = session.scalars(select(Rollout.id).where(Rollout.state.in_(WORK_STATES)).order_by(Rollout.id)).all()
        worked = 0
        for rollout_id in ids:
            if not self._lease(rollout_id, now):
                continue
            commands = self._work(rollout_id, now)
            if commands:
                self.publish(commands)
            worked += 1
        return worked

    def _lease(self, rollout_id: int, now: float) -> bool:
        with self.session_factory() as session:
            result = session.execute(
                update(Rollout)
                .where(
                    Rollout.id == rollout_id,
                    or_(Rollout.lease_owner.is_(None), Rollout.lease_owner == self.owner, Rollout.lease_until < now),
                )
                .values(lease_owner=self.owner, lease_until=now + self.lease_s)
            )
            session.commit()
            return bool(getattr(result, "rowcount", 0))

    def release(self) -> None:
        """Give up this process's leases (a clean stop), so another process takes over at once."""
        with self.session_factory() as session:
            session.execute(
                update(Rollout).where(Rollout.lease_owner == self.owner).values(lease_owner=None, lease_until=None)
            )
            session.commit()

    # ----------------------------------------------------------------- one rollout

    def _work(self, rollout_id: int, now: float) -> list[Command]:
        with self.session_factory() as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None or rollout.lease_owner != self.owner or rollout.state not in WORK_STATES:
                return []
            package = session.get(Package, rollout.package_id)
            assert package is not None
            commands: list[Command] = []
            if rollout.state == "pending":
                rollout.state, rollout.current_wave, rollout.wave_started_at = "running", 0, now
                self._audit(session, now, "rollout.started", rollout, {})
            if rollout.state == "running":
                self._add_late_devices(session, rollout, package, now)
                commands += self._advance(session, rollout, package, now)
            if rollout.state == "rolling_back":
                commands += self._roll_back(session, rollout, package, now)
            commands += self._resend(session, rollout, package, now)
            rollout.updated_at = now
            rollout.revision += 1
            session.commit()
            return commands

    def _add_late_devices(self, session: Session, rollout: Rollout, package: Package, now: float) -> None:
        """Devices that enrolled (or got matching tags) after the rollout was created join the current wave."""
        known = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
        quarantined = select(DeviceQuarantine.device_id).where(DeviceQuarantine.package_id == package.id)
        # One device, one unfinished rollout: a device another rollout still works on waits for it to end.
        elsewhere = (
            select(RolloutDevice.device_id)
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(Rollout.id != rollout.id, Rollout.state.not_in(tuple(logic.ENDED_ROLLOUT)))
        )
        candidates = session.scalars(
            select(Device).where(Device.id.not_in(known), Device.id.not_in(quarantined), Device.id.not_in(elsewhere))
        ).all()
        compatible = self.compatible(package.target)
        wave = logic.late_wave(rollout.current_wave, len(rollout.waves) - 1, rollout.state)
        for device in candidates:
            if logic.matches(rollout.selector, device.target, device.tags, package.target, compatible):
                session.add(RolloutDevice(rollout_id=rollout.id, device_id=device.id, wave=wave, state="pending"))
                self._audit(session, now, "rollout.device_joined", rollout, {"device": device.id, "wave": wave})

    def _view(self, session: Session, rollout: Rollout, now: float) -> tuple[logic.RolloutView, list[logic.DeviceView]]:
        rows = session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)).all()
        recent = sum(1 for r in rows if r.commanded_at is not None and now - r.commanded_at < 60.0)
        view = logic.RolloutView(
            state=rollout.state,
            current_wave=rollout.current_wave,
            wave_count=len(rollout.waves),
            soak_s=rollout.soak_s,
            device_timeout_s=rollout.device_timeout_s,
            max_per_minute=rollout.max_per_minute,
            require_approval=rollout.require_approval,
            wave_done_at=rollout.wave_done_at,
            commanded_last_minute=recent,
        )
        return view, [logic.DeviceView(r.device_id, r.wave, r.state, r.commanded_at) for r in rows]

    def _advance(self, session: Session, rollout: Rollout, package: Package, now: float) -> list[Command]:
        commands: list[Command] = []
        for _ in range(len(rollout.waves) + 1):  # a wave with nothing to do is judged at once
            view, devices = self._view(session, rollout, now)
            decision = logic.decide(view, devices, now)
            # One executemany per kind of change: a wave of thousands of devices is thousands of rows.
            self._set_devices(
                session,
                rollout.id,
                [{"b_device": d} for d in decision.time_out],
                state="timed_out",
                finished_at=now,
                code="timeout",
                message=f"no outcome within {rollout.device_timeout_s:g} s",
            )
            self._set_devices(
                session,
                rollout.id,
                [{"b_device": d, "b_deployment_id": deployment_id(rollout.id, d)} for d in decision.command],
                state="commanded",
                deployment_id=bindparam("b_deployment_id"),
                commanded_at=now,
                sent_at=now,
            )
            for device_id in decision.command:
                dep = deployment_id(rollout.id, device_id)
                commands.append(self._command(rollout, package.target_path, device_id, dep))
            if decision.mark_wave_done:
                rollout.wave_done_at = now
            if decision.watch:
                self._watch(session, rollout, package, now)
                return commands
            if not decision.judge_wave:
                return commands
            stats = self.wave_stats(session, rollout, package, rollout.current_wave)
            breaches = logic.judge(logic.Gates.from_json(rollout.gates), stats)
            self._record_judgement(session, rollout, stats, breaches, now, early=False)
            state, wave = logic.after_judgement(view, breaches)
            if state == "halted":
                self._halt(session, rollout, breaches, now, early=False)
                return commands
            if state == "completed":
                rollout.state = "completed"
                self._audit(session, now, "rollout.completed", rollout, {})
                return commands
            if state == "waiting_approval":
                rollout.state = "waiting_approval"
                return commands
            rollout.current_wave, rollout.wave_started_at, rollout.wave_done_at = wave, now, None
        return commands

    def _watch(self, session: Session, rollout: Rollout, package: Package, now: float) -> None:
        """Look for an early halt in a running or soaking wave (``rollout_logic.judge_early``), at most every
        ``early_check_s`` per rollout: the telemetry queries cover thousands of devices in a late wave."""
        gates = logic.Gates.from_json(rollout.gates)
        if not gates.early_halt or now - self._watched.get(rollout.id, -math.inf) < self.early_check_s:
            return
        self._watched[rollout.id] = now
        soaking = rollout.wave_done_at is not None
        stats = self.wave_stats(session, rollout, package, rollout.current_wave, telemetry=soaking)
        breaches = logic.judge_early(gates, stats, soaking)
        if breaches:
            self._record_judgement(session, rollout, stats, breaches, now, early=True)
            self._halt(session, rollout, breaches, now, early=True)

    def _record_judgement(
        self,
        session: Session,
        rollout: Rollout,
        stats: logic.WaveStats,
        breaches: Sequence[logic.Breach],
        now: float,
        early: bool,
    ) -> None:
        rollout.gate_values = {
            **(rollout.gate_values or {}),
            str(rollout.current_wave): {k: v for k, v in logic.gate_values(stats).items()},
        }
        self._audit(
            session,
            now,
            "rollout.wave_judged",
            rollout,
            {"wave": rollout.current_wave, "breaches": [b.describe() for b in breaches], "early": early},
        )

    def _halt(
        self, session: Session, rollout: Rollout, breaches: Sequence[logic.Breach], now: float, early: bool
    ) -> None:
        when = " (early: before the wave's soak ended)" if early else ""
        rollout.halt_reason = f"wave {rollout.current_wave + 1}{when}: " + "; ".join(b.describe() for b in breaches)
        rollout.state = "rolling_back"
        self._audit(session, now, "rollout.halted", rollout, {"reason": rollout.halt_reason})

    def _roll_back(self, session: Session, rollout: Rollout, package: Package, now: float) -> list[Command]:
        """Send the wave's devices that committed the new version back to the version each had."""
        commands: list[Command] = []
        wave_rows = session.scalars(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave <= rollout.current_wave
            )
        ).all()
        # One query for what is quarantined already (a halted late wave holds thousands of devices).
        quarantined = set(
            session.scalars(select(DeviceQuarantine.device_id).where(DeviceQuarantine.package_id == package.id))
        )
        for row in wave_rows:
            if row.device_id not in quarantined and row.state != "pending":
                quarantined.add(row.device_id)
                session.add(
                    DeviceQuarantine(device_id=row.device_id, package_id=package.id, rollout_id=rollout.id, at=now)
                )
        # Devices of later waves are never commanded.
        session.execute(
            update(RolloutDevice)
            .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.state == "pending")
            .values(state="skipped", code="halted")
        )
        permitted: set[int] = set()
        for row in wave_rows:
            if row.state != "COMMITTED":
                continue
            previous = session.get(Package, row.previous_package_id) if row.previous_package_id else None
            if previous is None:
                row.state, row.code = "revert_failed", "no_previous_version"
                row.message = "the device had no earlier package from this fleet to go back to"
                continue
            if previous.id not in permitted:
                self._permit_downgrade(previous, package.version)
                permitted.add(previous.id)
            dep = deployment_id(rollout.id, row.device_id, revert=True)
            row.state, row.revert_deployment_id, row.commanded_at, row.sent_at = "reverting", dep, now, now
            commands.append(self._command(rollout, previous.target_path, row.device_id, dep, revert=True))
        busy = [r for r in wave_rows if r.state in ("commanded", "reverting")]
        for row in busy:
            if row.commanded_at is not None and now - row.commanded_at > rollout.device_timeout_s:
                row.state, row.code, row.finished_at = (
                    ("timed_out" if row.state == "commanded" else "revert_failed"),
                    "timeout",
                    now,
                )
        if not any(r.state in ("commanded", "reverting") for r in wave_rows):
            rollout.state = "rolled_back"
            self._audit(session, now, "rollout.rolled_back", rollout, {"reason": rollout.halt_reason})
        return commands

    def _permit_downgrade(self, previous: Package, bad_version: int) -> None:
        """Re-sign the previous package's TUF entry so that devices on ``bad_version`` may go down to it."""
        listed = self.repo.list_targets().get(previous.target_path)
        custom = dict(listed.custom) if listed is not None and isinstance(listed.custom, dict) else {}
        meta = dict(custom.get("edgeship") or {})
        allowed = sorted({*meta.get("downgrade_from", []), bad_version})
        if meta.get("downgrade_from") == allowed:
            return
        meta["downgrade_from"] = allowed
        self.repo.set_custom(previous.target_path, {**custom, "edgeship": meta})

    def _resend(self, session: Session, rollout: Rollout, package: Package, now: float) -> list[Command]:
        """Commands nobody answered (lost with a killed process, or before the device's session existed)."""
        stale = session.scalars(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout.id,
                RolloutDevice.state.in_(("commanded", "reverting")),
                RolloutDevice.sent_at < now - self.resend_after_s,
            )
        ).all()
        commands: list[Command] = []
        if not stale:
            return commands
        # Working on it: it reports this deployment in a state that is not final. One that reports
        # it finished while the row still waits lost its outcome on the way (a fleet process died
        # with it); the same command again makes the agent repeat where it is (code "duplicate").
        # One query for all of them (a wave of thousands re-sent at once asked once per device).
        working: set[tuple[str, str | None]] = set()
        ids = [row.device_id for row in stale]
        for start in range(0, len(ids), 1000):
            working.update(
                (d, dep)
                for d, dep in session.execute(
                    select(Device.id, Device.ota_deployment).where(
                        Device.id.in_(ids[start : start + 1000]), Device.ota_state.not_in(TERMINAL_OTA)
                    )
                ).all()
            )
        for row in stale:
            if (row.device_id, row.revert_deployment_id or row.deployment_id) in working:
                continue
            row.sent_at = now
            if row.state == "reverting" and row.previous_package_id:
                previous = session.get(Package, row.previous_package_id)
                if previous is not None and row.revert_deployment_id:
                    commands.append(
                        self._command(
                            rollout, previous.target_path, row.device_id, row.revert_deployment_id, revert=True
                        )
                    )
            elif row.deployment_id:
                commands.append(self._command(rollout, package.target_path, row.device_id, row.deployment_id))
        return commands

    # ----------------------------------------------------------------- gates

    def wave_stats(
        self, session: Session, rollout: Rollout, package: Package, wave: int, telemetry: bool = True
    ) -> logic.WaveStats:
        """The numbers a wave is judged on: its devices' outcomes, and (``telemetry``) telemetry since the wave
        started from its devices (on the new version) against the control group (devices still on the old one)."""
        rows = session.scalars(
            select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave == wave)
        ).all()
        by_state: dict[str, int] = {}
        for row in rows:
            by_state[row.state] = by_state.get(row.state, 0) + 1
        wave_devices = [r.device_id for r in rows if r.state == "COMMITTED"]
        outcomes = {
            "total": len(rows),
            "committed": by_state.get("COMMITTED", 0),
            "failed": by_state.get("FAILED", 0),
            "rolled_back": by_state.get("ROLLED_BACK", 0),
            "timed_out": by_state.get("timed_out", 0),
        }
        if not telemetry:
            return logic.WaveStats(**outcomes)
        control = session.scalars(
            select(RolloutDevice.device_id).where(
                RolloutDevice.rollout_id == rollout.id, RolloutDevice.state.in_(("pending", "skipped"))
            )
        ).all()
        since = rollout.wave_started_at or 0.0
        wave_t = self._telemetry(session, wave_devices, since, version=package.version)
        # The control group: devices of the selection not (yet) on the new version, measured on what they run.
        control_t = self._telemetry(session, list(control), since, exclude_version=package.version)
        return logic.WaveStats(
            **outcomes,
            reporting=int(wave_t["reporting"] or 0),
            error_rate=wave_t["error_rate"],
            control_error_rate=control_t["error_rate"],
            p99_ms=wave_t["p99_ms"],
            control_p99_ms=control_t["p99_ms"],
            drift_psi=wave_t["drift_psi"],
        )

    @staticmethod
    def _telemetry(
        session: Session,
        devices: Sequence[str],
        since: float,
        version: int | None = None,
        exclude_version: int | None = None,
    ) -> dict[str, float | None]:
        if not devices:
            return {"error_rate": None, "p99_ms": None, "drift_psi": None, "reporting": 0}
        conditions = [Telemetry.device_id.in_(devices), Telemetry.ts >= since]
        if version is not None:
            conditions.append(Telemetry.model_version == version)
        if exclude_version is not None:
            conditions.append(Telemetry.model_version != exclude_version)
        requests, errors, p99, psi, reporting = session.execute(
            select(
                func.sum(Telemetry.requests),
                func.sum(Telemetry.errors),
                func.avg(Telemetry.p99_ms),
                func.max(Telemetry.drift_psi),
                func.count(func.distinct(Telemetry.device_id)),
            ).where(and_(*conditions))
        ).one()
        return {
            "error_rate": (float(errors or 0) / float(requests)) if requests else None,
            "p99_ms": float(p99) if p99 is not None else None,
            "drift_psi": float(psi) if psi is not None else None,
            "reporting": float(reporting or 0),
        }

    # ----------------------------------------------------------------- helpers

    def _command(self, rollout: Rollout, target_path: str, device_id: str, dep: str, revert: bool = False) -> Command:
        options = {k: v for k, v in (rollout.deploy or {}).items() if k in ("validation", "shadow", "health")}
        if revert:
            options.pop("shadow", None)  # going back to a known model: no shadow phase
        return Command(device_id, dep, target_path, options, int(max(rollout.device_timeout_s, 60)))

    @staticmethod
    def _set_devices(session: Session, rollout_id: int, params: list[dict[str, Any]], **values: Any) -> None:
        """Set ``values`` on the rows of the devices in ``params`` (``b_device``, and any bound values)."""
        if not params:
            return
        rd = cast(Table, RolloutDevice.__table__)
        session.execute(
            update(rd).where(rd.c.rollout_id == rollout_id, rd.c.device_id == bindparam("b_device")).values(**values),
            params,
        )

    def _audit(self, session: Session, now: float, action: str, rollout: Rollout, details: dict[str, Any]) -> None:
        session.add(
            Audit(
                at=now, actor=f"scheduler:{self.owner}", action=action, subject=f"rollout/{rollout.id}", details=details
            )
        )


def deploy_message(command: Command, issued_at: float) -> bytes:
    """The MQTT payload of a command (protocol ``deploy``)."""
    message = protocol.deploy_command(
        f"cmd-{uuid.uuid4().hex[:12]}",
        command.deployment_id,
        command.target_path,
        issued_at,
        expires_at=issued_at + command.expiry_s,
        **command.options,
    )
    return protocol.encode(message)
