"""Fleet states for the dashboard's tests and ``benchmarks/dashboard.py``, written straight into the database.

``seed_devices`` bulk-inserts devices (a mix of versions, slots, online and offline) and their
telemetry; ``seed_halted_rollout`` writes a rollout the way the scheduler leaves one whose first wave
breached the latency gate: the gate values and the halt reason come from ``fleet.rollout_logic``'s
own ``gate_values`` and ``judge``, the later waves' devices are skipped (code ``halted``) and the
first wave's are being reverted.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert

from edgeship.fleet.context import FleetContext
from edgeship.fleet.models import Device, Package, Rollout, RolloutDevice, Telemetry
from edgeship.fleet.rollout_logic import Gates, WaveStats, assign_waves, gate_values, judge, parse_waves
from edgeship.fleet.rollouts import check_gates

TARGET = "linux-x86_64"
_BATCH = 5000


def device_id(i: int) -> str:
    return f"dev-{i:05d}"


def seed_devices(
    ctx: FleetContext, count: int, *, telemetry_per_device: int = 0, now: float, interval_s: float = 60.0, seed: int = 1
) -> list[str]:
    """Insert ``count`` devices (ids ``dev-00000``...) and ``telemetry_per_device`` telemetry rows each.

    Every seventh device is offline; a third run v1 in slot A, the rest v2 in slot B.
    """
    rng = random.Random(seed)
    ids = [device_id(i) for i in range(count)]
    devices: list[dict[str, Any]] = []
    for i, dev in enumerate(ids):
        version = 1 if i % 3 == 0 else 2
        p50, p99 = 4.0 + rng.random(), 9.0 + 3 * rng.random()
        devices.append(
            {
                "id": dev,
                "target": TARGET,
                "tags": {"site": f"plant-{i % 4}"},
                "enrolled_at": now - 86400,
                "online": i % 7 != 0,
                "last_seen": now - (3600 if i % 7 == 0 else 30),
                "model_name": "digits",
                "model_version": version,
                "model_slot": "A" if version == 1 else "B",
                "model_digest": hashlib.sha256(f"digits-{version}".encode()).hexdigest(),
                "ota_state": "COMMITTED",
                "last_seq": telemetry_per_device - 1,
                "latest": {"latency": {"p50_ms": p50, "p99_ms": p99}, "requests": 100, "errors": 0},
            }
        )
    with ctx.db.session() as session:
        for start in range(0, len(devices), _BATCH):
            session.execute(insert(Device), devices[start : start + _BATCH])
        rows: list[dict[str, Any]] = []
        for dev in ids:
            for seq in range(telemetry_per_device):
                rows.append(_telemetry(rng, dev, seq, now - (telemetry_per_device - seq) * interval_s))
                if len(rows) >= _BATCH:
                    session.execute(insert(Telemetry), rows)
                    rows = []
        if rows:
            session.execute(insert(Telemetry), rows)
    return ids


def _telemetry(rng: random.Random, dev: str, seq: int, ts: float) -> dict[str, Any]:
    p50 = 4.0 + rng.random()
    return {
        "device_id": dev,
        "seq": seq,
        "ts": ts,
        "model_version": 2,
        "requests": 100,
        "errors": rng.choice((0, 0, 0, 1)),
        "p50_ms": p50,
        "p99_ms": p50 * 2.2 + rng.random(),
        "drift_psi": 0.02 + 0.01 * rng.random(),
        "cpu_percent": 20 + 10 * rng.random(),
        "rss_mib": 120 + rng.random(),
        "temperature_c": 45 + 5 * rng.random(),
    }


def seed_package(ctx: FleetContext, *, version: int = 3, now: float) -> int:
    """A package row (digits v``version`` for linux-x86_64), as if pushed; returns its id."""
    digest = hashlib.sha256(f"digits-{version}".encode()).hexdigest()
    with ctx.db.session() as session:
        row = Package(
            name="digits",
            version=version,
            target=TARGET,
            format="tflite",
            precision="int8",
            manifest_sha256=digest,
            size=123456,
            target_path=f"digits/{digest}.digits-v{version}.edgepkg",
            storage_key=f"{digest}.edgepkg",
            requirements={},
            pushed_at=now,
            pushed_by="token:root",
        )
        session.add(row)
        session.flush()
        return int(row.id)


def seed_halted_rollout(ctx: FleetContext, device_ids: Sequence[str], *, now: float) -> int:
    """A rollout of a new package to ``device_ids`` halted in wave 1 by the latency gate (state ``rolling_back``).

    Returns its id. Waves 10%, 50%, 100%; in wave 1 one device timed out, the others committed and are
    being reverted (half of them done); the devices of later waves were never commanded.
    """
    package_id = seed_package(ctx, now=now)
    waves = ["10%", "50%", "100%"]
    gates = check_gates({"max_latency_p99_ratio": 2.0})
    with ctx.db.session() as session:
        rollout = Rollout(
            name="digits v3 (linux-x86_64/int8)",
            package_id=package_id,
            selector={},
            waves=waves,
            soak_s=60.0,
            device_timeout_s=900.0,
            gates=gates,
            deploy={},
            require_approval=False,
            state="rolling_back",
            current_wave=0,
            wave_started_at=now - 300,
            wave_done_at=now - 120,
            gate_values={},
            created_at=now - 400,
            created_by="token:root",
            updated_at=now - 60,
            revision=5,
        )
        session.add(rollout)
        session.flush()
        assignment = assign_waves(device_ids, parse_waves(waves), salt=f"rollout-{rollout.id}")
        first = sorted(d for d, w in assignment.items() if w == 0)
        rows = []
        for dev, wave in sorted(assignment.items()):
            if wave > 0:
                rows.append({"state": "skipped", "code": "halted", "message": "the rollout was halted"})
            elif dev == first[0]:
                rows.append({"state": "timed_out", "code": "timeout", "message": "no outcome within 900 s"})
            elif first.index(dev) % 2:
                rows.append({"state": "reverted", "code": None, "message": None})
            else:
                rows.append({"state": "reverting", "code": None, "message": None})
            commanded = wave == 0
            rows[-1].update(
                rollout_id=rollout.id,
                device_id=dev,
                wave=wave,
                deployment_id=f"r{rollout.id}-{dev}" if commanded else None,
                commanded_at=now - 290 if commanded else None,
                sent_at=now - 290 if commanded else None,
                finished_at=now - 200 if commanded else now - 120,
            )
        session.execute(insert(RolloutDevice), rows)
        stats = WaveStats(
            total=len(first),
            committed=len(first) - 1,
            timed_out=1,
            error_rate=0.004,
            control_error_rate=0.003,
            p99_ms=31.0,
            control_p99_ms=10.0,
            drift_psi=0.04,
        )
        breaches = judge(Gates.from_json(gates), stats)
        rollout.gate_values = {"0": gate_values(stats)}
        rollout.halt_reason = "wave 1: " + "; ".join(b.describe() for b in breaches)
        return int(rollout.id)


__all__ = ["TARGET", "device_id", "seed_devices", "seed_halted_rollout", "seed_package"]
